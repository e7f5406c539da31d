"""`sdkit eval`: a score per prompt for one or more models, generated with the same seeds.

`--metric clip` (the default) is torchmetrics' `CLIPScore`; `--metric digits` is the offline
digits classifier of the quickstart (`sdkit.quickstart.digits.DigitScorer`). A scorer has a name, a
table title, a description for the report, `check_prompts` and `score(images, prompt)`.

The CLIP score is torchmetrics' `CLIPScore` (100 x cosine of CLIP's projected image and text
embeddings, mean over images, clamped at 0). torchmetrics 1.9 loads only a few named hub
models and expects transformers 4's tensors, so it gets a callable that returns a CLIP
model whose `get_*_features` give the projected embeddings as tensors.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError, first_line

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
METRICS = ("clip", "digits")
GRID_THUMB = 256  # largest side of an image in grid.png


# ---------------------------------------------------------------------------- prompts


def read_prompts(path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts: file '{path}' does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts: '{path}' is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts: '{path}' holds no prompts (one a line; # starts a comment)")
    return prompts


# ---------------------------------------------------------------------------- CLIP score


class ClipScorer:
    """torchmetrics CLIPScore over a CLIP model from a hub id or a local folder."""

    name = "clip"
    title = "CLIP score (higher is better)"
    description = "torchmetrics CLIPScore: 100 x cosine(image, prompt), mean over a prompt's images, clamped at 0"

    def __init__(self, ref: str, device: str):
        import torch
        from torch import nn
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        from sdkit.recipe import check_local_ref
        from sdkit.inference.sampling import quiet_loading

        check_local_ref(ref, "--clip-model")
        quiet_loading()
        try:
            clip = CLIPModel.from_pretrained(ref).eval()
            processor = CLIPProcessor.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise UserError(f"--clip-model: cannot load CLIP model '{ref}': {first_line(e)}") from None
        self.max_tokens = clip.config.text_config.max_position_embeddings
        self.tokenizer = processor.tokenizer

        class ProjectedClip(nn.Module):
            """transformers 5 returns output objects from get_*_features; CLIPScore wants tensors."""

            def __init__(self, model):
                super().__init__()
                self.model = model
                self.config = model.config

            def get_image_features(self, pixel_values):
                return _tensor(self.model.get_image_features(pixel_values=pixel_values))

            def get_text_features(self, input_ids, attention_mask=None):
                return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

        max_tokens = self.max_tokens

        class TruncatingProcessor:
            """Cut prompts at CLIP's length in the tokenizer, which keeps the end-of-text token
            CLIP pools on (torchmetrics' own cut drops it)."""

            def __call__(self, *args, text=None, **kwargs):
                if text is not None:
                    kwargs.update(truncation=True, max_length=max_tokens)
                return processor(*args, text=text, **kwargs)

        wrapped = ProjectedClip(clip)
        self.metric = CLIPScore(model_name_or_path=lambda: (wrapped, TruncatingProcessor())).to(device)
        self.device = device
        self._torch = torch

    def too_long(self, prompt: str) -> bool:
        return len(self.tokenizer(prompt).input_ids) > self.max_tokens

    def check_prompts(self, prompts: list[str]) -> list[bool]:
        """Which prompts CLIP truncates; each is named in a warning (not an error)."""
        truncated = [self.too_long(p) for p in prompts]
        for i, prompt in enumerate(prompts):
            if truncated[i]:
                print(
                    f"warning: prompt {i + 1} '{_short(prompt, 60)}' is longer than CLIP's {self.max_tokens} tokens; "
                    f"its CLIP score sees only the first {self.max_tokens}",
                    file=sys.stderr,
                )
        return truncated

    def score(self, images: list, prompt: str) -> tuple[float, list[float]]:
        """(score of the prompt over all its images, score of each image alone)."""
        torch = self._torch
        self.metric.reset()
        per_image = []
        with torch.inference_mode():
            for image in images:
                pixels = _uint8_chw(image).to(self.device)
                per_image.append(float(self.metric(pixels, prompt)))  # also accumulates the prompt's state
            overall = float(self.metric.compute())
        self.metric.reset()
        return overall, per_image


def _tensor(output):
    import torch

    # transformers 5: an output object whose pooler_output holds the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _uint8_chw(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------- the command


@dataclass
class ModelResult:
    label: str
    model: str
    info: dict
    images: dict[int, list] = field(default_factory=dict)  # prompt index -> PIL images
    files: dict[int, list[str]] = field(default_factory=dict)
    prompt_scores: list[float] = field(default_factory=list)
    image_scores: list[list[float]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.prompt_scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.prompt_scores) if len(self.prompt_scores) > 1 else 0.0

    def score(self, scorer, prompts: list[str]) -> None:
        for i, prompt in enumerate(prompts):
            overall, per_image = scorer.score(self.images[i], prompt)
            self.prompt_scores.append(overall)
            self.image_scores.append(per_image)


def eval_command(
    *,
    prompts,
    models: list[str],
    lora: Optional[str] = None,
    metric: str = "clip",
    clip_model: str = DEFAULT_CLIP,
    images_per_prompt: int = 2,
    batch_size: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    width: Optional[int] = None,
    height: Optional[int] = None,
    out: Path = Path("eval"),
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
) -> dict:
    """Generate, score, print the table, write report.json, scores.csv and grid.png; returns the report."""
    if metric not in METRICS:
        raise UserError(f"--metric: unknown metric '{metric}' (choose from: {', '.join(METRICS)})")
    prompt_list = read_prompts(prompts)
    if metric == "digits":  # the judge is cheap to build: prompts are checked before any model loads
        from sdkit.quickstart.digits import DigitScorer

        scorer = DigitScorer()
        truncated = scorer.check_prompts(prompt_list)
    _check_models(models, lora)

    from sdkit.inference.sampling import pick_device, release_memory

    device_name = pick_device(device)
    if metric == "clip":
        scorer = ClipScorer(clip_model, device_name)  # a bad --clip-model fails before generating
        truncated = scorer.check_prompts(prompt_list)

    out = Path(out)
    results: list[ModelResult] = []
    for label, ref in zip(model_labels(models), models):
        results.append(_generate_with(ref, label, prompt_list, out=out, lora=lora, device=device_name, dtype=dtype,
                                      width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                                      images_per_prompt=images_per_prompt, batch_size=batch_size, compile=compile))
        release_memory()  # that model's pipeline went with _generate_with's frame

    for result in results:
        result.score(scorer, prompt_list)
    settings = dict(
        prompts_file=str(prompts), metric=scorer.name, clip_model=clip_model if metric == "clip" else None,
        images_per_prompt=images_per_prompt, batch_size=batch_size, steps=steps, guidance=guidance,
        seeds=[seed + k for k in range(images_per_prompt)], width=width, height=height, lora=lora,
        device=device_name, dtype=results[0].info["dtype"] if results else None,
    )
    report = build_report(prompt_list, truncated, results, settings, scorer.description)
    print_table(prompt_list, results, scorer.title)
    for path in (write_json(out / "report.json", report), write_csv(out / "scores.csv", prompt_list, results),
                 write_grid(out / "grid.png", prompt_list, results)):
        print(f"wrote {path}")
    return report


def _check_models(models: list[str], lora: Optional[str]) -> None:
    """Every model and the LoRA, checked before any weights load."""
    from sdkit.families import detect_family
    from sdkit.inference.loading import resolve_lora, resolve_model

    for ref in models:
        detect_family(resolve_model(ref, "--model").base, key="--model")
    if lora:
        resolve_lora(lora, "--lora")


def _generate_with(ref: str, label: str, prompts: list[str], *, out: Path, lora, device, dtype, width, height,
                   steps, guidance, seed, images_per_prompt, batch_size, compile=False) -> ModelResult:
    """Load `ref` and save its images for every prompt; every model gets the same seeds."""
    import torch

    from sdkit.inference.generate import png_text, slugify
    from sdkit.inference.sampling import load_pipeline, make_images

    pipe, _, info = load_pipeline(ref, lora=lora, device=device, dtype=dtype, compile=compile)
    w, h = info.image_size(width, height, model=f"'{ref}'")
    result = ModelResult(label=label, model=ref, info={**vars(info), "width": w, "height": h})
    folder = out / "images" / slugify(label)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            images = make_images(
                pipe, prompt, steps=steps, guidance=guidance, seed=seed, num_images=images_per_prompt,
                width=w, height=h, batch_size=batch_size,
            )
            result.images[i], result.files[i] = images, []
            for k, image in enumerate(images):
                path = folder / f"{i:02d}-{seed + k}.png"
                text = png_text(info, prompt=prompt, negative_prompt=None, seed=seed + k, steps=steps,
                                guidance=guidance, width=w, height=h)
                _save_with_text(image, path, text)
                result.files[i].append(str(path))
    print(f"generated {len(prompts) * images_per_prompt} images with {ref} in {folder}", flush=True)
    return result


def model_labels(refs: list[str]) -> list[str]:
    """Short, unique column names: a local folder's name, or the hub id."""
    labels = []
    for ref in refs:
        path = Path(ref).expanduser()
        label = path.name if path.exists() and path.name else ref
        base, n = label, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _save_with_text(image, path: Path, text: dict[str, str]) -> None:
    from sdkit.inference.generate import png_info

    image.save(path, format="PNG", pnginfo=png_info(text))


# ---------------------------------------------------------------------------- outputs


def build_report(prompts: list[str], truncated: list[bool], results: list[ModelResult], settings: dict,
                 metric: str) -> dict:
    from sdkit.inference.generate import sdkit_version

    seeds = settings["seeds"]
    return {
        "sdkit_version": sdkit_version(),
        "metric": metric,
        "settings": settings,
        "models": [
            {
                "label": r.label, "model": r.model, "base": r.info["base"], "family": r.info["family"],
                "loras": r.info["loras"], "scheduler": r.info["scheduler"], "width": r.info["width"],
                "height": r.info["height"], "mean": r.mean, "std": r.std,
            }
            for r in results
        ],
        "prompts": [
            {
                "prompt": prompt,
                "truncated_for_clip": truncated[i],
                "scores": {
                    r.label: {
                        "score": r.prompt_scores[i],
                        "images": [
                            {"seed": s, "score": v, "file": f}
                            for s, v, f in zip(seeds, r.image_scores[i], r.files[i])
                        ],
                    }
                    for r in results
                },
            }
            for i, prompt in enumerate(prompts)
        ],
    }


def print_table(prompts: list[str], results: list[ModelResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("prompt", overflow="ellipsis", no_wrap=True, max_width=60)
    for r in results:
        table.add_column(r.label, justify="right")
    for i, prompt in enumerate(prompts):
        table.add_row(prompt, *[f"{r.prompt_scores[i]:.2f}" for r in results])
    table.add_section()
    table.add_row("mean", *[f"{r.mean:.2f}" for r in results], style="bold")
    table.add_row("std", *[f"{r.std:.2f}" for r in results])
    Console().print(table)


def write_json(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_csv(path: Path, prompts: list[str], results: list[ModelResult]) -> Path:
    """The printed table as CSV: a row per prompt, a column per model, then mean and std."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", *[r.label for r in results]])
        for i, prompt in enumerate(prompts):
            writer.writerow([prompt, *[f"{r.prompt_scores[i]:.4f}" for r in results]])
        writer.writerow(["mean", *[f"{r.mean:.4f}" for r in results]])
        writer.writerow(["std", *[f"{r.std:.4f}" for r in results]])
    return path


def write_grid(path: Path, prompts: list[str], results: list[ModelResult]) -> Path:
    """One row per prompt, one column per model (its images side by side), labelled."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    scale = min(1.0, GRID_THUMB / max(max(im.size) for r in results for ims in r.images.values() for im in ims))
    cell_w = max(round(im.width * scale) for r in results for ims in r.images.values() for im in ims)
    cell_h = max(round(im.height * scale) for r in results for ims in r.images.values() for im in ims)
    n = max(len(ims) for r in results for ims in r.images.values())
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    pad, label_w, header_h = 4, 220, 40
    col_w = max(n * (cell_w + pad) + pad, 110)  # room for the label and mean
    row_h = max(cell_h + 2 * pad, 60)
    grid = Image.new("RGB", (label_w + len(results) * col_w, header_h + len(prompts) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for j, r in enumerate(results):
        draw.text((label_w + j * col_w + pad, 4), _short(r.label, 40), fill="black", font=font)
        draw.text((label_w + j * col_w + pad, 21), f"mean {r.mean:.2f}", fill="dimgray", font=font)
    for i, prompt in enumerate(prompts):
        y = header_h + i * row_h
        wrapped = textwrap.wrap(prompt, 28)[: max(1, row_h // 17)]
        draw.multiline_text((pad, y + pad), "\n".join(wrapped), fill="black", font=font, spacing=3)
        for j, r in enumerate(results):
            x = label_w + j * col_w + pad
            for image in r.images[i]:
                size = (round(image.width * scale), round(image.height * scale))
                thumb = image if scale == 1.0 else image.resize(size)
                grid.paste(thumb.convert("RGB"), (x, y + pad))
                x += cell_w + pad
    grid.save(path)
    return path
