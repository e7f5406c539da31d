"""Cache of VAE posteriors and text embeddings, so a cached step runs only the denoiser.

Valid when the VAE and text encoders are frozen and the pixels of a sample do not change
between epochs (center crop; each flip variant is cached separately). Files are safetensors
under a folder keyed by the encoders (model, VAE, dtype); each sample's file is named by a
digest of what makes its tensors: the image's content (its bytes, not its name or place in
the data), its caption, and its transform (bucket, resized size, crop box, flip). Inserting
an image encodes only that image; a changed bucket setting encodes again exactly the images
whose transform changed; entries the current data no longer uses are pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sdkit.atomic import atomic_write_path
from sdkit.training.samples import split_key

EMPTY_CAPTION_FILE = "empty-caption.safetensors"


def cache_key(recipe, family_name: str, dtype: torch.dtype) -> str:
    parts = {
        "family": family_name,
        "model": recipe.model.pretrained,
        "config": recipe.model.config,
        "revision": recipe.model.revision,
        "variant": recipe.model.variant,
        "vae": recipe.model.vae,
        "load_t5": recipe.model.load_t5,
        "dtype": str(dtype),
        "weights": _encoder_weight_files(recipe.model.pretrained) + _encoder_weight_files(recipe.model.vae),
        "format": 2,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _encoder_weight_files(ref) -> list:
    """(file, size, mtime) of a local folder's VAE and text-encoder weights: a model replaced
    in place keeps its path, and the path alone would hand back the old encoders' latents."""
    if ref and os.path.isfile(ref):  # a single-file checkpoint holds every component
        return [[os.path.basename(ref), os.path.getsize(ref), os.stat(ref).st_mtime_ns]]
    if not ref or not os.path.isdir(ref):
        return []  # a hub id: its revision is in the key
    root = Path(ref)
    files = [p for pattern in ("*", "vae/*", "text_encoder*/*") for p in root.glob(pattern)
             if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files)


def _digest(record, placement, flip: bool) -> str:
    transform = (placement.bucket, placement.resized, placement.crop_box(), flip)
    return hashlib.sha1(f"{record.identity}\n{record.caption}\n{transform}".encode()).hexdigest()[:20]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # A crash never leaves a half-written cache entry; no fsync: a lost entry is encoded again.
    with atomic_write_path(path, fsync=False) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)


class LatentCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, dataset, index: int, flip: bool) -> Path:
        return self.root / f"{_digest(dataset.records[index], dataset.placement(index), flip)}.safetensors"

    def prune(self, dataset) -> int:
        """Remove entries the current data no longer uses; returns how many (call on one rank,
        once every rank has built its share)."""
        used = {self.path(dataset, i, flip).name for i in range(len(dataset)) for flip in dataset.cache_variants()}
        used.add(EMPTY_CAPTION_FILE)
        stale = [p for p in self.root.glob("*.safetensors") if p.name not in used]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def missing(self, dataset, rank: int = 0, world_size: int = 1) -> list[tuple[int, bool]]:
        todo = []
        for index in range(rank, len(dataset), world_size):
            for flip in dataset.cache_variants():
                if not self.path(dataset, index, flip).is_file():
                    todo.append((index, flip))
        return todo

    def build(
        self,
        family,
        dataset,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 8,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Encode this rank's share of the samples that are not cached yet; returns how many."""
        self.root.mkdir(parents=True, exist_ok=True)
        empty = self.root / EMPTY_CAPTION_FILE
        if rank == 0 and not empty.is_file():
            with torch.no_grad():
                _save_atomic(_text_row(family.encode_text([""]), 0), empty)
        todo = self.missing(dataset, rank, world_size)
        done = 0
        for chunk in _same_bucket_chunks(dataset, todo, batch_size):
            items = [dataset.item(index, flip) for index, flip in chunk]
            pixels = torch.stack([it["pixel_values"] for it in items])
            with torch.no_grad():
                moments = family.encode_images(pixels)
                text = family.encode_text([it["caption"] for it in items])
            for row, ((index, flip), item) in enumerate(zip(chunk, items)):
                tensors = {"moments": moments[row], **_text_row(text, row)}
                tensors["original_size"] = item["original_size"]
                tensors["crop_top_left"] = item["crop_top_left"]
                tensors["target_size"] = item["target_size"]
                _save_atomic(tensors, self.path(dataset, index, flip))
            done += len(chunk)
            if on_progress:
                on_progress(done, len(todo))
        return len(todo)


def _same_bucket_chunks(dataset, todo: list, size: int) -> list[list]:
    """`todo` in chunks of at most `size` whose images share a bucket (one encoder batch each)."""
    groups: dict = {}
    for entry in todo:
        groups.setdefault(dataset.placement(entry[0]).bucket, []).append(entry)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def _text_row(text: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    return {f"text.{k}": v[row] for k, v in text.items()}


class CachedDataset(torch.utils.data.Dataset):
    """Same keys and variants as the TrainDataset it wraps, read from the cache."""

    def __init__(self, dataset, cache: LatentCache):
        self.dataset = dataset
        self.cache = cache
        self.empty = {k[5:]: v for k, v in load_file(cache.root / EMPTY_CAPTION_FILE).items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, epoch, copy = split_key(key)
        variant = self.dataset.variant(index, epoch, copy)
        flip = bool(variant.flip)
        stored = load_file(self.cache.path(self.dataset, index, flip))
        text = {k[5:]: v for k, v in stored.items() if k.startswith("text.")}
        if variant.drop_caption:
            text = dict(self.empty)
        return {
            "moments": stored["moments"],
            "text": text,
            "original_size": stored["original_size"],
            "crop_top_left": stored["crop_top_left"],
            "target_size": stored["target_size"],
            "prior": torch.tensor(self.dataset.records[index].prior),
            "index": index,
            "flip": flip,
            "drop_caption": bool(variant.drop_caption),
            "caption": "" if variant.drop_caption else self.dataset.records[index].caption,
        }


def collate_cached(items: list[dict]) -> dict:
    batch = {
        "moments": torch.stack([it["moments"] for it in items]),
        "text": {k: torch.stack([it["text"][k] for it in items]) for k in items[0]["text"]},
        "original_size": torch.stack([it["original_size"] for it in items]),
        "crop_top_left": torch.stack([it["crop_top_left"] for it in items]),
        "target_size": torch.stack([it["target_size"] for it in items]),
        "prior": torch.stack([it["prior"] for it in items]),
    }
    for key in ("index", "flip", "drop_caption", "caption"):
        batch[key] = [it[key] for it in items]
    return batch
