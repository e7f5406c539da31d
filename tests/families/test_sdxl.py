"""SDXL through the shared training loop, on a tiny random-weight SDXL (and refiner):
it learns (full and LoRA, text encoders included), its results load in plain diffusers,
micro-conditioning sees each image's real size and crop, base + refiner sampling uses the
refiner, and resume after SIGKILL is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import check_resume_after_sigkill, fit_with, loss_fell, train_recipe, write_recipe

from sdkit.errors import UserError

REPO = Path(__file__).resolve().parents[2]

# The tiny UNet has attention only at its coarsest level, so attention-only LoRA barely moves
# a random network; adapters on the ResNet convolutions too make overfitting visible.
TINY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=3, generator=g, height=32, width=32, output_type="np").images[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=4, size=32)


# ----------------------------------------------------------------- family detection


def test_detects_sdxl_and_refiner_and_names_unsupported_pipelines(tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    from sdkit.families import detect_family

    assert detect_family(str(tiny_sdxl)) == "sdxl"
    assert detect_family(str(tiny_sdxl_refiner)) == "sdxl"
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline"):
        detect_family(str(other))


def test_refiner_is_refused_as_a_training_base(tiny_sdxl_refiner):
    from sdkit.families.sdxl import StableDiffusionXL
    from sdkit.recipe import ModelConfig

    with pytest.raises(UserError, match="refiner"):
        StableDiffusionXL.load(ModelConfig(pretrained=str(tiny_sdxl_refiner)))


def test_prompt_embeddings_match_the_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from sdkit.families.sdxl import StableDiffusionXL
    from sdkit.recipe import ModelConfig

    family = StableDiffusionXL.load(ModelConfig(pretrained=str(tiny_sdxl)))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    captions = ["a red square", "a blue circle on a green background"]
    with torch.no_grad():
        ours = family.encode_text(captions)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)


# ----------------------------------------------------------------- training


def test_lora_with_both_text_encoders_learns_and_loads_with_diffusers(tiny_sdxl, images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, tiny_sdxl, images, out, train={"max_steps": 100}, optim={"lr": 1e-2},
        method={"type": "lora", "rank": 8, "target_modules": TINY_LORA_TARGETS, "train_text_encoder": True},
    )
    trainer = train_recipe(recipe)
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"

    saved = load_file(out / "pytorch_lora_weights.safetensors")
    prefixes = {key.split(".")[0] for key in saved}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert hasattr(pipe.text_encoder, "peft_config") and hasattr(pipe.text_encoder_2, "peft_config")
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_full_finetune_learns_validates_with_refiner_and_loads(tiny_sdxl, tiny_sdxl_refiner, images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, tiny_sdxl, images, out, method={"type": "full"}, optim={"lr": 1e-3},
        train={"max_steps": 100},
        validation={"prompts": ["a red square"], "negative_prompt": "blurry", "every": 50, "steps": 2},
    )
    trainer = train_recipe(recipe, [f"model.refiner={tiny_sdxl_refiner}"])
    fell, first, last = loss_fell(trainer.loss_history, window=20)
    assert fell, f"loss did not fall: first {first:.4f} last {last:.4f}"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000050", "step-0000100"]
    assert (out / "samples" / "step-0000100" / "00-0.png").is_file()

    tuned = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert np.abs(generate(tuned) - generate(base)).max() > 1e-3


# ----------------------------------------------------------------- micro-conditioning

# (width, height) of each training image; at 32 px the shorter side is resized to 32.
SIZES = [(48, 32), (32, 64), (40, 40), (32, 32)]
# (top, left) of the centre crop in the resized image: 48x32 -> left 8, 32x64 -> top 16.
CENTER_CROPS = [(0, 8), (16, 0), (0, 0), (0, 0)]


def _record_time_ids(recipe_path, overrides=()):
    """Train, recording per step the batch indices/crops and the time_ids the UNet receives."""
    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    calls, received = [], []

    def hook(module, args, kwargs):
        received.append(kwargs["added_cond_kwargs"]["time_ids"].detach().cpu().clone())

    def record(trainer):
        compute = trainer.step.compute_loss

        def recording(batch):
            calls.append({"index": [int(i) for i in batch["index"]], "crop": batch["crop_top_left"].clone()})
            return compute(batch)

        trainer.family.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
        trainer.step.compute_loss = recording

    trainer = fit_with(Trainer(load_recipe(recipe_path, list(overrides))), record)
    dataset = trainer.data.dataset
    source = getattr(dataset, "dataset", dataset)  # the cache wraps the dataset
    originals = []
    for record in source.records:
        with Image.open(record.path) as image:
            originals.append((image.height, image.width))
    return calls, received, originals


@pytest.mark.parametrize("cached", [True, False], ids=["center-crop-cached", "random-crop-uncached"])
def test_micro_conditioning_gets_each_images_real_size_and_crop(tiny_sdxl, tmp_path, cached):
    from sdkit.quickstart.tiny import make_image_folder

    data = make_image_folder(tmp_path / "images", n=4, sizes=SIZES)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sdxl, data, out, train={"max_steps": 12, "batch_size": 2})
    random_crops = [] if cached else ["data.center_crop=false", "data.random_flip=true"]
    calls, received, originals = _record_time_ids(recipe, random_crops)
    assert len(calls) == len(received) == 12
    assert sorted(originals) == sorted((h, w) for w, h in SIZES)

    crops_of_wide = set()
    for call, ids in zip(calls, received):
        for row, index in enumerate(call["index"]):
            h, w = originals[index]
            top, left = ids[row, 2:4].tolist()
            assert ids[row, :2].tolist() == [h, w]  # the image's real size, not the target
            assert ids[row, 4:].tolist() == [32, 32]
            assert [top, left] == call["crop"][row].tolist()  # what the data pipeline cut
            assert 0 <= top <= 32 * h // min(h, w) - 32 and 0 <= left <= 32 * w // min(h, w) - 32
            if cached:
                assert (top, left) == CENTER_CROPS[SIZES.index((w, h))]
            if (w, h) == (48, 32):
                crops_of_wide.add(left)
    if not cached:
        assert len(crops_of_wide) > 1, "random crops should move across epochs"


# ----------------------------------------------------------------- VAE precision


def test_stock_vae_encodes_in_fp32_and_fp16_fix_vae_stays_fp16(tiny_sdxl, tmp_path):
    from diffusers import AutoencoderKL

    from sdkit.families.sdxl import StableDiffusionXL
    from sdkit.recipe import ModelConfig

    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    stock = StableDiffusionXL.load(ModelConfig(pretrained=str(tiny_sdxl)), dtype=torch.float16)
    assert stock.vae.config.force_upcast
    seen = []
    stock.vae.encoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    moments = stock.encode_images(pixels)
    assert seen == [torch.float32] and moments.dtype == torch.float32
    assert stock.vae.dtype == torch.float16  # back to fp16 afterwards

    fixed_dir = tmp_path / "vae-fp16-fix"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    vae.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix ships
    vae.save_pretrained(fixed_dir)
    fixed = StableDiffusionXL.load(ModelConfig(pretrained=str(tiny_sdxl), vae=str(fixed_dir)), dtype=torch.float16)
    assert not fixed.vae.config.force_upcast
    seen.clear()
    fixed.vae.encoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    assert fixed.encode_images(pixels).dtype == torch.float16 and seen == [torch.float16]


# ----------------------------------------------------------------- base + refiner


def test_base_plus_refiner_uses_the_refiner(tiny_sdxl, tiny_sdxl_refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sdkit.inference.sampling import make_images

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner)
    steps = {"base": 0, "refiner": 0}
    base.unet.register_forward_pre_hook(lambda m, a: steps.__setitem__("base", steps["base"] + 1))
    refiner.unet.register_forward_pre_hook(lambda m, a: steps.__setitem__("refiner", steps["refiner"] + 1))
    kwargs = dict(negative_prompt="blurry", steps=10, guidance=5.0, seed=3, width=32, height=32)

    alone = np.asarray(make_images(base, "a red square", **kwargs)[0], dtype=np.float32)
    assert steps == {"base": 10, "refiner": 0}
    steps.update(base=0)
    both = np.asarray(make_images(base, "a red square", refiner=refiner, refiner_fraction=0.8, **kwargs)[0],
                      dtype=np.float32)
    # Ensemble of experts: the base stops at 80% of the schedule, the refiner does the rest.
    assert steps == {"base": 8, "refiner": 2}
    assert np.abs(both - alone).max() > 1.0


# ----------------------------------------------------------------- resume


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_sdxl, images, tmp_path):
    steps = {"max_steps": 16, "checkpoint_every": 4, "checkpoints_keep": 2, "batch_size": 2}
    check_resume_after_sigkill(tmp_path, tiny_sdxl, images, steps)


# ----------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["sdxl-lora", "sdxl-full"])
def test_shipped_recipe_dry_run_works_offline(name):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdkit", "train", str(REPO / "recipes" / f"{name}.yaml"), "--dry-run"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "family: sdxl" in result.stdout
    assert "madebyollin/sdxl-vae-fp16-fix" in result.stdout


def test_tiny_recipe_trains(tiny_sdxl, images, tmp_path):
    out = tmp_path / "run"
    train_recipe(REPO / "recipes" / "tiny-sdxl-lora.yaml",
                 [f"model.pretrained={tiny_sdxl}", f"data.dataset={images}", f"output_dir={out}",
                  "train.max_steps=4", "train.checkpoint_every=2", "validation.every=2", "logging.tensorboard=false"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints").is_dir() and (out / "samples" / "step-0000004").is_dir()
