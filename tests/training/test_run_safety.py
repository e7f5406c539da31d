"""A run never dies of its validation images, and the shipped fp16 recipes train on a CPU."""

from __future__ import annotations

import io
from pathlib import Path

from helpers import fit_with, write_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_shipped_fp16_full_recipe_trains_and_samples_on_a_cpu(tiny_sd, image_folder, tmp_path):
    """Issue: `sdkit train recipes/sd15-lora.yaml method.type=full ...` on a CPU crashed at its first
    validation (Half and Float) with nothing saved."""
    from rich.console import Console

    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    out = tmp_path / "run"
    recipe = load_recipe(RECIPES / "sd15-lora.yaml", [
        f"model.pretrained={tiny_sd}", f"data.dataset={image_folder}", f"output_dir={out}", "method.type=full",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=1",
        "validation.every=1", "validation.steps=2", "logging.tensorboard=false"])
    assert recipe.train.mixed_precision == "fp16"
    log = io.StringIO()
    Trainer(recipe, console=Console(file=log, width=400)).fit()
    assert "fp16 needs a CUDA GPU and this machine has none: this run trains in fp32" in log.getvalue()
    assert "failed" not in log.getvalue()
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000001", "step-0000002"]
    assert "trains in fp32" in (out / "train.log").read_text()
    assert "- mixed precision no" in (out / "README.md").read_text()  # the card tells what ran, not what was asked


def test_a_failing_validation_is_logged_and_training_goes_on(tiny_sd, image_folder, tmp_path):
    from rich.console import Console

    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, image_folder, out, train={"max_steps": 4, "checkpoint_every": 2},
                          validation={"prompts": ["a red square"], "every": 2, "steps": 2})

    def broken_refiner():  # a validation that fails for real inside the trainer (a bad refiner, say)
        raise RuntimeError("the refiner is broken")

    def break_validation(trainer):
        trainer.refiner = broken_refiner

    log = io.StringIO()
    trainer = fit_with(Trainer(load_recipe(recipe), console=Console(file=log, width=400)), break_validation)
    assert trainer.state.step == 4 and (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-0000002" / "sdkit_state.json").is_file()  # saved before validating
    assert log.getvalue().count("failed (RuntimeError: the refiner is broken); training goes on") == 2
    run_log = (out / "train.log").read_text()
    assert run_log.count("Traceback (most recent call last)") == 2 and "broken_refiner" in run_log
    assert trainer.step.modules[0].training  # back in training mode after the failure
