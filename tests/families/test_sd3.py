"""SD3 through the shared training loop, on a tiny random-weight SD3 pipeline: prompt
embeddings as the pipeline builds them (with and without T5), flow matching learns (full and
LoRA), results load in plain diffusers, and resume after SIGKILL is exact."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import check_resume_after_sigkill, loss_fell, train_recipe, write_recipe

REPO = Path(__file__).resolve().parents[2]

# The tiny MMDiT (2 blocks, width 32) barely moves with attention-only adapters; adapters on
# its feed-forward, modulation and in/out projections too make overfitting visible.
TINY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "proj_out", "ff.net.0.proj", "ff.net.2", "linear", "pos_embed.proj"]


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=3, generator=g, height=32, width=32, output_type="np").images[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=4, size=32)


@pytest.fixture(scope="module")
def sd3_sharp(tiny_sd3, tmp_path_factory):
    """tiny_sd3 with a VAE whose posterior is sharp, as a trained VAE's is.

    The random tiny VAE has log-variance ~0, so a latent drawn from it is mostly noise
    (std ~1.5 after SD3's scaling, three times the signal): flow matching then has nothing
    to overfit. Lowering the log-variance bias leaves a near-deterministic posterior.
    """
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("sd3_sharp") / "model"
    shutil.copytree(tiny_sd3, path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] -= 12.0  # SD3's VAE has no quant_conv
    vae.save_pretrained(path / "vae")
    return path


# ----------------------------------------------------------------- family and conditioning


def test_detects_sd3(tiny_sd3):
    from sdkit.families import detect_family, family_class

    assert detect_family(str(tiny_sd3)) == "sd3"
    assert family_class("sd3").objective == "flow"


@pytest.mark.parametrize("load_t5", [True, False], ids=["with-t5", "without-t5"])
def test_prompt_embeddings_match_the_pipeline(tiny_sd3, load_t5):
    from diffusers import StableDiffusion3Pipeline

    from sdkit.families.sd3 import StableDiffusion3
    from sdkit.recipe import ModelConfig

    family = StableDiffusion3.load(ModelConfig(pretrained=str(tiny_sd3), load_t5=load_t5))
    assert (family.t5 is None) == (not load_t5)
    assert (family.t5 in family.frozen_modules()) == load_t5
    extra = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **extra)
    captions = ["a red square", "a blue circle on a green background"]
    with torch.no_grad():
        ours = family.encode_text(captions)
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, captions, captions, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=StableDiffusion3.t5_max_length,
        )
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    t5_part = ours["prompt_embeds"][:, 77:]
    assert t5_part.shape[1] == StableDiffusion3.t5_max_length
    assert (t5_part.abs().sum() == 0) == (not load_t5)


def test_latents_are_shifted_and_scaled(sd3_sharp):
    from sdkit.families.sd3 import StableDiffusion3
    from sdkit.recipe import ModelConfig

    family = StableDiffusion3.load(ModelConfig(pretrained=str(sd3_sharp), load_t5=False))
    config = family.vae.config
    mean = torch.randn(1, 16, 4, 4)
    moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # no posterior noise
    latents = family.sample_latents(moments, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (mean - config.shift_factor) * config.scaling_factor)


# ----------------------------------------------------------------- training


def test_lora_with_text_encoders_learns_and_loads_with_diffusers(sd3_sharp, images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sdkit.training.objectives import FlowMatchingObjective

    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, sd3_sharp, images, out, train={"max_steps": 200}, optim={"lr": 1e-2},
        method={"type": "lora", "rank": 16, "target_modules": TINY_LORA_TARGETS, "train_text_encoder": True},
    )
    trainer = train_recipe(recipe)
    assert isinstance(trainer.step.objective, FlowMatchingObjective)
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"

    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in saved} == {"transformer", "text_encoder", "text_encoder_2"}

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_sharp)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert hasattr(pipe.text_encoder, "peft_config") and hasattr(pipe.text_encoder_2, "peft_config")
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_default_lora_targets_cover_both_attention_streams(tiny_sd3, images, tmp_path):
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path, tiny_sd3, images, out, train={"max_steps": 2}))
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    for target in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"):
        assert any(f"{target}.lora_A" in k for k in keys), target


def test_full_finetune_learns_validates_and_loads_with_diffusers(sd3_sharp, images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, sd3_sharp, images, out, method={"type": "full"}, optim={"lr": 1e-3},
        train={"max_steps": 150, "timestep_sampling": "logit_normal", "loss_weighting": "none"},
        validation={"prompts": ["a red square"], "negative_prompt": "blurry", "every": 75, "steps": 2},
    )
    trainer = train_recipe(recipe)
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000075", "step-0000150"]

    tuned = StableDiffusion3Pipeline.from_pretrained(out)
    assert tuned.text_encoder_3 is not None
    base = StableDiffusion3Pipeline.from_pretrained(sd3_sharp)
    assert np.abs(generate(tuned) - generate(base)).max() > 1e-3


def test_training_without_t5(tiny_sd3, images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd3, images, out, train={"max_steps": 4},
                          validation={"prompts": ["a red square"], "every": 4, "steps": 2})
    trainer = train_recipe(recipe, ["model.load_t5=false"])
    assert trainer.family.t5 is None
    assert (out / "samples" / "step-0000004" / "00-0.png").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(out)
    assert np.isfinite(generate(pipe)).all()


# ----------------------------------------------------------------- resume


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_sd3, images, tmp_path):
    steps = {"max_steps": 16, "checkpoint_every": 4, "checkpoints_keep": 2, "batch_size": 2}
    check_resume_after_sigkill(tmp_path, tiny_sd3, images, steps)


def test_full_resume_after_sigkill_matches_uninterrupted_run(tiny_sd3, images, tmp_path):
    steps = {"max_steps": 12, "checkpoint_every": 4, "batch_size": 2}
    check_resume_after_sigkill(tmp_path, tiny_sd3, images, steps, method={"type": "full"})


# ----------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["sd3-lora", "sd3-full"])
def test_shipped_recipe_dry_run_works_offline(name):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdkit", "train", str(REPO / "recipes" / f"{name}.yaml"), "--dry-run"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "family: sd3" in result.stdout
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in result.stdout


def test_tiny_recipe_trains(tiny_sd3, images, tmp_path):
    out = tmp_path / "run"
    train_recipe(REPO / "recipes" / "tiny-sd3-lora.yaml",
                 [f"model.pretrained={tiny_sd3}", f"data.dataset={images}", f"output_dir={out}",
                  "train.max_steps=4", "train.checkpoint_every=2", "validation.every=2", "logging.tensorboard=false"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "step-0000004").is_dir()
    assert json.loads((out / "checkpoints" / "checkpoint-0000002" / "sdkit_state.json").read_text())["family"] == "sd3"
