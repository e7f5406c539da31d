"""`sdkit export --format safetensors`: diffusers folders, single-file checkpoints, LoRA files.

Every output is written under a temporary name beside the target and renamed when complete
(sdkit.atomic), so an interrupted export never leaves a file that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdkit.atomic import atomic_entries, atomic_write_path
from sdkit.errors import UserError, first_line

MODEL_CARD = "README.md"

# modelspec (https://github.com/Stability-AI/ModelSpec) architecture ids, as kohya and ComfyUI use them.
_ARCHITECTURES = {
    ("sd1", "epsilon"): "stable-diffusion-v1",
    ("sd1", "v_prediction"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
    ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
    ("sdxl_refiner", "epsilon"): "stable-diffusion-xl-v1-refiner",
    ("sdxl_refiner", "v_prediction"): "stable-diffusion-xl-v1-refiner",
}
_SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


# ----------------------------------------------------------------------------- what the model is


@dataclass(frozen=True)
class ModelInfo:
    """What an export needs to know about a base model, read from its config files only."""

    family: str
    layout: Optional[str]  # sdkit.export.single_file.LAYOUTS; None: no original single-file layout
    # Read only for a model with a layout (None otherwise):
    prediction_type: Optional[str]  # epsilon, v_prediction
    resolution: Optional[int]  # native image size in pixels
    unet_config: Optional[dict]  # every original layout's denoiser is a UNet


def model_info(base: str) -> ModelInfo:
    from sdkit.families import detect_family, family_class
    from sdkit.inference.loading import read_model_index, read_model_json

    def config(component: str, filename: str = "config.json") -> dict:
        return read_model_json(base, f"{component}/{filename}", key="--model")

    family = detect_family(base, key="--model")
    family_cls = family_class(family)
    layout = family_cls.single_file_layout(read_model_index(base), config)
    if layout is None:  # the family has no original (A1111/ComfyUI) checkpoint layout
        return ModelInfo(family, None, None, None, None)
    unet = config(family_cls.denoiser_attr)
    vae = config("vae")
    scheduler = config("scheduler", "scheduler_config.json")
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    resolution = int(unet.get("sample_size") or 64) * vae_factor
    return ModelInfo(family, layout, scheduler.get("prediction_type", "epsilon"), resolution, unet)


def single_file_info(base: str) -> ModelInfo:
    """model_info of a model that has an original single-file layout; a UserError otherwise."""
    info = model_info(base)
    if info.layout is None:
        raise UserError(f"--single-file: {info.family} models have no original single-file layout "
                        "(the checkpoints A1111 and ComfyUI load); export a diffusers folder (drop --single-file)")
    return info


def modelspec_metadata(info: ModelInfo, *, title: str, lora: bool, resolution: Optional[int] = None,
                       description: Optional[str] = None) -> dict[str, str]:
    """The `modelspec.*` keys (Stability AI model spec) that UIs read to identify a file."""
    arch = _ARCHITECTURES.get((info.layout, info.prediction_type))
    if arch is None:
        return {}
    from sdkit.export.kohya import KOHYA_LAYOUTS

    # As kohya writes them: LoRAs with diffusers UNet module names say so, everything else is SGM's.
    kohya = KOHYA_LAYOUTS.get(info.layout)
    implementation = "diffusers" if lora and kohya and not kohya.sgm_unet_names else _SGM_IMPLEMENTATION
    size = resolution or info.resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + ("/lora" if lora else ""),
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
    }
    if description:
        meta["modelspec.description"] = description
    return meta


# ----------------------------------------------------------------------------- full models


def load_pipeline(base: str, *, dtype: str, lora: Optional[str] = None, lora_scale: float = 1.0):
    """The pipeline at `dtype` (fp16, bf16, fp32), with a LoRA fused in at fp32 before casting
    (less rounding than fusing in fp16)."""
    import os

    from diffusers import DiffusionPipeline

    from sdkit.export.model_files import component_files, refuse_pickled_weights
    from sdkit.inference.loading import fuse_lora
    from sdkit.inference.sampling import dtype_kwarg, torch_dtype

    if os.path.isdir(os.path.expanduser(base)):  # someone else's folder: inside it, no pickles
        refuse_pickled_weights(component_files(os.path.expanduser(base)), base)
    try:
        pipe = DiffusionPipeline.from_pretrained(base, use_safetensors=True,
                                                 **dtype_kwarg(torch_dtype("fp32" if lora else dtype)))
    except Exception as e:  # missing or broken files, pickled weights diffusers refuses, ...
        raise UserError(f"cannot load the pipeline '{base}': {type(e).__name__}: {first_line(e)}") from None
    if lora:
        fuse_lora(pipe, lora, lora_scale)
        pipe.to(torch_dtype(dtype))
    return pipe


def export_diffusers(base: str, out: Path, *, dtype: str = "fp16", lora: Optional[str] = None,
                     lora_scale: float = 1.0, force: bool = False, model_card: Optional[Path] = None) -> list[Path]:
    """A diffusers folder with safetensors weights at `dtype`, optionally with a LoRA fused in."""
    pipe = load_pipeline(base, dtype=dtype, lora=lora, lora_scale=lora_scale)
    # Only what the pipeline writes (model_index.json, its component folders, the card) is
    # replaced: anything else already in `out` (another run's checkpoints, notes) stays.
    with atomic_entries(out, overwrite=force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if model_card is not None and Path(model_card).is_file():
            shutil.copyfile(model_card, tmp / MODEL_CARD)
    return [Path(out)]


def export_single_file(base: str, out_file: Path, *, dtype: str = "fp16", lora: Optional[str] = None,
                       lora_scale: float = 1.0, force: bool = False, title: Optional[str] = None) -> list[Path]:
    """One original-layout checkpoint (SD 1.x/2.x/SDXL) that A1111, ComfyUI and `from_single_file` load."""
    import torch
    from safetensors.torch import save_file

    from sdkit.export.single_file import original_state_dict
    from sdkit.inference.sampling import torch_dtype

    info = single_file_info(base)
    pipe = load_pipeline(base, dtype=dtype, lora=lora, lora_scale=lora_scale)
    state_dict = original_state_dict(pipe.components, info.layout)
    target = torch_dtype(dtype)
    state_dict = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    if info.prediction_type == "v_prediction":
        state_dict["v_pred"] = torch.tensor([])  # ComfyUI's marker for v-prediction checkpoints
    metadata = {"format": "pt", **modelspec_metadata(info, title=title or Path(out_file).stem, lora=False)}
    with atomic_write_path(out_file, overwrite=force) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
    return [Path(out_file)]


# ----------------------------------------------------------------------------- LoRA


def _read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def export_lora(lora: str, out_file: Path, *, base: str, lora_format: str = "peft", dtype: str = "fp16",
                recipe=None, name: Optional[str] = None, force: bool = False) -> list[Path]:
    """Write a LoRA as a diffusers/peft file or as a kohya/A1111 file with ss_* and modelspec metadata.

    Tensors are written at `dtype`; file metadata (peft's adapter config) is kept.
    """
    from safetensors.torch import save_file

    from sdkit.inference.loading import local_lora_file
    from sdkit.inference.sampling import torch_dtype

    source = Path(local_lora_file(lora))
    tensors, metadata = _read_safetensors(source)
    target = torch_dtype(dtype)
    if lora_format == "peft":
        out = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        metadata.setdefault("format", "pt")
    else:
        out, metadata = _kohya_file(tensors, metadata, source, base=base, dtype=target, recipe=recipe,
                                    name=name or Path(out_file).stem)
    with atomic_write_path(out_file, overwrite=force) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    return [Path(out_file)]


def _kohya_file(tensors, file_metadata, source: Path, *, base, dtype, recipe, name) -> tuple[dict, dict]:
    from sdkit.export import kohya

    info = model_info(base)
    if info.layout not in kohya.KOHYA_LAYOUTS:
        raise UserError(f"--lora-format kohya: not supported for {info.family} LoRAs (kohya names exist for the "
                        f"{', '.join(kohya.KOHYA_LAYOUTS)} checkpoint layouts); use --lora-format peft")
    default_alpha = recipe.lora_alpha if recipe is not None else None
    out, alphas = kohya.to_kohya(tensors, file_metadata, layout=info.layout, unet_config=info.unet_config,
                                 default_alpha=default_alpha, dtype=dtype)
    network_module = file_metadata.get("ss_network_module", "networks.lora")
    network_args = file_metadata.get("ss_network_args")
    if any(k.endswith(".dora_scale") for k in out):  # DoRA: kohya trains it through LyCORIS' LoRA with dora_wd
        network_module, network_args = "lycoris.kohya", json.dumps({"algo": "lora", "dora_wd": "True"})
    prediction = info.prediction_type
    if recipe is not None and recipe.train.prediction_type != "auto":
        prediction = recipe.train.prediction_type
    resolution = recipe.data.resolution if recipe is not None else info.resolution
    metadata = {"format": "pt"}
    metadata.update(kohya.training_metadata(
        layout=info.layout, modules_alphas=alphas, configs=kohya.adapter_configs(file_metadata), recipe=recipe,
        network_module=network_module,
        output_name=name, resolution=resolution, prediction_type=prediction, base_model=base,
    ))
    if network_args:
        metadata["ss_network_args"] = network_args
    finished = _dt.datetime.fromtimestamp(source.stat().st_mtime)
    metadata["ss_training_finished_at"] = str(finished.timestamp())
    info_for_spec = ModelInfo(info.family, info.layout, prediction, resolution, info.unet_config)
    metadata.update(modelspec_metadata(info_for_spec, title=name, lora=True, resolution=resolution))
    metadata["sshs_model_hash"] = tensor_data_sha256(out)
    return out, metadata


def tensor_data_sha256(tensors: dict) -> str:
    """sha256 of a safetensors file's data section (what A1111 shows as the LoRA's hash).

    The data section does not depend on the metadata, so it can be computed before saving.
    """
    import hashlib

    from safetensors.torch import save

    blob = save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()
