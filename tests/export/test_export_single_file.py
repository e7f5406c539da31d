"""Single-file export (`sdkit export --format safetensors --single-file`): the original SD/SDXL key
layout that A1111, ComfyUI and diffusers' `from_single_file` read, checked on tiny models with SD's
real block structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import pipe_image, read_safetensors
from sdkit.errors import UserError
from sdkit.export.run import export_command
from sdkit.quickstart import tiny


def _export(model, out, **kwargs):
    return export_command(format="safetensors", model=str(model), out=str(out), **kwargs)


# ---------------------------------------------------------------------------- tiny models with real block structure


def _clip_config(hidden: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=tiny.CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )


def build_tiny_sdxl_structure(path) -> Path:
    """SDXL's real block layout (3 levels, first without attention, 2 layers per block, 4-level VAE)
    with tiny channels, and two text encoders of different widths (as CLIP-L and bigG differ: the
    single-file loader tells them apart by width). 64 px images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8, norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(**tiny.SDXL_SCHEDULER),
        text_encoder=CLIPTextModel(_clip_config(32, "quick_gelu")).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(48, "gelu")).eval(),
        tokenizer=tiny.tiny_clip_tokenizer(), tokenizer_2=tiny.tiny_clip_tokenizer(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


@pytest.fixture(scope="module")
def tiny_sd2_struct(tmp_path_factory):
    return tiny.build_tiny_sd(tmp_path_factory.mktemp("sd2_struct"), sd_structure=True, v_prediction=True)


@pytest.fixture(scope="module")
def tiny_sdxl_struct(tmp_path_factory):
    return build_tiny_sdxl_structure(tmp_path_factory.mktemp("sdxl_struct"))


# ---------------------------------------------------------------------------- single file


@pytest.mark.parametrize("which", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_with_from_single_file_and_gives_the_same_image(
    which, tiny_sd_struct, tiny_sd2_struct, tiny_sdxl_struct, tmp_path
):
    from diffusers import DiffusionPipeline

    model = {"sd1": tiny_sd_struct, "sd2": tiny_sd2_struct, "sdxl": tiny_sdxl_struct}[which]
    written = _export(model, tmp_path / "exports", single_file=True, dtype="fp32", name="tinymodel")
    assert written == [tmp_path / "exports" / "tinymodel.safetensors"]
    tensors, meta = read_safetensors(written[0])

    expected_prefixes = {
        "sd1": ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."],
        "sd2": ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."],
        "sdxl": ["model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                 "conditioner.embedders.1.model."],
    }[which]
    for key in tensors:
        assert key == "v_pred" or any(key.startswith(p) for p in expected_prefixes), key
    for prefix in expected_prefixes:
        assert any(k.startswith(prefix) for k in tensors), prefix
    assert meta["modelspec.architecture"] == {
        "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}[which]
    assert meta["modelspec.title"] == "tinymodel"
    if which == "sd2":
        assert "v_pred" in tensors
        assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    if which == "sdxl":
        assert tensors["conditioner.embedders.1.model.text_projection"].shape == (48, 48)
        assert "model.diffusion_model.label_emb.0.0.weight" in tensors
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in tensors  # upsampler after attention

    base = DiffusionPipeline.from_pretrained(model)
    loaded = type(base).from_single_file(str(written[0]), config=str(model), local_files_only=True)
    for name, component in base.components.items():
        if isinstance(component, torch.nn.Module):
            theirs = getattr(loaded, name).state_dict()
            for key, value in component.state_dict().items():
                assert torch.equal(value, theirs[key]), f"{name}.{key}"
    # Equal weights; the two pipelines still differ by float rounding (1.7e-5 measured for sd2 with one
    # thread), far below one grey level (3.9e-3).
    np.testing.assert_allclose(pipe_image(loaded, 64), pipe_image(base, 64), atol=1e-4)


def test_single_file_sdxl_refiner_round_trips(tiny_sdxl_refiner, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    [target] = _export(tiny_sdxl_refiner, tmp_path / "refiner.safetensors", single_file=True, dtype="fp32")
    tensors, meta = read_safetensors(target)
    assert "conditioner.embedders.0.model.text_projection" in tensors  # the refiner's only encoder is OpenCLIP
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
    base = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner)
    loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(str(target), config=str(tiny_sdxl_refiner),
                                                               local_files_only=True)
    for name in ("unet", "vae", "text_encoder_2"):
        theirs = getattr(loaded, name).state_dict()
        for key, value in getattr(base, name).state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key}"


def test_single_file_fp16_and_refusal_to_overwrite(tiny_sd_struct, tmp_path):
    target = tmp_path / "model.safetensors"
    _export(tiny_sd_struct, target, single_file=True)  # default --dtype fp16
    tensors, _ = read_safetensors(target)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    before = target.stat().st_mtime_ns
    with pytest.raises(UserError, match=r"model\.safetensors.*--force"):
        _export(tiny_sd_struct, target, single_file=True)
    assert target.stat().st_mtime_ns == before
    _export(tiny_sd_struct, target, single_file=True, dtype="bf16", force=True)
    tensors, _ = read_safetensors(target)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporaries left


def _meta_pipeline_parts(kind: str):
    """Full-size SD 1.5 / SDXL components on the meta device: real configs, no memory, no download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    vae_kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_kwargs)
        if kind == "v1":
            unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.x's UNet
            return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(clip_l)}
        big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                               num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu",
                               projection_dim=1280)
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(clip_l),
                "text_encoder_2": CLIPTextModelWithProjection(big_g)}


@pytest.mark.parametrize("kind", ["v1", "xl_base"])
def test_full_size_layouts_have_the_reference_key_names(kind):
    """Real SD 1.5 / SDXL shapes: diffusers identifies the file as such and maps every key back."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, infer_diffusers_model_type,
    )

    from sdkit.export.single_file import original_state_dict

    parts = _meta_pipeline_parts(kind)
    ckpt = original_state_dict(parts, {"v1": "sd1", "xl_base": "sdxl"}[kind])
    assert infer_diffusers_model_type(ckpt) == kind
    assert set(convert_ldm_unet_checkpoint(ckpt, parts["unet"].config)) == set(parts["unet"].state_dict())
    assert set(convert_ldm_vae_checkpoint(ckpt, parts["vae"].config)) == set(parts["vae"].state_dict())
    # Names every A1111/ComfyUI checkpoint of this kind has.
    known = {
        "v1": ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
               "model.diffusion_model.input_blocks.3.0.op.weight",
               "model.diffusion_model.output_blocks.2.1.conv.weight",
               "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
               "model.diffusion_model.middle_block.1.proj_in.weight",
               "model.diffusion_model.time_embed.2.bias",
               "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
               "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
        "xl_base": ["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                    "model.diffusion_model.output_blocks.5.2.conv.weight",
                    "model.diffusion_model.label_emb.0.2.weight",
                    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
                    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                    "conditioner.embedders.1.model.text_projection"],
    }[kind]
    for key in known:
        assert key in ckpt, key
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


# ---------------------------------------------------------------------------- full diffusers folder
