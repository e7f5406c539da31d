"""Aspect-ratio buckets: which sizes a run trains at, which bucket each image goes to, and how
each image is resized and cropped to fill its bucket.

A bucket is a (width, height) of about `resolution`^2 pixels whose sides are multiples of the
family's bucket step (`Family.bucket_step`, or `data.bucket_step`). Each image goes to the bucket
nearest its aspect ratio (diffusers' `find_nearest_bucket`), is resized to cover it and cropped
as little as possible. With `data.buckets` off there is one bucket: the square `resolution`.

diffusers' `generate_aspect_ratio_buckets` builds buckets from a fixed list of ratios; kohya
users expect every width in steps of the bucket step within `max_aspect` and a min/max side,
so the ladder is built here (kohya's rule: the largest height with width x height <= res^2).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Placement:
    """Where one image lands: its bucket, its size after resizing, and the crop it gets."""

    original: Size  # (width, height) of the image as loaded (EXIF rotation applied)
    bucket: Size
    resized: Size

    def crop_box(self, fractions: Optional[tuple[float, float]] = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in resized pixels: centered, or at (top, left) fractions of
        the free space (random crops)."""
        free_x, free_y = self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]
        if fractions is None:
            top, left = int(round(free_y / 2)), int(round(free_x / 2))
        else:
            top = min(free_y, int(fractions[0] * (free_y + 1)))
            left = min(free_x, int(fractions[1] * (free_x + 1)))
        return left, top, left + self.bucket[0], top + self.bucket[1]


def bucket_sizes(resolution: int, step: int, max_aspect: float = 2.0,
                 min_side: Optional[int] = None, max_side: Optional[int] = None) -> list[Size]:
    """Every bucket (width, height), sorted by aspect ratio (tallest first)."""
    area = resolution * resolution
    low = max(step, min_side or step)
    high = max_side or int(resolution * max_aspect)
    found = set()
    square = resolution // step * step
    if square >= low:
        found.add((square, square))
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height < low:
            continue
        if max(width, height) / min(width, height) <= max_aspect + 1e-9:
            found |= {(width, height), (height, width)}
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket nearest the aspect ratio of `size` (width, height)."""
    from diffusers.training_utils import find_nearest_bucket

    width, height = size
    # diffusers takes and returns (height, width) pairs; ties go to the later (wider) bucket
    return buckets[find_nearest_bucket(height, width, [(h, w) for w, h in buckets])]


def cover(size: Size, bucket: Size) -> Size:
    """The size `size` is resized to so that it covers `bucket` with the least overhang.
    Integer scaling, the free side rounded down as torchvision's Resize does."""
    width, height = size
    bw, bh = bucket
    if bw * height >= bh * width:  # the width decides the scale
        return bw, max(bh, height * bw // width)
    return max(bw, width * bh // height), bh


def place(size: Size, buckets: list[Size]) -> Placement:
    bucket = nearest_bucket(size, buckets)
    return Placement(original=size, bucket=bucket, resized=cover(size, bucket))


def square_buckets(resolution: int) -> list[Size]:
    return [(resolution, resolution)]


def run_buckets(cfg, step: int) -> list[Size]:
    """The buckets of a run's data config (one square when `data.buckets` is off)."""
    if not cfg.buckets:
        return square_buckets(cfg.resolution)
    return bucket_sizes(cfg.resolution, step, cfg.max_aspect, cfg.min_side, cfg.max_side)


# ---------------------------------------------------------------- reports

def bucket_counts(placements: list[Placement]) -> Counter:
    return Counter(p.bucket for p in placements)


def table(placements: list[Placement], batches: dict[Size, int], classes: Optional[Counter] = None) -> str:
    """The dry-run table: bucket, images, batches per epoch (this rank), and with prior
    preservation the class images of each bucket (`classes`)."""
    counts = bucket_counts(placements)
    head = f"{'bucket':>11}  {'images':>6}  {'batches':>7}"
    lines = [head + (f"  {'class images':>12}" if classes is not None else "")]
    sizes = set(counts) | set(classes or ())
    for w, h in sorted(sizes, key=lambda s: (s[0] / s[1], s[0])):
        row = f"{f'{w}x{h}':>11}  {counts.get((w, h), 0):>6}  {batches.get((w, h), 0):>7}"
        lines.append(row + (f"  {classes.get((w, h), 0):>12}" if classes is not None else ""))
    return "\n".join(lines)


def largest_bucket(cfg, step: int) -> Size:
    """The bucket of the most pixels (the widest of equals) a run's data config can train at:
    the one `sdkit plan` estimates memory at. The square `resolution` when buckets are off."""
    return max(run_buckets(cfg, step), key=lambda s: (s[0] * s[1], s[0]))


def write_buckets_json(path: Path, names: list[str], placements: list[Placement]) -> Path:
    """buckets.json: every bucket with its image count, and per image its file, bucket, resized
    size and (center) crop box (left, top, right, bottom in resized pixels)."""
    from sdkit.atomic import atomic_write_path

    counts = bucket_counts(placements)
    doc = {
        "buckets": [{"width": w, "height": h, "images": n} for (w, h), n in sorted(counts.items())],
        "images": [
            {"file": name, "original": list(p.original), "bucket": list(p.bucket), "resized": list(p.resized),
             "crop": list(p.crop_box())}
            for name, p in zip(names, placements)
        ],
    }
    with atomic_write_path(path, fsync=False) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))
    return path
