"""Checkpoints remember the run's shape: a resume whose recipe changes it is one line, exit 2,
before any weights load; family rules reject a recipe before anything loads."""

import json
import os
import subprocess
import sys

import pytest

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError


def sdkit(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sdkit", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def checkpointed(tiny_sd, tmp_path_factory):
    """A finished LoRA run of rank 4 with checkpoints at steps 2 and 4 of 6."""
    from sdkit.quickstart.tiny import make_image_folder

    tmp = tmp_path_factory.mktemp("ckpt")
    images = make_image_folder(tmp / "images", n=4, size=32)
    out = tmp / "run"
    recipe = write_recipe(tmp, tiny_sd, images, out, train={"max_steps": 6, "checkpoint_every": 2, "resume": "auto"})
    train_recipe(recipe)
    return recipe, out


def test_checkpoint_records_the_run_shape(checkpointed):
    _, out = checkpointed
    state = json.loads((out / "checkpoints" / "checkpoint-0000004" / "sdkit_state.json").read_text())
    shape = state["shape"]
    assert shape["model.family"] == "sd" and shape["method.type"] == "lora"
    assert shape["method.rank"] == 4 and shape["method.alpha"] == 4 and shape["processes"] == 1
    assert shape["method.target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert shape["data.resolution"] == 32 and shape["train.batch_size"] == 4


@pytest.mark.parametrize("override, key", [("method.rank=8", "method.rank"), ("train.batch_size=2", "train.batch_size"),
                                           ("method.type=full", "method.type"), ("data.buckets=true", "data.buckets")])
def test_resume_with_a_changed_shape_is_one_line_before_loading(checkpointed, override, key):
    recipe, _ = checkpointed
    result = sdkit("train", recipe, override, "train.max_steps=8")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}:"), result.stderr[-2000:]
    assert "checkpoint-0000004" in errors[0]
    assert "loading" not in result.stderr  # refused before the model loaded


def test_resume_with_the_same_shape_continues(checkpointed):
    recipe, out = checkpointed
    trainer = train_recipe(recipe, ["train.max_steps=8", "optim.lr=5e-4"])  # lr is not part of the shape
    assert trainer.state.step == 8 and len(trainer.loss_history) == 4  # 4 more steps from checkpoint 4


def test_sd3_resolution_not_a_multiple_of_16_exits_2_before_loading(tiny_sd3, image_folder, tmp_path):
    recipe = write_recipe(tmp_path, tiny_sd3, image_folder, tmp_path / "run")
    result = sdkit("train", recipe, "data.resolution=520")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: command line: data.resolution: sd3 models need a multiple of 16, got 520"]
    assert not (tmp_path / "run").exists()


def test_family_rules_apply_to_hub_models_when_the_family_is_given(tmp_path):
    from sdkit.recipe import recipe_from_dict

    data = {"model": {"pretrained": "some-org/an-sd3-model", "family": "sd3"}, "data": {"dataset": "a/b", "resolution": 520},
            "train": {"max_steps": 1, "snr_gamma": 5.0}, "output_dir": str(tmp_path)}
    with pytest.raises(UserError) as err:
        recipe_from_dict(data, "r.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # every problem at once, one line each
    assert lines[0].startswith("r.yaml: data.resolution:") and "16" in lines[0]
    assert lines[1].startswith("r.yaml: train.snr_gamma:") and "flow" in lines[1]


def test_plan_refuses_what_the_family_refuses(tiny_sd3):
    from sdkit.plan.estimate import estimate_peak
    from sdkit.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"pretrained": "stabilityai/stable-diffusion-3-medium-diffusers"},
                               "data": {"dataset": "a/b", "resolution": 520}, "train": {"max_steps": 1},
                               "output_dir": "runs/x"})
    with pytest.raises(UserError, match="data.resolution: sd3 models need a multiple of 16"):
        estimate_peak(recipe)
