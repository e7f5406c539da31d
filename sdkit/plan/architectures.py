"""Where `sdkit plan` finds a model's architecture: configs only, never weights.

Order: a local diffusers folder (model.pretrained is a path); the configs shipped in
`sdkit/configs/` for the well-known hub models; a hub id whose configs already sit in the
Hugging Face cache (read offline, nothing is downloaded). Anything else is a UserError.

The shipped configs were written from the public model repositories and are checked by
parameter count in tests/plan/test_plan.py (SD 1.5 UNet 859,520,964; SDXL UNet 2,567,463,684;
SD3 medium transformer 2,028,328,000; SD3.5 medium 2,243,171,520; T5-XXL encoder 4,762,310,656).
Only torch-free imports here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError

CONFIG_ROOT = Path(__file__).parent / "configs"

# hub id -> folder under sdkit/configs (same architecture, so the same memory)
SHIPPED = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3-medium",
    "stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
}

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

@dataclass
class Component:
    name: str  # folder name in the pipeline: unet, vae, text_encoder_2, ...
    library: str  # diffusers | transformers
    class_name: str
    config: dict


@dataclass
class ModelSpec:
    """A pipeline's architecture, as `sdkit plan` needs it."""

    source: str  # where the configs came from, for the report
    pipeline_class: str
    denoiser: Component
    vae: Optional[Component] = None
    text_encoders: list[Component] = field(default_factory=list)

    @property
    def family(self) -> str:
        from sdkit.families import DETECT  # torch-free

        if self.pipeline_class not in DETECT:
            raise UserError(f"model.pretrained: a {self.pipeline_class}, which sdkit does not support yet "
                            f"(supported: {', '.join(sorted(set(DETECT)))})")
        return DETECT[self.pipeline_class]


def shipped_ids() -> list[str]:
    return sorted(SHIPPED)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _spec_from_folder(root: Path, source: str) -> ModelSpec:
    index = _read_json(root / "model_index.json")
    parts: dict[str, Component] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] is None:
            continue
        config_file = root / name / "config.json"
        if not config_file.is_file():
            continue
        parts[name] = Component(name, value[0], value[1], _read_json(config_file))
    denoiser = next((parts[n] for n in DENOISERS if n in parts), None)
    if denoiser is None:
        raise UserError(f"model.pretrained: no unet/config.json or transformer/config.json under '{root}'")
    return ModelSpec(
        source=source,
        pipeline_class=index.get("_class_name", "?"),
        denoiser=denoiser,
        vae=parts.get("vae"),
        text_encoders=[parts[n] for n in TEXT_ENCODERS if n in parts],
    )


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """The HF cache snapshot folder holding this repo's model_index.json, if any (offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # malformed id and the like: treat as not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_model_spec(pretrained: str, revision: Optional[str] = None) -> ModelSpec:
    """Architecture of `pretrained`: local folder, shipped config, or HF cache."""
    local = Path(os.path.expanduser(pretrained))
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise UserError(f"model.pretrained: '{pretrained}' is not a diffusers model folder (no model_index.json)")
        return _spec_from_folder(local, f"local folder {pretrained}")
    if pretrained in SHIPPED:
        return _spec_from_folder(CONFIG_ROOT / SHIPPED[pretrained], f"configs shipped with sdkit ({SHIPPED[pretrained]})")
    snapshot = _cached_snapshot(pretrained, revision)
    if snapshot is not None:
        return _spec_from_folder(snapshot, f"Hugging Face cache ({pretrained})")
    raise UserError(
        f"model.pretrained: no config for '{pretrained}' (not a local folder, not in the Hugging Face cache, "
        f"not shipped with sdkit; shipped: {', '.join(shipped_ids())})"
    )


# VAEs known to be drop-in replacements that run in fp16 (sdkit never downloads their configs)
FP16_SAFE_VAES = {"madebyollin/sdxl-vae-fp16-fix"}


def load_vae_config(ref: str, base: Optional[dict]) -> Optional[dict]:
    """Config of a separate VAE (model.vae): a local folder or the HF cache; else the base VAE's
    architecture (replacement VAEs share it), marked fp16-safe for the known fp16-fixed ones."""
    local = Path(os.path.expanduser(ref))
    for candidate in (local / "config.json", local / "vae" / "config.json"):
        if candidate.is_file():
            return _read_json(candidate)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
    except Exception:
        found = None
    if isinstance(found, str):
        return _read_json(Path(found))
    if base is None:
        return None
    return {**base, "force_upcast": False} if ref in FP16_SAFE_VAES else base
