"""Prodigy and schedule-free AdamW train and resume exactly; text_encoder_lr sets its own rate."""

import math

import pytest

from helpers import check_resume_after_sigkill, train_recipe, write_recipe


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=4, size=32)


@pytest.mark.parametrize("optim", [
    {"name": "prodigy", "lr": 1.0},
    {"name": "adamw_schedulefree", "lr": 1e-3, "warmup_steps": 2},
])
def test_optimizer_trains_and_resumes_exactly(optim, tiny_sd, images, tmp_path):
    """Checkpoints every 3 steps with validation images between: schedule-free switches to its
    averaged weights for both, and the resumed run still ends bit-for-bit where the straight one does."""
    steps = {"max_steps": 6, "checkpoint_every": 3, "batch_size": 2}
    out = check_resume_after_sigkill(tmp_path, tiny_sd, images, steps, optim=optim,
                                     validation={"prompts": ["a red square"], "every": 2, "steps": 2})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_schedule_free_saves_its_averaged_weights(tiny_sd, images, tmp_path):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, tiny_sd, images, tmp_path / "run", train={"max_steps": 4},
                          optim={"name": "adamw_schedulefree", "lr": 1e-2})
    trainer = train_recipe(recipe)
    assert all(math.isfinite(x) for x in trainer.loss_history)
    optimizer = trainer.step.optimizer.optimizer
    assert optimizer.param_groups[0]["train_mode"]  # back in train mode after the final save
    saved = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    training = trainer.trainable_state()  # the point gradients are taken at, not the average
    optimizer.eval()
    averaged = trainer.trainable_state()
    key = next(k for k in training if "lora_B" in k)
    saved_key = next(k for k in saved if k.endswith(key))
    assert (saved[saved_key] - averaged[key]).abs().max() < 1e-6
    assert (training[key] - averaged[key]).abs().max() > 1e-6


def test_text_encoder_lr_is_its_own_group(tiny_sd, images, tmp_path):
    recipe = write_recipe(tmp_path, tiny_sd, images, tmp_path / "run", train={"max_steps": 1},
                          method={"type": "lora", "train_text_encoder": True},
                          optim={"lr": 1e-3, "text_encoder_lr": 5e-5})
    trainer = train_recipe(recipe)
    groups = trainer.step.optimizer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-5]
    assert len(groups[1]["params"]) > 0


def test_text_encoder_lr_needs_a_trained_text_encoder(tiny_sd, images, tmp_path):
    from sdkit.errors import UserError
    from sdkit.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_sd, images, tmp_path / "run", optim={"text_encoder_lr": 5e-5})
    with pytest.raises(UserError, match="optim.text_encoder_lr"):
        load_recipe(recipe)
