"""The training loop on tiny SD 1.x / 2.x models: it learns, its results load in diffusers,
resume is exact, and two processes train one model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import check_resume_after_sigkill, loss_fell, train_recipe, train_two_cpu_ranks, write_recipe


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    image = pipe("a red square", num_inference_steps=3, generator=g, height=32, width=32, output_type="np").images
    return image[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=4, size=32)


@pytest.mark.parametrize("base", ["tiny_sd", "tiny_sd2"])
def test_lora_learns_and_loads_with_diffusers(base, request, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = request.getfixturevalue(base)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, model, images, out, train={"max_steps": 150}, optim={"lr": 3e-3},
                          method={"type": "lora", "rank": 8})
    trainer = train_recipe(recipe)
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "README.md").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-3
    # The LoRA as loaded equals the LoRA as trained.
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(trainer.trainable_state())


@pytest.mark.parametrize("base", ["tiny_sd", "tiny_sd2"])
def test_full_finetune_learns_and_loads_with_diffusers(base, request, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = request.getfixturevalue(base)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, model, images, out, method={"type": "full"}, optim={"lr": 1e-3},
                          train={"max_steps": 120, "ema": True, "ema_decay": 0.9},
                          validation={"prompts": ["a red square"], "every": 60, "steps": 2})
    trainer = train_recipe(recipe)
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000060", "step-0000120"]

    tuned = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base_pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    assert tuned.scheduler.config.prediction_type == base_pipe.scheduler.config.prediction_type
    assert np.abs(generate(tuned) - generate(base_pipe)).max() > 1e-3


def test_v_prediction_is_read_from_the_scheduler(tiny_sd, tiny_sd2):
    from sdkit.training.objectives import DDPMObjective
    from sdkit.recipe import TrainConfig
    from sdkit.inference.loading import read_model_index  # noqa: F401  (import check)

    cfg = TrainConfig(max_steps=1)
    sd1 = json.loads((Path(tiny_sd) / "scheduler" / "scheduler_config.json").read_text())
    sd2 = json.loads((Path(tiny_sd2) / "scheduler" / "scheduler_config.json").read_text())
    assert DDPMObjective(sd1, cfg).prediction_type == "epsilon"
    assert DDPMObjective(sd2, cfg).prediction_type == "v_prediction"


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_sd, images, tmp_path):
    steps = {"max_steps": 40, "checkpoint_every": 10, "checkpoints_keep": 2, "batch_size": 2,
             "gradient_accumulation": 2}
    out = check_resume_after_sigkill(tmp_path, tiny_sd, images, steps)
    # Rotation kept at most 2 complete checkpoints.
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) <= 2


def test_incomplete_checkpoint_is_never_resumed(tiny_sd, images, tmp_path):
    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import find_resume_checkpoint

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, images, out, train={"max_steps": 4, "checkpoint_every": 2, "resume": "auto"})
    train_recipe(recipe)
    # A save that crashed midway leaves only a temporary folder or one without the state file.
    (out / "checkpoints" / ".tmp-checkpoint-0000006").mkdir()
    (out / "checkpoints" / "checkpoint-0000008").mkdir()
    assert find_resume_checkpoint(load_recipe(recipe)).name == "checkpoint-0000002"


@pytest.mark.slow
def test_two_processes_shard_data_and_agree_on_weights(tiny_sd, tmp_path):
    from sdkit.quickstart.tiny import make_image_folder

    data = make_image_folder(tmp_path / "images", n=8, size=32)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, data, out, train={"max_steps": 6, "batch_size": 2})
    results, seen = train_two_cpu_ranks(tmp_path, recipe, port=29517)
    assert all(s["world"] == 2 for s in seen)
    first_epoch = [set(s["seen"][:4]) for s in seen]  # 8 images, 2 ranks x batch 2 x 2 batches per epoch
    assert not first_epoch[0] & first_epoch[1], "ranks saw the same images"
    assert first_epoch[0] | first_epoch[1] == set(range(8))
    w0 = load_file(results / "weights-0.safetensors")
    w1 = load_file(results / "weights-1.safetensors")
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_sdkit_train_relaunches_through_accelerate(tiny_sd, images, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n"
                      "main_process_port: 29518\ndynamo_config: {}\n")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, images, out, train={"max_steps": 3, "batch_size": 2})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdkit", "train", str(recipe), "--accelerate-config", str(config)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching:" in result.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_memory_savers_and_loss_options_train(tiny_sd, images, tmp_path):
    """8-bit AdamW, bf16 autocast, gradient checkpointing, min-SNR, noise offset, warm-up, TensorBoard."""
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, tiny_sd, images, out,
        train={"max_steps": 6, "mixed_precision": "bf16", "gradient_checkpointing": True, "snr_gamma": 5.0,
               "noise_offset": 0.05},
        optim={"name": "adamw8bit", "lr_scheduler": "cosine", "warmup_steps": 2},
        logging={"tensorboard": True, "every": 2},
    )
    trainer = train_recipe(recipe)
    assert trainer.state.step == 6 and all(np.isfinite(trainer.loss_history))
    assert type(trainer.step.optimizer.optimizer).__name__ == "AdamW8bit"
    assert trainer.family.denoiser.is_gradient_checkpointing
    lora = trainer.trainable_state()
    assert all(v.dtype == torch.float32 for v in lora.values())  # adapters train in fp32 under bf16
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_lora_beyond_attention_loads_completely(tiny_sd, images, tmp_path):
    """Every trained adapter comes back in diffusers, also for targets outside attention."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out = tmp_path / "run"
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
    recipe = write_recipe(tmp_path, tiny_sd, images, out, train={"max_steps": 3},
                          method={"type": "lora", "rank": 4, "target_modules": targets})
    trained = train_recipe(recipe).trainable_state()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(out, adapter_name="run")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="run")
    assert len(loaded) == len(trained) and any("ff.net.2" in k for k in loaded)
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
