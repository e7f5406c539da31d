"""Training samples: how each record becomes pixels and a caption in each epoch, and which
samples each process sees in which order.

Every random choice a sample needs (flip, caption dropout, crop position) is drawn from
(seed, epoch, index) alone, never from a global RNG, so a resumed run and a latent cache see
exactly the same samples as an uninterrupted run, whatever the worker count.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from PIL import Image

from sdkit.recipe import DataConfig
from sdkit.training.data import Record


# ---------------------------------------------------------------- transforms

@dataclass(frozen=True)
class Variant:
    """The random choices for one sample in one epoch."""

    flip: bool
    drop_caption: bool
    crop: Optional[tuple[float, float]]  # (top, left) as fractions of the free space; None: center


def _mix(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (negative ones too), the same in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resize_and_crop(image: Image.Image, resolution: int, flip: bool,
                    crop: Optional[tuple[float, float]]) -> tuple[Image.Image, tuple[int, int]]:
    """Shorter side to `resolution` (Lanczos), flip, then crop a square.

    Returns the square and its (top, left) in the resized (and flipped) image: the order and
    coordinates diffusers' SDXL training script uses for its crop micro-conditioning.
    """
    width, height = image.size
    short = min(width, height)
    size = (width * resolution // short, height * resolution // short)  # exact integer scaling
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    free_y, free_x = size[1] - resolution, size[0] - resolution
    if crop is None:
        top, left = int(round(free_y / 2)), int(round(free_x / 2))
    else:
        top, left = min(free_y, int(crop[0] * (free_y + 1))), min(free_x, int(crop[1] * (free_x + 1)))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class TrainDataset(torch.utils.data.Dataset):
    """Transformed samples keyed by (index, epoch); see `EpochSampler` for the keys."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int):
        self.records = list(records)
        self.cfg = cfg
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def variant(self, index: int, epoch: int) -> Variant:
        rng = random.Random(_mix(self.seed, epoch, index))
        # Draw every number every time, so one option never shifts another's draws.
        flip, drop, top, left = rng.random(), rng.random(), rng.random(), rng.random()
        return Variant(
            flip=self.cfg.random_flip and flip < 0.5,
            drop_caption=drop < self.cfg.caption_dropout,
            crop=None if self.cfg.center_crop else (top, left),
        )

    def cache_variants(self) -> list[bool]:
        return [False, True] if self.cfg.random_flip else [False]

    def _sample(self, index: int, variant: Variant) -> dict:
        record = self.records[index]
        image = record.load_image()
        original = (image.height, image.width)
        square, top_left = resize_and_crop(image, self.cfg.resolution, variant.flip, variant.crop)
        return {
            "pixel_values": to_tensor(square),
            "caption": "" if variant.drop_caption else record.caption,
            "original_size": torch.tensor(original, dtype=torch.long),
            "crop_top_left": torch.tensor(top_left, dtype=torch.long),
            "index": index,
            "flip": variant.flip,
            "drop_caption": variant.drop_caption,
        }

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self._sample(index, self.variant(index, epoch))

    def item(self, index: int, flip: bool) -> dict:
        """A fixed variant for the latent cache: center crop, the caption kept."""
        return self._sample(index, Variant(flip=flip, drop_caption=False, crop=None))


def collate(items: list[dict]) -> dict:
    """Tensors stacked; captions, indices and flags as lists."""
    return {
        key: torch.stack([it[key] for it in items]) if torch.is_tensor(items[0][key]) else [it[key] for it in items]
        for key in items[0]
    }


# ---------------------------------------------------------------- order

class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) keys for THIS rank, batch-aligned, deterministic from seed and epoch.

    Each epoch shuffles range(n) with a generator seeded from (seed, epoch), keeps the largest
    multiple of batch_size * world_size (the rest waits for a later epoch's shuffle), and gives
    rank r every world_size-th index from r: disjoint shards, the same batch count on every rank.
    A set smaller than one batch per rank is repeated to fill it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError("EpochSampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip this rank's first `start_batch` batches (resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch()}")
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return max(1, self.n // (self.batch_size * self.world_size))

    def epoch_indices(self, epoch: int) -> list[int]:
        """Every index this rank sees in `epoch`, in order (no batch skipped)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        total = self.batches_per_epoch() * self.batch_size * self.world_size
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        """Keys the next iteration yields (fewer than a full epoch after a mid-epoch resume)."""
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size
