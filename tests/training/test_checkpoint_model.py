"""A checkpoint of a run is a model: `--model RUN/checkpoints/checkpoint-N` loads, in the consumers
that load models (sdkit.inference, export), exactly the weights the checkpoint holds."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError


@pytest.fixture(scope="module")
def runs(tiny_sd, tmp_path_factory):
    """A LoRA run of 3 steps (checkpoints 1 and 2) and a full fine-tune of 2 steps (checkpoint 1)."""
    from sdkit.quickstart.tiny import make_image_folder

    tmp = tmp_path_factory.mktemp("ckpt_model")
    images = make_image_folder(tmp / "images", n=4, size=32)
    lora = write_recipe(tmp, tiny_sd, images, tmp / "lora", train={"max_steps": 3, "checkpoint_every": 1})
    full = write_recipe(tmp, tiny_sd, images, tmp / "full", method={"type": "full"},
                        train={"max_steps": 2, "checkpoint_every": 1})
    train_recipe(lora)
    train_recipe(full)
    return tmp / "lora", tmp / "full"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def checkpoint(run, step: int):
    return run / "checkpoints" / f"checkpoint-{step:07d}"


def test_lora_checkpoint_loads_its_adapters_into_the_pipeline(runs, cache, capsys):
    from peft.utils import get_peft_model_state_dict

    from sdkit.inference.loading import resolve_model
    from sdkit.inference.sampling import load_pipeline

    lora_run, _ = runs
    for step in (1, 2):
        ckpt = checkpoint(lora_run, step)
        pipe, _, info = load_pipeline(str(ckpt))
        assert info.family == "sd" and len(info.loras) == 1 and info.loras[0].startswith(str(cache))
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name="lora0")
        saved = load_file(str(ckpt / "trainable_0.safetensors"))
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved), f"checkpoint {step} loaded other weights"
    assert capsys.readouterr().err.count("building the model of") == 2
    again = resolve_model(str(checkpoint(lora_run, 2)))  # the second use reads the cache, builds nothing
    assert again.checkpoint == str(checkpoint(lora_run, 2)) and again.run_dir == str(lora_run)
    assert "building" not in capsys.readouterr().err


def test_full_checkpoint_is_a_pipeline_with_its_weights(runs, cache):
    from sdkit.inference.sampling import load_pipeline

    _, full_run = runs
    ckpt = checkpoint(full_run, 1)
    pipe, _, info = load_pipeline(str(ckpt), dtype="fp32")
    assert info.base.startswith(str(cache)) and info.loras == []
    saved = load_file(str(ckpt / "trainable_0.safetensors"))
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], saved[k]) for k in saved)
    final = load_pipeline(str(full_run), dtype="fp32")[0].unet.state_dict()
    assert not all(torch.equal(unet[k], final[k]) for k in saved)  # step 1 is not the result of step 2


def test_export_of_a_checkpoint_names_it(runs, tmp_path):
    from sdkit.export.run import export_command

    lora_run, _ = runs
    written = export_command("safetensors", str(checkpoint(lora_run, 1)), out=str(tmp_path / "out"),
                             lora_format="kohya")
    assert [p.name for p in written] == ["lora-checkpoint-0000001.safetensors"]
    assert load_file(str(written[0]))  # a kohya file with the checkpoint's adapters


def test_damaged_or_moved_checkpoint_is_one_line(runs, tmp_path):
    from sdkit.inference.loading import resolve_model

    lora_run, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("cache", "logs", "samples"))
    ckpt = checkpoint(copy, 2)
    data = bytearray((ckpt / "trainable_0.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "trainable_0.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^--model: checkpoint .*checkpoint-0000002 is damaged: trainable_0"):
        resolve_model(str(ckpt))
    moved = tmp_path / "checkpoint-0000001"
    shutil.copytree(checkpoint(copy, 1), moved)
    with pytest.raises(UserError, match="is not inside its run folder"):
        resolve_model(str(moved))
