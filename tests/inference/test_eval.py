"""`sdkit eval` on tiny models: torchmetrics' CLIP score checked against an independent computation."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdkit.errors import UserError
from sdkit.inference.evaluate import eval_command, read_prompts

ROOT = Path(__file__).resolve().parents[2]
LONG_PROMPT = "a very long prompt " * 6  # 114 bytes: more than the tiny byte-level CLIP's 77 tokens
FAST = dict(images_per_prompt=2, steps=2, guidance=5.0, seed=7)


def independent_clip_score(clip_dir, image_files, prompt) -> float:
    """100 x cosine of CLIP's projected embeddings, averaged over the images, clamped at 0."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    images = [Image.open(f).convert("RGB") for f in image_files]
    inputs = processor(text=[prompt], images=images, return_tensors="pt", padding=True, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        out = model(**inputs)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    cosines = (image @ text.T).squeeze(1)
    return max(float(100 * cosines.mean()), 0.0)


def test_scores_match_an_independent_clip_computation(tiny_sd, tiny_sd2, tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# comment\n\na red circle\n  a blue square on white  \n\n{LONG_PROMPT}\n")
    out = tmp_path / "eval"
    report = eval_command(prompts=prompts, models=[str(tiny_sd), str(tiny_sd2)], clip_model=str(tiny_clip),
                          out=out, **FAST)
    captured = capsys.readouterr()

    expected_prompts = ["a red circle", "a blue square on white", LONG_PROMPT.strip()]
    assert [p["prompt"] for p in report["prompts"]] == expected_prompts
    # the long prompt is truncated for CLIP with a warning that names it, not an error
    assert "warning: prompt 3 'a very long prompt" in captured.err and "77 tokens" in captured.err
    assert [p["truncated_for_clip"] for p in report["prompts"]] == [False, False, True]

    labels = [m["label"] for m in report["models"]]
    assert labels == [tiny_sd.name, tiny_sd2.name]
    for entry in report["prompts"]:
        for label in labels:
            scored = entry["scores"][label]
            assert [image["seed"] for image in scored["images"]] == [7, 8]  # same seeds for every model
            files = [image["file"] for image in scored["images"]]
            expected = independent_clip_score(tiny_clip, files, entry["prompt"])
            assert scored["score"] == pytest.approx(expected, abs=1e-4), (label, entry["prompt"])
    assert any(e["scores"][label]["score"] > 0 for e in report["prompts"] for label in labels)  # not all clamped
    # the two models made different images, so they score differently
    assert report["prompts"][0]["scores"][labels[0]]["score"] != report["prompts"][0]["scores"][labels[1]]["score"]

    # the table: a row per prompt, a column per model, plus mean and std
    for needle in ("CLIP score", "a red circle", "mean", "std", labels[0], labels[1]):
        assert needle in captured.out
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["clip_model"] == str(tiny_clip) and report["settings"]["seeds"] == [7, 8]

    rows = list(csv.reader((out / "scores.csv").open()))
    assert rows[0] == ["prompt", *labels]
    assert [r[0] for r in rows[1:]] == [*expected_prompts, "mean", "std"]
    for i, row in enumerate(rows[1:4]):
        for j, label in enumerate(labels):
            assert float(row[1 + j]) == pytest.approx(report["prompts"][i]["scores"][label]["score"], abs=1e-4)
    for j, model in enumerate(report["models"]):
        scores = [p["scores"][model["label"]]["score"] for p in report["prompts"]]
        assert model["mean"] == pytest.approx(sum(scores) / 3)
        assert float(rows[4][1 + j]) == pytest.approx(model["mean"], abs=1e-4)

    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 2 * 32 and grid.height > 3 * 32  # 3 prompts x 2 models x 2 images
    assert f"wrote {out / 'grid.png'}" in captured.out


def test_prompts_file_rules(tmp_path):
    with pytest.raises(UserError, match="missing.txt' does not exist"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(UserError, match="empty.txt' holds no prompts"):
        read_prompts(empty)
    shipped = read_prompts(ROOT / "recipes" / "prompts-pokemon.txt")
    assert len(shipped) == 6 and shipped[0] == "a photo of an astronaut riding a horse on mars"


@pytest.mark.parametrize("kind", ["missing prompts", "bad clip", "bad model"])
def test_bad_input_exits_2_with_one_line(tiny_sd, tmp_path, monkeypatch, capsys, kind):
    from sdkit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    args = {"prompts": str(prompts), "model": str(tiny_sd), "clip": str(tmp_path / "clip")}
    needle = "--clip-model: folder"
    if kind == "missing prompts":
        args["prompts"], needle = str(tmp_path / "nope.txt"), "nope.txt' does not exist"
    if kind == "bad model":
        args["model"], needle = str(tmp_path / "no-model"), "--model: folder"
    argv = ["sdkit", "eval", "--prompts", args["prompts"], "--model", args["model"], "--clip-model", args["clip"],
            "--steps", "2", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out" / "images").exists()  # failed before generating anything
