"""`sdkit export --format safetensors` on tiny models: what other SD tools load, loads, and gives the same image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sdkit.errors import UserError
from sdkit.export.run import export_command

from helpers import pipe_image, read_safetensors


def _export(model, out, **kwargs):
    return export_command(format="safetensors", model=str(model), out=str(out), **kwargs)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers' own loader needs out_proj beside fc1 to read kohya text-encoder LoRAs (it sniffs the format).
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
LORA_STD = 0.1  # larger factors make the deep tiny UNets chaotic: fp32 rounding then shows in images


def make_lora(model: Path, out_dir: Path, *, rank: int = 4, alpha: float = 8, te_rank: int = 2,
              te_alpha: float = 1, text_encoders: bool = True, seed: int = 1, targets=UNET_TARGETS,
              diffusers_keys: bool = False) -> Path:
    """A LoRA saved with `save_lora_weights` and its LoraConfig metadata (as `sdkit train` saves one),
    with random non-zero factors so it changes images.

    diffusers_keys: convert peft names to diffusers' older `lora.down`/`lora.up` names first, as the
    diffusers training examples do (diffusers then loads back only attention targets, hence `targets`).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(model)
    modules = {"unet": (pipe.unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))}
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                modules[name] = (getattr(pipe, name), LoraConfig(r=te_rank, lora_alpha=te_alpha,
                                                                 target_modules=TEXT_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    kwargs = {}
    for name, (module, config) in modules.items():
        module.add_adapter(config)
        for pname, param in module.named_parameters():
            if "lora_" in pname:
                param.data = torch.randn(param.shape, generator=generator) * LORA_STD
        state = get_peft_model_state_dict(module)
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state) if diffusers_keys else state
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    return out_dir / "pytorch_lora_weights.safetensors"


def _with_lora(model, lora_path, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    lora_path = Path(lora_path)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, **kwargs)
    return pipe


def test_diffusers_folder_at_each_dtype(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "fp16"
    assert _export(tiny_sd, out) == [out]
    assert (out / "model_index.json").is_file()
    weights, _ = read_safetensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert not list(out.rglob("*.bin"))
    _export(tiny_sd, tmp_path / "bf16", dtype="bf16")
    weights, _ = read_safetensors(tmp_path / "bf16" / "text_encoder" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    _export(tiny_sd, tmp_path / "fp32", dtype="fp32")
    np.testing.assert_allclose(pipe_image(StableDiffusionPipeline.from_pretrained(tmp_path / "fp32"), 32),
                               pipe_image(StableDiffusionPipeline.from_pretrained(tiny_sd), 32), atol=1e-6)
    with pytest.raises(UserError, match="--force"):
        _export(tiny_sd, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp16", "fp32"]


def test_full_fine_tune_run_exports_only_the_pipeline_and_its_model_card(tiny_sd3, image_folder, tmp_path):
    import shutil

    run = tmp_path / "sd3-run"
    shutil.copytree(tiny_sd3, run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"pretrained": str(tiny_sd3)}, "method": {"type": "full"}, "data": {"dataset": str(image_folder)},
        "train": {"max_steps": 1}, "output_dir": str(run)}))
    (run / "README.md").write_text("# sd3-run\n")
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    out = tmp_path / "export"
    assert _export(run, out, dtype="bf16") == [out]
    assert (out / "README.md").read_text() == "# sd3-run\n"
    assert not (out / "checkpoints").exists() and not (out / "recipe.yaml").exists()
    weights, _ = read_safetensors(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


def test_fuse_lora_into_a_diffusers_folder(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora = make_lora(tiny_sd, tmp_path / "lora")
    out = tmp_path / "fused"
    _export(tiny_sd, out, lora=str(lora), fuse_lora=True, lora_scale=0.5, dtype="fp32")
    fused = StableDiffusionPipeline.from_pretrained(out)
    weights, _ = read_safetensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in weights if "lora" in k]
    reference = _with_lora(tiny_sd, lora)
    reference.set_adapters(["default_0"], adapter_weights=[0.5])
    base = pipe_image(StableDiffusionPipeline.from_pretrained(tiny_sd), 32)
    assert np.abs(pipe_image(fused, 32) - base).max() > 1e-2  # the LoRA changes the image
    np.testing.assert_allclose(pipe_image(fused, 32), pipe_image(reference, 32), atol=1e-4)


def test_fused_lora_single_file(tiny_sd_struct, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora = make_lora(tiny_sd_struct, tmp_path / "lora")
    target = tmp_path / "fused.safetensors"
    _export(tiny_sd_struct, target, lora=str(lora), single_file=True, fuse_lora=True, dtype="fp32")
    loaded = StableDiffusionPipeline.from_single_file(str(target), config=str(tiny_sd_struct), local_files_only=True)
    np.testing.assert_allclose(pipe_image(loaded, 64), pipe_image(_with_lora(tiny_sd_struct, lora), 64), atol=1e-4)


# ---------------------------------------------------------------------------- LoRA files


def test_kohya_lora_gives_the_same_image_as_the_peft_lora_sd1(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora = make_lora(tiny_sd, tmp_path / "lora", rank=4, alpha=8, te_rank=2, te_alpha=1,
                     targets=ATTENTION_TARGETS, diffusers_keys=True)
    assert any(".lora.down." in k for k in read_safetensors(lora)[0])
    target = tmp_path / "out" / "mylora.safetensors"
    assert _export(tiny_sd, target, lora=str(lora), lora_format="kohya", dtype="fp32") == [target]
    tensors, meta = read_safetensors(target)

    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{unet_key}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{unet_key}.alpha"].item() == 8.0
    assert tensors[f"{te_key}.lora_up.weight"].shape == (32, 2)
    assert tensors[f"{te_key}.alpha"].item() == 1.0
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "mylora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert len(meta["sshs_model_hash"]) == 64

    base = pipe_image(StableDiffusionPipeline.from_pretrained(tiny_sd), 32)
    peft_image = pipe_image(_with_lora(tiny_sd, lora), 32)
    kohya_image = pipe_image(_with_lora(tiny_sd, target), 32)
    assert np.abs(peft_image - base).max() > 1e-2
    np.testing.assert_allclose(kohya_image, peft_image, atol=1e-5)


def test_kohya_lora_sdxl_uses_sgm_unet_names_and_both_text_encoders(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    lora = make_lora(tiny_sdxl, tmp_path / "lora", rank=4, alpha=2, te_rank=2, te_alpha=4)
    target = tmp_path / "xl.safetensors"
    _export(tiny_sdxl, target, lora=str(lora), lora_format="kohya", dtype="fp32")
    tensors, meta = read_safetensors(target)
    prefixes = {k.split("_", 2)[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    # The tiny SDXL UNet's second level (down_blocks.1) starts at input_blocks.3 (1 layer per block).
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in tensors
    assert "lora_unet_middle_block_1_proj_in.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha" in tensors
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 4.0
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    base = pipe_image(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), 32)
    peft_image = pipe_image(_with_lora(tiny_sdxl, lora), 32)
    kohya_image = pipe_image(_with_lora(tiny_sdxl, target), 32)
    assert np.abs(peft_image - base).max() > 1e-2
    np.testing.assert_allclose(kohya_image, peft_image, atol=1e-5)


def _fake_run(tmp_path: Path, model: Path, lora: Path, data: Path, *, optim=None, datasets=None) -> Path:
    """A LoRA run folder as `sdkit train` leaves it: recipe.yaml, the LoRA file and a model card."""
    run = tmp_path / "my-run"
    run.mkdir()
    recipe = {
        "model": {"pretrained": str(model)},
        "method": {"type": "lora", "rank": 4, "alpha": 8},
        "data": {"dataset": str(data), "resolution": 32},
        "train": {"max_steps": 123, "batch_size": 2, "seed": 7},
        "optim": {"lr": 2e-4, "lr_scheduler": "cosine", **(optim or {})},
        "output_dir": str(run),
    }
    if datasets:
        recipe["data"] = {"datasets": datasets, "resolution": 32}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    (run / "README.md").write_text("# my-run\n")
    return run


def test_lora_from_a_run_folder_carries_training_metadata(tiny_sd, image_folder, tmp_path):
    lora = make_lora(tiny_sd, tmp_path / "lora", rank=4, alpha=8, text_encoders=False)
    run = _fake_run(tmp_path, tiny_sd, lora, image_folder)
    out = tmp_path / "exports"
    written = _export(run, out, lora_format="kohya")  # folder: file named after the run
    assert written == [out / "my-run.safetensors"]
    tensors, meta = read_safetensors(written[0])
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].dtype == torch.float32
    assert meta["ss_steps"] == "123" and meta["ss_max_train_steps"] == "123"
    assert meta["ss_learning_rate"] == "0.0002" and meta["ss_lr_scheduler"] == "cosine"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_seed"] == "7"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_output_name"] == "my-run" and meta["modelspec.title"] == "my-run"
    assert meta["modelspec.resolution"] == "32x32"

    assert json.loads(meta["ss_dataset_dirs"]) == {str(image_folder): {"n_repeats": 1}}
    assert meta["ss_optimizer"] == "torch.optim.AdamW"

    # peft format into a folder: pytorch_lora_weights.safetensors, metadata kept, loads from the folder.
    peft_out = tmp_path / "peft"
    written = _export(run, peft_out, dtype="fp32")
    assert written == [peft_out / "pytorch_lora_weights.safetensors"]
    copied, copied_meta = read_safetensors(written[0])
    original, original_meta = read_safetensors(lora)
    assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in original)
    assert json.loads(copied_meta["lora_adapter_metadata"]) == json.loads(original_meta["lora_adapter_metadata"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(peft_out))
    np.testing.assert_allclose(pipe_image(pipe, 32), pipe_image(_with_lora(tiny_sd, lora), 32), atol=1e-6)


def test_alpha_without_adapter_metadata_comes_from_the_recipe(tiny_sd, image_folder, tmp_path):
    from safetensors.torch import save_file

    lora = make_lora(tiny_sd, tmp_path / "lora", rank=4, alpha=8, text_encoders=False)
    tensors, _ = read_safetensors(lora)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))  # no lora_adapter_metadata
    run = _fake_run(tmp_path, tiny_sd, bare, image_folder)
    written = _export(run, tmp_path / "k.safetensors", lora_format="kohya")
    out, _ = read_safetensors(written[0])
    assert {v.item() for k, v in out.items() if k.endswith(".alpha")} == {8.0}


# ---------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs, flag", [
    (dict(dtype="fp8"), "--dtype"),
    (dict(lora_format="lycoris"), "--lora-format"),
    (dict(lora_format="kohya"), "--lora-format kohya"),
    (dict(fuse_lora=True), "--fuse-lora"),
    (dict(refiner="x"), "--refiner"),
    (dict(check=True), "--check"),
    (dict(name="bad name"), "--name"),
    (dict(lora_scale=0.5), "--lora-scale"),
])
def test_bad_arguments_name_the_flag(kwargs, flag, tiny_sd, tmp_path):
    with pytest.raises(UserError, match=flag):
        _export(tiny_sd, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_format(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="--format"):
        export_command(format="onnx", model=str(tiny_sd), out=str(tmp_path / "o"))


def test_single_file_for_sd3_is_refused(tiny_sd3, tmp_path):
    with pytest.raises(UserError, match="--single-file"):
        _export(tiny_sd3, tmp_path / "o.safetensors", single_file=True)


def test_single_file_with_unfused_lora_is_refused(tiny_sd, tmp_path):
    lora = make_lora(tiny_sd, tmp_path / "lora", text_encoders=False)
    with pytest.raises(UserError, match="--single-file.*--fuse-lora"):
        _export(tiny_sd, tmp_path / "o.safetensors", single_file=True, lora=str(lora))


def test_kohya_for_sd3_is_refused(tiny_sd3, tmp_path):
    lora = tmp_path / "l.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2), "transformer.x.lora_B.weight": torch.zeros(2, 2)},
              str(lora))
    with pytest.raises(UserError, match="--lora-format kohya"):
        _export(tiny_sd3, tmp_path / "o.safetensors", lora=str(lora), lora_format="kohya")


def test_format_mar_is_handed_to_the_archive_writer(tiny_sd, tmp_path):
    written = export_command(format="mar", model=str(tiny_sd), out=str(tmp_path / "serve"), name="tiny",
                             archive_format="no-archive")
    assert written == [tmp_path / "serve" / "model-store" / "tiny", tmp_path / "serve" / "config" / "config.properties"]
    for flag, kwargs in (("--single-file", dict(single_file=True)), ("--lora-format", dict(lora_format="kohya"))):
        with pytest.raises(UserError, match=flag):
            export_command(format="mar", model=str(tiny_sd), out=str(tmp_path / "other"), **kwargs)


def test_kohya_metadata_names_every_optimizer_and_each_dataset_with_its_repeats(tiny_sd, image_folder, tmp_path):
    lora = make_lora(tiny_sd, tmp_path / "lora", rank=4, alpha=8, text_encoders=False)
    other = tmp_path / "other-images"
    shutil.copytree(image_folder, other)
    run = _fake_run(tmp_path, tiny_sd, lora, image_folder, optim={"name": "prodigy", "lr": 1.0},
                    datasets=[{"dataset": str(image_folder)}, {"dataset": str(other), "repeats": 3}])
    _, meta = read_safetensors(_export(run, tmp_path / "out", lora_format="kohya")[0])
    assert meta["ss_optimizer"] == "prodigyopt.Prodigy" and meta["ss_learning_rate"] == "1.0"
    assert json.loads(meta["ss_dataset_dirs"]) == {str(image_folder): {"n_repeats": 1}, str(other): {"n_repeats": 3}}
