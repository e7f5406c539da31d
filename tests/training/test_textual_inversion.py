"""Textual inversion on tiny models: it learns, only the new embedding rows change, its files
load in diffusers and in sdkit's own generate (same image), resume is exact, SDXL writes both
CLIP encoders' vectors, and captions without the token are refused in one line."""

import numpy as np
import pytest
import torch

from helpers import check_resume_after_sigkill, fit_with, read_safetensors, train_recipe, write_recipe
from sdkit.errors import UserError

TOKEN = "<shp>"
METHOD = {"type": "textual_inversion", "placeholder_token": TOKEN, "initializer_token": "shape", "num_vectors": 2}
PROMPT = f"a {TOKEN} on a background"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=4, size=32)


def _data(images):
    return {"dataset": str(images), "caption_prefix": f"{TOKEN} "}


def fixed_loss(trainer, draws: int = 8) -> float:
    """The step's loss on the 4 images with the same noise and timesteps every time it is asked:
    a tiny random UNet's loss is mostly noise, and only the conditioning moves here."""
    step = trainer.step
    saved = step.noise_rng.get_state()
    step.noise_rng.manual_seed(1234)
    batch = next(iter(trainer.data.loader))
    with torch.no_grad():
        loss = sum(step.compute_loss(batch).item() for _ in range(draws)) / draws
    step.noise_rng.set_state(saved)
    return loss


@pytest.fixture(scope="module")
def sd_run(tiny_sd, images, tmp_path_factory):
    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    root = tmp_path_factory.mktemp("ti")
    recipe = write_recipe(root, tiny_sd, _data(images), root / "run", method=METHOD, optim={"lr": 0.05},
                          train={"max_steps": 30})
    losses = []
    trainer = Trainer(load_recipe(recipe))
    fit_with(trainer, lambda t: losses.append(fixed_loss(t)))
    losses.append(fixed_loss(trainer))
    return trainer, root / "run", losses


def _image(pipe, prompt=PROMPT):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_learns_and_only_the_new_rows_train(sd_run, tiny_sd):
    from transformers import CLIPTextModel

    trainer, run, (before, after) = sd_run
    # Only the conditioning moves, so a tiny random UNet's loss moves little: measured 1.168 -> 1.162.
    assert after < before - 2e-3, f"loss on the training images did not fall: {before:.4f} -> {after:.4f}"
    encoder = trainer.family.text_encoders[0]
    base = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    trained_rows = encoder.get_input_embeddings()
    assert torch.equal(trained_rows.base.weight, base.get_input_embeddings().weight)  # old rows bit-equal
    assert trainer.step.params == [trained_rows.added] and trained_rows.added.shape == (2, 32)
    assert all(not p.requires_grad for p in trainer.family.denoiser.parameters())
    card = (run / "README.md").read_text()
    assert "Textual inversion" in card and TOKEN in card


def test_files_load_in_diffusers_and_in_sdkit_generate_alike(sd_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from sdkit.inference.sampling import load_pipeline

    _, run, _ = sd_run
    tensors, _ = read_safetensors(run / "learned_embeds.safetensors")
    a1111, meta = read_safetensors(run / "shp.safetensors")
    assert list(tensors) == [TOKEN] and list(a1111) == ["emb_params"] and meta["sdkit_token"] == TOKEN
    assert torch.equal(tensors[TOKEN], a1111["emb_params"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    base = _image(pipe)
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    with_embedding = _image(pipe)
    assert np.abs(with_embedding - base).max() > 1e-3  # the embedding changes the image
    ours, _, info = load_pipeline(str(tiny_sd), device="cpu", embeddings=(str(run / "shp.safetensors"),))
    assert info.embeddings == [str(run / "shp.safetensors")]
    assert np.abs(_image(ours) - with_embedding).max() < 1e-5


@pytest.mark.slow
def test_resumes_exactly_after_sigkill(tiny_sd, images, tmp_path):
    check_resume_after_sigkill(tmp_path, tiny_sd, _data(images), {"max_steps": 6, "checkpoint_every": 3},
                               method=METHOD, optim={"lr": 0.05})


def test_sdxl_writes_clip_l_and_clip_g(tiny_sdxl, images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdkit.inference.sampling import load_pipeline

    recipe = write_recipe(tmp_path, tiny_sdxl, _data(images), tmp_path / "run", method={**METHOD, "num_vectors": 1},
                          optim={"lr": 0.05}, train={"max_steps": 2})
    trainer = train_recipe(recipe)
    widths = [enc.get_input_embeddings().weight.shape[1] for enc in trainer.family.text_encoders]
    a1111, _ = read_safetensors(tmp_path / "run" / "shp.safetensors")
    assert {k: tuple(v.shape) for k, v in a1111.items()} == {"clip_l": (1, widths[0]), "clip_g": (1, widths[1])}
    first, _ = read_safetensors(tmp_path / "run" / "learned_embeds.safetensors")
    second, _ = read_safetensors(tmp_path / "run" / "learned_embeds_2.safetensors")
    assert torch.equal(first[TOKEN], a1111["clip_l"]) and torch.equal(second[TOKEN], a1111["clip_g"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_textual_inversion(first[TOKEN], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(second[TOKEN], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    ours, _, _ = load_pipeline(str(tiny_sdxl), device="cpu", embeddings=(str(tmp_path / "run"),))
    assert np.abs(_image(ours) - _image(pipe)).max() < 1e-5


def test_captions_without_the_token_are_one_line(tiny_sd, images, tmp_path):
    from sdkit.recipe import load_recipe
    from sdkit.training.build import plan_data

    recipe = load_recipe(write_recipe(tmp_path, tiny_sd, images, tmp_path / "run", method=METHOD))
    with pytest.raises(UserError, match=r"method.placeholder_token: 4 of 4 captions lack '<shp>'"):
        plan_data(recipe, "sd", progress=False)
