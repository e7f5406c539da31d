"""Training samples: how each record becomes pixels and a caption in each epoch (the order
of samples is sdkit.training.batches).

Every random choice a sample needs (flip, caption dropout, crop position) is drawn from
(seed, epoch, index) alone, never from a global RNG, so a resumed run and a latent cache see
exactly the same samples as an uninterrupted run, whatever the worker count.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from sdkit.recipe import DataConfig
from sdkit.training.buckets import Placement, place, square_buckets
from sdkit.training.data import Record
from sdkit.training.sources import shuffle_tags


# ---------------------------------------------------------------- transforms

@dataclass(frozen=True)
class Variant:
    """The random choices for one sample in one epoch."""

    flip: bool
    drop_caption: bool
    crop: Optional[tuple[float, float]]  # (top, left) as fractions of the free space; None: center
    tag_seed: Optional[int] = None  # order of the caption's tags (data.shuffle_caption); None: as written


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (negative ones too), the same in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resize_and_crop(image: Image.Image, placement: Placement, flip: bool,
                    crop: Optional[tuple[float, float]]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the placement's bucket (Lanczos), flip, then crop the bucket.

    Returns the crop and its (top, left) in the resized (and flipped) image: the order and
    coordinates diffusers' SDXL training script uses for its crop micro-conditioning.
    """
    if placement.resized != image.size:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    box = placement.crop_box(crop)
    return image.crop(box), (box[1], box[0])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class TrainDataset(torch.utils.data.Dataset):
    """Transformed samples keyed by (index, epoch[, copy]); see `BucketBatchSampler` for the keys.

    `buckets` are the run's bucket sizes (default: the square `resolution`); each record is
    placed in the nearest one (measured once, on first use)."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int, buckets: Optional[list] = None):
        self.records = list(records)
        self.cfg = cfg
        self.seed = seed
        self.buckets = list(buckets or square_buckets(cfg.resolution))
        self._placements: dict[int, Placement] = {}
        self.class_sets: list = []  # sdkit.training.class_images.ClassSet, with prior preservation

    def __len__(self) -> int:
        return len(self.records)

    def placement(self, index: int) -> Placement:
        if index not in self._placements:
            self._placements[index] = place(self.records[index].image_size(), self.buckets)
        return self._placements[index]

    def placements(self) -> list[Placement]:
        return [self.placement(i) for i in range(len(self.records))]

    def bucket_ids(self) -> list[int]:
        """Each record's bucket as an index into `buckets` (one bucket: no image is measured)."""
        if len(self.buckets) == 1:
            return [0] * len(self.records)
        return [self.buckets.index(p.bucket) for p in self.placements()]

    def variant(self, index: int, epoch: int, copy: int = 0) -> Variant:
        # a repeated record (data repeats) draws its own choices in each copy
        rng = random.Random(mix_seed(self.seed, epoch, index) if copy == 0 else mix_seed(self.seed, epoch, index, copy))
        # Draw every number every time, so one option never shifts another's draws.
        flip, drop, top, left, tags = rng.random(), rng.random(), rng.random(), rng.random(), rng.getrandbits(63)
        dropout = self.records[index].dropout
        return Variant(
            flip=self.cfg.random_flip and flip < 0.5,
            drop_caption=drop < (self.cfg.caption_dropout if dropout is None else dropout),
            crop=None if self.cfg.center_crop else (top, left),
            tag_seed=tags if self.cfg.shuffle_caption else None,
        )

    def cache_variants(self) -> list[bool]:
        return [False, True] if self.cfg.random_flip else [False]

    def _sample(self, index: int, variant: Variant) -> dict:
        record = self.records[index]
        image = record.load_image()
        placement = self.placement(index)
        cropped, top_left = resize_and_crop(image, placement, variant.flip, variant.crop)
        return {
            "pixel_values": to_tensor(cropped),
            "caption": "" if variant.drop_caption else self.caption(record, variant),
            "original_size": torch.tensor((image.height, image.width), dtype=torch.long),
            "crop_top_left": torch.tensor(top_left, dtype=torch.long),
            "target_size": torch.tensor((placement.bucket[1], placement.bucket[0]), dtype=torch.long),
            "prior": torch.tensor(record.prior),
            "index": index,
            "flip": variant.flip,
            "drop_caption": variant.drop_caption,
        }

    def caption(self, record: Record, variant: Variant) -> str:
        if variant.tag_seed is None:
            return record.caption
        return shuffle_tags(record.caption, self.cfg.keep_tokens, variant.tag_seed)

    def __getitem__(self, key) -> dict:
        index, epoch, copy = split_key(key)
        return self._sample(index, self.variant(index, epoch, copy))

    def item(self, index: int, flip: bool) -> dict:
        """A fixed variant for the latent cache: center crop, the caption kept."""
        return self._sample(index, Variant(flip=flip, drop_caption=False, crop=None))


def split_key(key) -> tuple[int, int, int]:
    """(index, epoch, copy) from a sampler key (a bare index is epoch 0, copy 0)."""
    if not isinstance(key, tuple):
        return key, 0, 0
    return (key[0], key[1], key[2] if len(key) > 2 else 0)


def collate(items: list[dict]) -> dict:
    """Tensors stacked; captions, indices and flags as lists."""
    return {
        key: torch.stack([it[key] for it in items]) if torch.is_tensor(items[0][key]) else [it[key] for it in items]
        for key in items[0]
    }
