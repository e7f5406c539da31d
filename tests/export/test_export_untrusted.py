"""Exporting someone else's model folder: nothing outside it is read or written, no pickle is
loaded, and --force replaces only what the export itself writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdkit.errors import UserError
from sdkit.export.run import export_command

SECRET = "password=hunter2\n"


@pytest.fixture
def home(tiny_sd, tmp_path):
    """A 'home folder': a secret beside an untrusted model folder (a copy of the tiny model)."""
    (tmp_path / "Documents").mkdir()
    (tmp_path / "Documents" / "notes.txt").write_text(SECRET)
    model = tmp_path / "cloned-model"
    shutil.copytree(tiny_sd, model)
    return tmp_path, model


def _index(model: Path, **components):
    index = json.loads((model / "model_index.json").read_text())
    index.update(components)
    (model / "model_index.json").write_text(json.dumps(index))


def _all_bytes(folder: Path) -> bytes:
    data = b""
    for path in folder.rglob("*"):
        if path.is_file():
            data += path.read_bytes()
            if path.suffix == ".mar":
                with zipfile.ZipFile(path) as z:
                    data += b"".join(z.read(n) for n in z.namelist())
    return data


@pytest.mark.parametrize("archive_format", ["no-archive", "default"])
def test_a_component_named_like_a_path_is_refused(home, archive_format):
    root, model = home
    _index(model, **{"../Documents": ["diffusers", "UNet2DConditionModel"]})
    out = root / "bucket"
    with pytest.raises(UserError, match=r"names a component '\.\./Documents'"):
        export_command(format="mar", model=str(model), out=str(out), archive_format=archive_format)
    assert not out.exists() or SECRET.encode() not in _all_bytes(out)


def test_a_symlink_out_of_the_model_is_refused_and_not_packed(home):
    root, model = home
    (model / "unet" / "NOTICE.txt").symlink_to(root / "Documents" / "notes.txt")
    out = root / "bucket"
    for fmt in ("mar", "safetensors"):
        with pytest.raises(UserError, match=r"unet/NOTICE.txt' .* link out of the model folder"):
            export_command(format=fmt, model=str(model), out=str(out / fmt), archive_format="default")
    assert not out.exists() or SECRET.encode() not in _all_bytes(out)


def test_a_component_through_a_symlinked_folder_never_writes_outside_out(home):
    """The reported attack: a component path through a symlinked folder overwrote a file outside --out."""
    root, model = home
    target = root / "Documents" / "notes.txt"
    (model / "s").symlink_to(root / "Documents", target_is_directory=True)
    _index(model, **{"s/../../Documents": ["diffusers", "UNet2DConditionModel"]})
    with pytest.raises(UserError, match="not a plain folder name"):
        export_command(format="mar", model=str(model), out=str(root / "bucket"), archive_format="no-archive")
    # A component folder that is itself a link out is refused the same way.
    _index(model, **{"s/../../Documents": None})
    os.rename(model / "text_encoder", root / "elsewhere")
    (model / "text_encoder").symlink_to(root / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match="'text_encoder' .* link out of the model folder"):
        export_command(format="mar", model=str(model), out=str(root / "bucket"), archive_format="no-archive")
    assert target.read_text() == SECRET


def test_pickled_weights_are_refused_in_one_line(home):
    import torch
    from safetensors.torch import load_file

    root, model = home
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdkit", "export", "--format", "safetensors", "--model", str(model),
                             "--out", str(root / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"model: {model} (--model)",  # which model the command took (sdkit.inference.default_model)
        f"error: --model: '{model}' has only pickled weights for vae (vae/diffusion_pytorch_model.bin); "
        "sdkit loads no pickle (it can run code): convert them to safetensors first"]
    with pytest.raises(UserError, match="only pickled weights for vae"):
        export_command(format="mar", model=str(model), out=str(root / "bucket"))


def test_force_replaces_only_what_the_export_writes(tiny_sd, tmp_path, monkeypatch):
    out = tmp_path / "shared"
    (out / "checkpoints" / "checkpoint-0000010").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-0000010" / "sdkit_state.json").write_text("{}")
    (out / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="pass --force"):
        export_command(format="safetensors", model=str(tiny_sd), out=str(out))
    export_command(format="safetensors", model=str(tiny_sd), out=str(out), force=True)
    export_command(format="safetensors", model=str(tiny_sd), out=str(out), force=True, dtype="fp32")  # again
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "checkpoints" / "checkpoint-0000010" / "sdkit_state.json").is_file()
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left

    here = tmp_path / "here"  # --out . works
    here.mkdir()
    (here / "keep.txt").write_text("x")
    monkeypatch.chdir(here)
    export_command(format="safetensors", model=str(tiny_sd), out=".", force=True)
    assert (here / "model_index.json").is_file() and (here / "keep.txt").read_text() == "x"


def test_leftovers_of_a_killed_export_are_cleaned_by_the_next(tiny_sd, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the export that was SIGKILLed
    out = tmp_path / "bucket"
    staging = out / f".tiny.staging-{dead.pid}-k3j2x9/content/pipeline"
    staging.mkdir(parents=True)
    (staging / "weights.safetensors").write_bytes(b"0" * 4096)
    (out / "model-store").mkdir()
    half = out / "model-store" / f".tiny.mar.tmp-{dead.pid}-0a1b2c3d"
    half.write_bytes(b"half an archive")
    alive = out / f".other.staging-{os.getpid()}-abc"  # a running export's: left alone
    alive.mkdir()
    export_command(format="mar", model=str(tiny_sd), out=str(out), name="tiny")
    assert sorted(p.name for p in out.iterdir()) == sorted([".other.staging-%d-abc" % os.getpid(), "config",
                                                             "model-store"])
    assert [p.name for p in (out / "model-store").iterdir()] == ["tiny.mar"]
