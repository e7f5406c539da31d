"""`sdkit data check`: what the training data of a recipe holds, before any model loads.

Per dataset: images, captions found and missing, unreadable files (named), a histogram of
image sizes, images smaller than their bucket (they are upscaled), and samples per epoch with
its repeats; then the bucket table of the whole run (with prior preservation: the class images
found and still to generate, and the class samples per epoch). A dataset left empty after its
unreadable files are skipped stops with one line (exit 2), as training would.
"""

from __future__ import annotations

from collections import Counter

SIZE_BINS = (256, 512, 1024, 2048)  # edges of the shorter-side histogram, in pixels


def size_bin(size: tuple[int, int]) -> tuple[int, str]:
    """(order, label) of the histogram bin of an image's shorter side."""
    short, low = min(size), 0
    for order, edge in enumerate(SIZE_BINS):
        if short < edge:
            return order, f"{low}-{edge - 1}"
        low = edge
    return len(SIZE_BINS), f"{low}+"


def check_data(recipe, processes: int = 1) -> str:
    from sdkit.families import family_class, resolve_family_name
    from sdkit.training.build import bucket_report
    from sdkit.training.buckets import place, run_buckets
    from sdkit.training.data import load_source
    from sdkit.training.sources import expand_sources

    family_name = resolve_family_name(recipe.model)
    buckets = run_buckets(recipe.data, recipe.bucket_step(family_class(family_name).bucket_step))
    lines, total = [], 0
    for source in expand_sources(recipe.data):
        notes: list[str] = []
        records = load_source(source, log=notes.append, progress=False)
        placements = [place(r.image_size(), buckets) for r in records]
        captioned = sum(1 for r in records if r.caption.strip())
        upscaled = sum(1 for p in placements if p.resized[0] > p.original[0] or p.resized[1] > p.original[1])
        samples = len(records) * source.repeats
        total += samples
        histogram = Counter(size_bin(p.original) for p in placements)
        lines += [
            f"dataset {source.dataset}: {len(records)} images, captions {captioned} found / "
            f"{len(records) - captioned} missing, repeats {source.repeats} -> {samples} samples per epoch",
            "  shorter side: " + ", ".join(f"{label} px: {n}" for (_, label), n in sorted(histogram.items())),
            f"  smaller than their bucket (upscaled): {upscaled}",
            *(f"  {note}" for note in notes),
        ]
    # with class images, the bucket report adds the class samples paired with these
    lines.append(f"{'instance ' if recipe.prior_preservation else ''}samples per epoch: {total}")
    lines.append(bucket_report(recipe, family_name, processes))
    return "\n".join(lines)
