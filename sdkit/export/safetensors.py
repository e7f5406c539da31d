"""`sdkit export --format safetensors`: diffusers folders, single-file checkpoints, LoRA files.

Every output is written under a temporary name beside the target and renamed when complete
(sdkit.atomic), so an interrupted export never leaves a file that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdkit.atomic import atomic_dir, atomic_write_path
from sdkit.errors import UserError

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


def torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------- what the model is


@dataclass(frozen=True)
class ModelInfo:
    """What an export needs to know about a base model, read from its config files only."""

    family: str  # sd, sdxl, sd3
    layout: Optional[str]  # sd1, sd2, sdxl, sdxl_refiner; None: no original single-file layout
    prediction_type: str  # epsilon, v_prediction, flow_matching
    resolution: int  # native image size in pixels
    unet_config: Optional[dict]


def read_component_config(base: str, component: str, filename: str = "config.json") -> dict:
    local = Path(os.path.expanduser(base)) / component / filename
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(os.path.expanduser(base)):
        raise UserError(f"--model: '{base}' has no {component}/{filename}")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base, f"{component}/{filename}")).read_text())
    except Exception as e:  # offline, missing or gated repo
        raise UserError(f"--model: cannot read {component}/{filename} of '{base}': {type(e).__name__}") from None


def model_info(base: str) -> ModelInfo:
    from sdkit.families import detect_family, family_class
    from sdkit.inference.loading import read_model_index

    family = detect_family(base, key="--model")
    family_cls = family_class(family)
    if family_cls.objective == "flow":  # SD3: no UNet, no original single-file layout
        return ModelInfo(family, None, "flow_matching", 1024, None)
    index = read_model_index(base)
    unet = read_component_config(base, "unet")
    vae = read_component_config(base, "vae")
    scheduler = read_component_config(base, "scheduler", "scheduler_config.json")
    layout = family_cls.single_file_layout(index, lambda component: read_component_config(base, component))
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    resolution = int(unet.get("sample_size") or 64) * vae_factor
    return ModelInfo(family, layout, scheduler.get("prediction_type", "epsilon"), resolution, unet)


def modelspec_metadata(info: ModelInfo, *, title: str, lora: bool, resolution: Optional[int] = None,
                       description: Optional[str] = None) -> dict[str, str]:
    """The `modelspec.*` keys (Stability AI model spec) that UIs read to identify a file."""
    arch = _ARCHITECTURES.get((info.layout, info.prediction_type))
    if arch is None:
        return {}
    # As kohya writes them: SD 1.x/2.x LoRAs use diffusers module names, everything else SGM's.
    implementation = "diffusers" if lora and info.layout in ("sd1", "sd2") else _SGM_IMPLEMENTATION
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


def _load_pipeline(base: str, *, dtype: str, lora: Optional[str], lora_scale: float):
    """The pipeline, with the LoRA fused in at fp32 before casting (less rounding than fusing in fp16)."""
    from diffusers import DiffusionPipeline

    from sdkit.inference.sampling import dtype_kwarg

    load_dtype = torch_dtype("fp32" if lora else dtype)
    pipe = DiffusionPipeline.from_pretrained(base, **dtype_kwarg(load_dtype))
    if lora:
        load_lora_into(pipe, lora)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        pipe.to(torch_dtype(dtype))
    return pipe


def load_lora_into(pipe, lora: str, adapter_name: Optional[str] = None) -> None:
    path = Path(lora)
    kwargs = {"adapter_name": adapter_name} if adapter_name else {}
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    else:
        pipe.load_lora_weights(lora, **kwargs)


def export_diffusers(base: str, out: Path, *, dtype: str = "fp16", lora: Optional[str] = None,
                     lora_scale: float = 1.0, force: bool = False, model_card: Optional[Path] = None) -> list[Path]:
    """A diffusers folder with safetensors weights at `dtype`, optionally with a LoRA fused in."""
    pipe = _load_pipeline(base, dtype=dtype, lora=lora, lora_scale=lora_scale)
    with atomic_dir(out, overwrite=force) as tmp:
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

    info = model_info(base)
    if info.layout is None:
        raise UserError(f"--single-file: {info.family} models have no original single-file layout; "
                        "export a diffusers folder (drop --single-file)")
    pipe = _load_pipeline(base, dtype=dtype, lora=lora, lora_scale=lora_scale)
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


def lora_file(ref: str) -> Path:
    """The local .safetensors file of a LoRA reference (downloading a hub LoRA)."""
    from sdkit.inference.loading import LORA_FILE

    path = Path(os.path.expanduser(ref))
    if path.is_file():
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, LORA_FILE))
    except Exception as e:
        raise UserError(f"--lora: cannot fetch {LORA_FILE} from '{ref}': {type(e).__name__}") from None


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

    source = lora_file(lora)
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
    if info.layout not in kohya.KOHYA_PREFIXES:
        raise UserError(f"--lora-format kohya: not supported for {info.family} LoRAs (SD 1.x, 2.x and SDXL are); "
                        "use --lora-format peft")
    default_alpha = None
    if recipe is not None:
        default_alpha = recipe.method.alpha if recipe.method.alpha is not None else recipe.method.rank
    out, alphas = kohya.to_kohya(tensors, file_metadata, layout=info.layout, unet_config=info.unet_config,
                                 default_alpha=default_alpha, dtype=dtype)
    prediction = info.prediction_type
    if recipe is not None and recipe.train.prediction_type != "auto":
        prediction = recipe.train.prediction_type
    resolution = recipe.data.resolution if recipe is not None else info.resolution
    metadata = {"format": "pt"}
    metadata.update(kohya.training_metadata(
        layout=info.layout, modules_alphas=alphas, configs=kohya.adapter_configs(file_metadata), recipe=recipe,
        output_name=name, resolution=resolution, prediction_type=prediction, base_model=base,
    ))
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
