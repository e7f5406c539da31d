"""scikit-learn's handwritten digits as a miniature text-to-image task, and its offline judge.

`load_digits` ships inside scikit-learn: 1,797 labelled 8x8 images, values 0..16. Upscaled
(nearest neighbour) they become a captioned image folder ("a handwritten digit seven") that
any sdkit recipe trains on. The judge is a support-vector classifier fitted on the same
bundled data: it labels generated images, so "does the model follow the prompt" becomes a
number with no download and no CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from sdkit.atomic import atomic_write_path

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_SIDE = 8  # load_digits images are 8x8
DIGITS_MAX = 16.0  # ... with values 0..16


def caption(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def load_digit_pixels(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, size, size] white-on-black, labels [N]) from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    if size % DIGITS_SIDE:
        raise ValueError(f"size must be a multiple of {DIGITS_SIDE}, got {size}")
    digits = load_digits()
    factor = size // DIGITS_SIDE
    images = digits.images.repeat(factor, axis=1).repeat(factor, axis=2)  # nearest-neighbour upscale
    pixels = np.rint(images * (255.0 / DIGITS_MAX)).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def write_digits_folder(out, size: int = 16) -> Path:
    """An image folder of every digit as a PNG plus metadata.jsonl captions (sdkit's folder layout)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels, labels = load_digit_pixels(size)
    rows = []
    for i, (image, label) in enumerate(zip(pixels, labels)):
        name = f"{i:04d}-{label}.png"
        Image.fromarray(image, mode="L").save(out / name)
        rows.append({"file_name": name, "text": caption(int(label))})
    with atomic_write_path(out / "metadata.jsonl") as tmp:  # written last: its presence marks a complete folder
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


# ---------------------------------------------------------------- the judge

def to_digit_features(images: Iterable) -> np.ndarray:
    """PIL images (any size, any mode) -> load_digits features [N, 64].

    Each image is box-filtered to 8x8 grey (for a side that is a multiple of 8, the mean of
    each block: the inverse of the nearest upscale) and mapped to the classifier's 0..16 range.
    """
    from PIL import Image

    rows = []
    for image in images:
        small = image.convert("L").resize((DIGITS_SIDE, DIGITS_SIDE), Image.Resampling.BOX)
        rows.append((np.asarray(small, dtype=np.float64) * (DIGITS_MAX / 255.0)).ravel())
    return np.stack(rows) if rows else np.zeros((0, DIGITS_SIDE * DIGITS_SIDE))


class DigitJudge:
    """An SVC on scikit-learn's digits that labels generated images (about 99% on held-out digits)."""

    def __init__(self, train_indices: Optional[Sequence[int]] = None):
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        digits = load_digits()
        x, y = digits.data, digits.target
        if train_indices is not None:
            x, y = x[list(train_indices)], y[list(train_indices)]
        self.classifier = SVC(gamma=0.001, C=10.0).fit(x, y)

    def labels(self, images: Iterable) -> np.ndarray:
        features = to_digit_features(images)
        if not len(features):
            return np.zeros(0, dtype=np.int64)
        return self.classifier.predict(features)


_DIGIT_NAMES = {**{w: d for d, w in enumerate(DIGIT_WORDS)}, **{str(d): d for d in range(10)}}


def prompted_digit(prompt: str) -> Optional[int]:
    """The digit a prompt names ("a handwritten digit seven", "the number 7"), None when it names
    none; a prompt that names two different digits is an error."""
    import re

    from sdkit.errors import UserError

    found = {_DIGIT_NAMES[w] for w in re.findall(r"[a-z]+|\d+", prompt.lower()) if w in _DIGIT_NAMES}
    if len(found) > 1:
        raise UserError(f"prompt '{prompt}' names more than one digit ({', '.join(DIGIT_WORDS[d] for d in sorted(found))})")
    return found.pop() if found else None


class DigitScorer:
    """`sdkit eval --metric digits`: the share (0..100) of a prompt's images that the digits
    classifier labels as the digit the prompt names. The offline judge of the quickstart."""

    name = "digits"
    title = "digits: % of images labelled as the prompted digit (higher is better)"
    description = ("scikit-learn SVC on load_digits: 100 x share of a prompt's images labelled as the digit "
                   "the prompt names (images box-filtered to 8x8 grey)")

    def __init__(self):
        self.judge = DigitJudge()

    def check_prompts(self, prompts: Sequence[str]) -> list[bool]:
        """Every prompt must name one digit; nothing is truncated (returns a False per prompt)."""
        from sdkit.errors import UserError

        for i, prompt in enumerate(prompts):
            if prompted_digit(prompt) is None:
                raise UserError(f"--metric digits: prompt {i + 1} '{prompt}' names no digit (zero..nine or 0..9)")
        return [False] * len(prompts)

    def score(self, images: list, prompt: str) -> tuple[float, list[float]]:
        """(score of the prompt over all its images, score of each image alone: 100 or 0)."""
        digit = prompted_digit(prompt)
        per_image = [100.0 * float(label == digit) for label in self.judge.labels(images)]
        return (float(np.mean(per_image)) if per_image else 0.0), per_image


def image_grid(rows: Sequence[Sequence], scale: int = 1, gap: int = 1):
    """One PIL image: row r holds rows[r] side by side (all images the same size), grey gaps between."""
    from PIL import Image

    first = rows[0][0]
    w, h = first.size[0] * scale, first.size[1] * scale
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + gap) + gap, len(rows) * (h + gap) + gap), (96, 96, 96))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = image.convert("RGB").resize((w, h), Image.Resampling.NEAREST)
            grid.paste(tile, (gap + c * (w + gap), gap + r * (h + gap)))
    return grid
