"""The quickstart: scikit-learn digits as a captioned image folder, the digits judge (also
`sdkit eval --metric digits`), the digit base model, and (slow) the whole quickstart learning
to follow prompts."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdkit.quickstart.digits import (
    DIGIT_WORDS,
    DigitJudge,
    DigitScorer,
    caption,
    image_grid,
    load_digit_pixels,
    prompted_digit,
    to_digit_features,
    write_digits_folder,
)
from sdkit.errors import UserError


def test_digits_folder_is_a_captioned_training_set(tmp_path):
    from sdkit.training.data import load_records
    from sdkit.training.samples import TrainDataset
    from sdkit.recipe import DataConfig

    folder = write_digits_folder(tmp_path / "digits", size=16)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    pixels, labels = load_digit_pixels(16)
    assert len(rows) == len(labels) == 1797
    for row, label in zip(rows[:50], labels[:50]):
        assert row["text"] == f"a handwritten digit {DIGIT_WORDS[label]}"
    # The image on disk is the digit, upscaled without blur.
    saved = np.asarray(Image.open(folder / rows[7]["file_name"]))
    assert saved.shape == (16, 16) and np.array_equal(saved, pixels[7])
    assert np.array_equal(saved[::2, ::2], saved[1::2, 1::2])

    # sdkit's data pipeline reads it as is: RGB in [-1, 1] at 16 px, captions from metadata.jsonl.
    cfg = DataConfig(dataset=str(folder), resolution=16)
    records = load_records(cfg, log=lambda m: None, progress=False)
    assert len(records) == 1797 and records[3].caption == caption(int(labels[3]))
    sample = TrainDataset(records, cfg, seed=0).item(3, False)
    assert tuple(sample["pixel_values"].shape) == (3, 16, 16)
    assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1


def test_judge_features_undo_the_upscale():
    from sklearn.datasets import load_digits

    pixels, _ = load_digit_pixels(16)
    features = to_digit_features(Image.fromarray(p) for p in pixels[:20])
    # 0..16 -> 0..255 (rounded) -> 0..16: equal within the rounding of one grey level.
    assert np.abs(features - load_digits().data[:20]).max() < 16 / 255


def test_judge_labels_held_out_digits():
    pixels, labels = load_digit_pixels(16)
    train, held_out = np.arange(0, 1797, 2), np.arange(1, 1797, 2)
    judge = DigitJudge(train_indices=train)
    found = judge.labels(Image.fromarray(pixels[i]).convert("RGB") for i in held_out)
    assert np.mean(found == labels[held_out]) > 0.97

    # As the eval scorer, with the judge that never saw these digits: held-out digits score for
    # their own prompt and count against every other digit's.
    scorer = DigitScorer()
    scorer.judge = judge
    by_digit = {d: [Image.fromarray(pixels[i]) for i in held_out if labels[i] == d][:5] for d in range(10)}
    assert np.mean([scorer.score(by_digit[d], caption(d))[0] for d in range(10)]) >= 90
    assert np.mean([scorer.score(by_digit[(d + 1) % 10], caption(d))[0] for d in range(10)]) < 5


def test_prompted_digit_reads_words_and_numerals():
    assert prompted_digit("a handwritten digit seven") == 7
    assert prompted_digit("The number 0, drawn by hand") == 0
    assert prompted_digit("a handwritten digit") is None
    assert prompted_digit("someone wrote this") is None  # "one" inside a word is not a digit
    with pytest.raises(UserError, match="more than one digit"):
        prompted_digit("a two next to a three")


def test_digit_scorer_counts_images_of_the_prompted_digit():
    pixels, labels = load_digit_pixels(16)
    sevens = [Image.fromarray(pixels[i]).convert("RGB") for i in np.flatnonzero(labels == 7)[:4]]
    scorer = DigitScorer()
    assert scorer.score(sevens, caption(7)) == (100.0, [100.0] * 4)
    assert scorer.score(sevens, caption(1)) == (0.0, [0.0] * 4)
    mixed = sevens[:3] + [Image.fromarray(pixels[int(np.flatnonzero(labels == 2)[0])])]
    assert scorer.score(mixed, "the digit 7") == (75.0, [100.0, 100.0, 100.0, 0.0])


def test_eval_metric_digits_refuses_prompts_without_a_digit_before_loading(tmp_path):
    from sdkit.inference.evaluate import eval_command

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\na cat\n")
    # The model does not exist: the prompt is what gets reported, before any model is looked at.
    with pytest.raises(UserError, match="prompt 2 'a cat' names no digit"):
        eval_command(prompts=prompts, models=[str(tmp_path / "no-model")], metric="digits", out=tmp_path / "e")
    with pytest.raises(UserError, match="--metric: unknown metric 'fid'"):
        eval_command(prompts=prompts, models=[str(tmp_path / "no-model")], metric="fid", out=tmp_path / "e")
    result = subprocess.run(
        [sys.executable, "-m", "sdkit", "eval", "--prompts", str(prompts), "--model", str(tmp_path), "--metric", "digits"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "names no digit" in result.stderr and "Traceback" not in result.stderr


def test_image_grid_lays_rows_out():
    tile = Image.new("L", (16, 16), 255)
    grid = image_grid([[tile] * 3, [tile] * 3], scale=2, gap=1)
    assert grid.size == (3 * 33 + 1, 2 * 33 + 1)


def test_base_model_is_a_stable_diffusion_folder(tmp_path):
    import torch

    from sdkit.quickstart.run import BASE_MARKER, LATENT_SIDE, base_is_current, build_base
    from sdkit.inference.sampling import load_pipeline

    base = build_base(tmp_path / "base", seed=0, vae_steps=2, log=lambda m: None)
    assert (base / "model_index.json").is_file() and (base / BASE_MARKER).is_file()
    assert base_is_current(base, seed=0, vae_steps=2) and not base_is_current(base, seed=1, vae_steps=2)
    pipe, _, info = load_pipeline(str(base))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and info.family == "sd"
    assert pipe.vae.config.scaling_factor > 0 and pipe.vae.config.scaling_factor != 0.18215
    assert LATENT_SIDE == 4 and pipe.unet.config.sample_size == LATENT_SIDE
    assert (info.width, info.height) == (16, 16)  # the model's own size is the quickstart's resolution
    image = pipe("a handwritten digit three", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)


def test_quickstart_smoke(tmp_path):
    """Every stage runs and writes what it promises (a few steps: learning is the slow test's job)."""
    from sdkit.quickstart.run import GRID_FILE, REPORT_FILE, quickstart_command

    run = quickstart_command(out=str(tmp_path / "qs"), steps=2, seed=0, vae_steps=2, images_per_digit=2,
                             log=lambda m: None)
    report = json.loads((run / REPORT_FILE).read_text())
    assert (run / "model_index.json").is_file() and (run / "export" / "model_index.json").is_file()
    assert 0 <= report["prompt_share"] <= 1 and report["steps"] == 2
    assert list(report["per_digit"]) == list(DIGIT_WORDS)
    grid = Image.open(run / GRID_FILE)
    assert grid.size[1] > 4 * grid.size[0]  # 10 rows (digits) of 2 images

    evaluation = json.loads((run / "eval" / "report.json").read_text())
    assert evaluation["settings"]["metric"] == "digits"
    assert [m["label"] for m in evaluation["models"]] == ["base", "qs", "export"]
    assert len(evaluation["prompts"]) == 10
    assert all(len(p["scores"]["qs"]["images"]) == 2 for p in evaluation["prompts"])

    # The export is fp16 safetensors only.
    unet_files = sorted((run / "export" / "unet").iterdir())
    assert [f.suffix for f in unet_files] == [".json", ".safetensors"]
    from safetensors import safe_open

    with safe_open(str(unet_files[1]), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in list(f.keys())[:5]} == {"torch.float16"}

    # A rerun reuses the base model (and so the latent cache).
    base_mtime = (run / "base" / "model_index.json").stat().st_mtime_ns
    quickstart_command(out=str(run), steps=2, seed=0, vae_steps=2, images_per_digit=1, log=lambda m: None)
    assert (run / "base" / "model_index.json").stat().st_mtime_ns == base_mtime
    assert json.loads((run / REPORT_FILE).read_text())["images_per_digit"] == 1


@pytest.mark.slow
def test_quickstart_learns_to_draw_the_prompted_digit(tmp_path):
    """The README's quickstart, end to end: 10 images per digit, judged by the digits classifier;
    then the README's `sdkit generate` line on its result."""
    from sdkit.inference.generate import generate_command
    from sdkit.quickstart.run import REPORT_FILE, quickstart_command

    run = quickstart_command(out=str(tmp_path / "quickstart"), seed=0, log=lambda m: None)
    report = json.loads((run / REPORT_FILE).read_text())
    assert report["images_per_digit"] == 10
    assert report["prompt_share_base"] < 0.3, report  # the untrained base: about chance (10%)
    assert report["prompt_share"] >= 0.8, report
    assert report["prompt_share_export"] >= 0.8, report  # the fp16 export draws the same digits

    # sdkit generate "a handwritten digit three" --model runs/quickstart, at generate's defaults.
    files = generate_command(prompts=["a handwritten digit three"], model=str(run), num_images=4, out=tmp_path / "out")
    labels = DigitJudge().labels(Image.open(f) for f in files)
    assert Image.open(files[0]).size == (16, 16)
    assert np.mean(labels == 3) >= 0.75, labels
