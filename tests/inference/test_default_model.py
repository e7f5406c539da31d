"""The default model: `sdkit eval --prompts prompts.txt`, `sdkit generate "photo of a dog"` and
`sdkit export --format mar` exactly as users type them, in a folder of training runs."""

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError
from sdkit.inference.default_model import ENV_VAR, choose_model, models_to_compare, run_is_complete
from sdkit.inference.loading import LORA_FILE
from sdkit.quickstart import tiny

HOUR = 3600.0


@pytest.fixture(scope="module")
def finished_run(tiny_sd, tmp_path_factory):
    """One real, very short LoRA training on the tiny model: the run every folder below copies."""
    root = tmp_path_factory.mktemp("trained")
    images = tiny.make_image_folder(root / "images", n=4, size=32, captions="metadata")
    train_recipe(write_recipe(root, tiny_sd, images, root / "run", train={"max_steps": 2}))
    return root / "run"


def _age(path: Path, hours_ago: float) -> None:
    """Set the mtime of a run folder and everything in it."""
    stamp = 1_700_000_000.0 - hours_ago * HOUR
    for p in [*path.rglob("*"), path]:
        os.utime(p, (stamp, stamp))


@pytest.fixture
def runs_folder(finished_run, tmp_path, monkeypatch):
    """./runs with an older and a newer complete run, and two newer interrupted ones: one stopped
    mid-training (recipe, no result) and one killed while saving (result, no model card)."""
    runs = tmp_path / "runs"
    for name, hours_ago in (("older", 3), ("newer", 2)):
        shutil.copytree(finished_run, runs / name)
        _age(runs / name, hours_ago)
    (runs / "stopped").mkdir()
    shutil.copy(finished_run / "recipe.yaml", runs / "stopped" / "recipe.yaml")
    (runs / "stopped" / "checkpoints").mkdir()
    _age(runs / "stopped", 0)
    (runs / "saving").mkdir()
    for name in ("recipe.yaml", LORA_FILE):
        shutil.copy(finished_run / name, runs / "saving" / name)
    _age(runs / "saving", 1)
    (runs / "notes").mkdir()  # not a run folder: ignored
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return runs


def run_cli(monkeypatch, capsys, *args):
    """sdkit's real entry point, as a shell would call it."""
    from sdkit.cli import main

    monkeypatch.setattr(sys, "argv", ["sdkit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr()


def model_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("model:")]


NEWER_LINE = ("model: runs/newer (newest complete run in ./runs, skipping interrupted runs/stopped, runs/saving; "
              "--model to choose)")


def test_the_three_commands_as_typed_take_the_newest_complete_run(runs_folder, tiny_sd, tiny_clip, monkeypatch,
                                                                   capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("SDKIT_CLIP_MODEL", str(tiny_clip))  # eval's --clip-model default, from the environment
    Path("prompts.txt").write_text("# one prompt keeps this cheap\nphoto of a dog\n")

    code, out = run_cli(monkeypatch, capsys, "eval", "--prompts", "prompts.txt")
    assert code == 0, out.err
    assert model_lines(out.err) == [f"{NEWER_LINE}, beside its base model {tiny_sd}"]
    report = json.loads(Path("eval/report.json").read_text())
    assert [m["model"] for m in report["models"]] == ["runs/newer", str(tiny_sd)]  # the run, then its base
    assert report["models"][0]["loras"] and not report["models"][1]["loras"]
    assert report["settings"]["clip_model"] == str(tiny_clip)
    header = Path("eval/scores.csv").read_text().splitlines()[0].split(",")
    assert header == ["prompt", "newer", Path(tiny_sd).name]
    assert all(len(p["scores"]) == 2 for p in report["prompts"])

    code, out = run_cli(monkeypatch, capsys, "generate", "photo of a dog")
    assert code == 0, out.err
    assert model_lines(out.err) == [NEWER_LINE]
    png = Image.open("outputs/photo-of-a-dog-0.png")
    assert png.text["model"] == "runs/newer" and png.text["prompt"] == "photo of a dog"
    assert png.text["base_model"] == str(tiny_sd) and png.text["lora"].endswith(f"newer/{LORA_FILE}")

    code, out = run_cli(monkeypatch, capsys, "export", "--format", "mar")
    assert code == 0, out.err
    assert model_lines(out.err) == [NEWER_LINE]
    archive = Path("export/newer/model-store/newer.mar")  # the run's name: the folder and the model
    assert archive.is_file() and Path("export/newer/config/config.properties").is_file()
    assert any(name.endswith(LORA_FILE) for name in zipfile.ZipFile(archive).namelist())
    assert f"wrote {archive}" in out.out


def test_safetensors_export_goes_to_export_run_name(runs_folder, monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "export", "--format", "safetensors")
    assert code == 0, out.err
    assert Path(f"export/newer/{LORA_FILE}").is_file()
    code, out = run_cli(monkeypatch, capsys, "export", "--format", "safetensors", "--name", "dog-v1")
    assert code == 0, out.err
    assert Path(f"export/dog-v1/{LORA_FILE}").is_file()


def test_sdkit_model_wins_over_runs_and_model_flag_over_both(runs_folder, tiny_sd, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "runs/older")
    choice = choose_model(None)
    assert (choice.ref, choice.source) == ("runs/older", ENV_VAR)
    assert choice.line() == f"model: runs/older (from {ENV_VAR}; --model to choose another)"
    assert choose_model(str(tiny_sd)).ref == str(tiny_sd)
    monkeypatch.setenv(ENV_VAR, "./no/such/model")
    with pytest.raises(UserError, match=f"^{ENV_VAR}: folder './no/such/model' does not exist$"):
        choose_model(None)
    monkeypatch.setenv(ENV_VAR, "runs/older")

    code, out = run_cli(monkeypatch, capsys, "generate", "photo of a dog", "--steps", "2")
    assert code == 0, out.err
    assert model_lines(out.err) == [f"model: runs/older (from {ENV_VAR}; --model to choose another)"]
    assert Image.open("outputs/photo-of-a-dog-0.png").text["model"] == "runs/older"

    code, out = run_cli(monkeypatch, capsys, "generate", "photo of a dog", "--steps", "2", "--model", str(tiny_sd))
    assert code == 0, out.err
    assert model_lines(out.err) == [f"model: {tiny_sd} (--model)"]
    assert Image.open("outputs/photo-of-a-dog-0-2.png").text["model"] == str(tiny_sd)

    # eval: a default that is no run is scored alone; --model given once keeps today's single column
    monkeypatch.setenv(ENV_VAR, str(tiny_sd))
    assert models_to_compare(None) == [str(tiny_sd)]
    assert models_to_compare(["runs/newer"]) == ["runs/newer"]


def test_interrupted_runs_are_never_chosen(runs_folder):
    assert run_is_complete("runs/newer")
    assert not run_is_complete("runs/stopped") and not run_is_complete("runs/saving")
    shutil.rmtree("runs/newer")
    shutil.rmtree("runs/older")
    with pytest.raises(UserError, match=r"\./runs holds no complete training run \(interrupted: runs/stopped, "
                                        r"runs/saving\)"):
        choose_model(None)


@pytest.mark.parametrize("args", [
    ("generate", "photo of a dog"), ("eval", "--prompts", "prompts.txt"), ("export", "--format", "mar"),
    ("ui",),
])
def test_no_run_and_no_setting_exits_2_saying_how_to_pass_one(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    Path("prompts.txt").write_text("photo of a dog\n")
    code, out = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert out.err.count("\n") == 1
    assert out.err.startswith(f"error: --model: none given, {ENV_VAR} is not set and ./runs holds no complete "
                              "training run; pass --model")
