"""Which micro-batches each process trains on, in which order.

Every batch holds images of one bucket (see sdkit.training.buckets). An epoch: each bucket's
samples (every record `repeats` times) are shuffled by (seed, epoch, bucket) and cut into
global batches of batch_size x world_size; a bucket's remainder waits for a later epoch's
shuffle, and a bucket smaller than one global batch is cycled to fill one. The global batches
are shuffled by (seed, epoch) and rank r takes the r-th slice of each. So every rank runs
the same number of steps in every epoch (a rank with one batch more is the classic DDP hang),
all ranks train the same bucket shape at each step, and the order depends on nothing but
(seed, epoch): a resumed run skips the batches it already trained and goes on exactly.

Class images (DreamBooth prior preservation, `prior`) do not count toward the epoch: each
global batch of instance samples is followed by as many class samples of the SAME bucket
(diffusers concatenates instance and class examples in one batch), so a micro-batch holds
batch_size instance + batch_size class samples of one size. A bucket's class images are taken
in a fixed order per (seed, bucket), continuing from epoch to epoch, so all of them are seen
before any repeats. A bucket without class images trains its batches without them.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

import torch

from sdkit.training.samples import mix_seed

Key = tuple[int, int, int]  # (record index, epoch, copy): what TrainDataset and the cache read


class BucketBatchSampler(torch.utils.data.Sampler):
    """A batch sampler (DataLoader's `batch_sampler`) yielding THIS rank's micro-batches of keys."""

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: Optional[list[int]] = None, shuffle: bool = True, prior: Optional[list[bool]] = None):
        prior = prior or [False] * len(bucket_ids)
        if not bucket_ids or all(prior):
            raise ValueError("BucketBatchSampler needs at least one (instance) sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size, self.shuffle = batch_size, seed, rank, world_size, shuffle
        repeats = repeats or [1] * len(bucket_ids)
        self.members: dict[int, list[tuple[int, int]]] = {}
        self.class_members: dict[int, list[int]] = {}  # class images by bucket
        for index, (bucket, times, is_class) in enumerate(zip(bucket_ids, repeats, prior)):
            if is_class:
                self.class_members.setdefault(bucket, []).append(index)
            else:
                self.members.setdefault(bucket, []).extend((index, copy) for copy in range(times))
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_in_bucket(self) -> dict[int, int]:
        """Micro-batches per epoch of each bucket, on every rank."""
        return {b: max(1, len(m) // self.global_batch) for b, m in self.members.items()}

    def samples_per_epoch(self) -> int:
        """Instance samples per epoch over all ranks (repeats and cycling counted)."""
        return self.batches_per_epoch() * self.global_batch

    def batches_per_epoch(self) -> int:
        return sum(self.batches_in_bucket().values())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip this rank's first `start_batch` batches (resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch()}")
        self.epoch, self.start_batch = epoch, start_batch

    def _permutation(self, n: int, *parts: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, *parts))).tolist()

    def global_batches(self, epoch: int) -> list[list[Key]]:
        """Every global batch of `epoch` (all ranks), in order."""
        out = []
        g = self.global_batch
        for bucket in sorted(self.members):
            items = self.members[bucket]
            order = [items[i] for i in self._permutation(len(items), epoch, bucket)]
            count = self.batches_in_bucket()[bucket]
            order = (order * -(-count * g // len(order)))[: count * g]
            classes = self._class_keys(bucket, epoch, count * g)
            out += [[(i, epoch, c) for i, c in order[k * g:(k + 1) * g]] + classes[k * g:(k + 1) * g]
                    for k in range(count)]
        return [out[i] for i in self._permutation(len(out), epoch, -1)]

    def _class_keys(self, bucket: int, epoch: int, n: int) -> list[Key]:
        """The `n` class samples of `bucket` in `epoch` (none when it has no class images):
        a fixed order per (seed, bucket), epoch e starting where epoch e-1 stopped."""
        members = self.class_members.get(bucket)
        if not members:
            return []
        order = [members[i] for i in self._permutation(len(members), bucket, -2)]
        start = epoch * n
        return [(order[(start + j) % len(order)], epoch, (start + j) // len(order)) for j in range(n)]

    def epoch_batches(self, epoch: int) -> list[list[Key]]:
        """This rank's micro-batches of `epoch`, in order (none skipped)."""
        g, lo, hi = self.global_batch, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        # instance samples first, then the class samples (if any) at the same positions
        return [batch[lo:hi] + batch[g + lo:g + hi] for batch in self.global_batches(epoch)]

    def __iter__(self) -> Iterator[list[Key]]:
        return iter(self.epoch_batches(self.epoch)[self.start_batch:])

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than a full epoch after a mid-epoch resume)."""
        return self.batches_per_epoch() - self.start_batch

    def times_seen(self, epoch: int) -> Counter:
        """How often each record index appears in `epoch` over all ranks (repeats, cycling)."""
        return Counter(i for batch in self.global_batches(epoch) for i, _, _ in batch)
