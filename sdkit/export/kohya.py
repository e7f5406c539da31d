"""diffusers/peft LoRA files -> kohya/A1111 key layout with `ss_*` training metadata.

kohya names a LoRA by the module it patches, dots turned into underscores:
`lora_unet_<module>` / `lora_te_<module>` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_` (SDXL),
each with `.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha`.
The strength applied is alpha / rank, so each module's alpha is written such that
alpha / rank equals the scaling peft trained with (for plain LoRA: the trained lora_alpha).
SD 1.x/2.x UNet modules keep diffusers names (kohya trains those on a diffusers-style UNet);
SDXL UNet modules get the original SGM names (`input_blocks_4_1_...`), as kohya writes them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from sdkit.errors import UserError

# Suffix pairs the diffusers/peft LoRA files use for the two factors.
_DOWN_UP_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (loaders/lora_base.py)


@dataclass(frozen=True)
class KohyaLayout:
    """How kohya writes LoRAs for one original checkpoint layout (sdkit.export.single_file.LAYOUTS)."""

    prefixes: Mapping[str, str]  # component -> kohya name prefix
    base_model_version: str  # ss_base_model_version
    v2: bool = False  # ss_v2: an SD 2.x model
    sgm_unet_names: bool = False  # UNet modules under their original (SGM) names, not diffusers'


KOHYA_LAYOUTS = {
    "sd1": KohyaLayout({"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v1"),
    "sd2": KohyaLayout({"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v2", v2=True),
    "sdxl": KohyaLayout({"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                        "sdxl_base_v1-0", sgm_unet_names=True),
}


@dataclass
class LoraModule:
    component: str  # unet, text_encoder, text_encoder_2
    path: str  # module path inside the component, e.g. down_blocks.0.attentions.0.proj_in
    down: object  # tensor (rank, in[, k, k])
    up: object  # tensor (out, rank[, 1, 1])
    alpha: Optional[float] = None  # set when the file itself stores one
    magnitude: object = None  # DoRA's per-output-channel magnitude (peft's lora_magnitude_vector)


@dataclass
class AdapterConfig:
    """What peft trained with, per component (from the file's adapter metadata)."""

    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False


def split_modules(state_dict: Mapping) -> list[LoraModule]:
    """Group a diffusers/peft LoRA state dict into (component, module, down, up[, alpha])."""
    found: dict[tuple[str, str], dict] = {}
    for key, value in state_dict.items():
        if key.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
            stem = key[: -len(".weight")] if key.endswith(".weight") else key
            component, _, path = stem[: -len(".lora_magnitude_vector")].partition(".")
            found.setdefault((component, path), {})["magnitude"] = value
            continue
        for down_suffix, up_suffix in _DOWN_UP_SUFFIXES:
            if key.endswith(down_suffix):
                slot, stem = "down", key[: -len(down_suffix)]
                break
            if key.endswith(up_suffix):
                slot, stem = "up", key[: -len(up_suffix)]
                break
        else:
            if key.endswith(".alpha"):
                slot, stem = "alpha", key[: -len(".alpha")]
            else:
                raise UserError(f"--lora-format kohya: unexpected key '{key}' in the LoRA file")
        component, _, path = stem.partition(".")
        path = path.replace(".processor.", ".")  # old attention-processor spelling
        found.setdefault((component, path), {})[slot] = value
    modules = []
    for (component, path), parts in sorted(found.items()):
        if "down" not in parts or "up" not in parts:
            raise UserError(f"--lora-format kohya: '{component}.{path}' lacks its lora down or up weight")
        alpha = parts.get("alpha")
        modules.append(LoraModule(component, path, parts["down"], parts["up"],
                                  None if alpha is None else float(alpha.item()), parts.get("magnitude")))
    return modules


def adapter_configs(file_metadata: Mapping[str, str]) -> dict[str, AdapterConfig]:
    """Per-component LoraConfig fields stored by `save_lora_weights(..., *_lora_adapter_metadata=)`."""
    raw = file_metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict[str, AdapterConfig] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        config = configs.setdefault(component, AdapterConfig())
        if name in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora") and value is not None:
            setattr(config, name, value)
    return configs


def _pattern_value(patterns: Mapping, path: str):
    # peft matches a pattern key against the end of the module name.
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return None


def module_alpha(module: LoraModule, config: Optional[AdapterConfig], default_alpha: Optional[float]) -> float:
    """kohya alpha that gives the same strength as the trained peft adapter: scale = alpha / rank."""
    rank = int(module.down.shape[0])
    if module.alpha is not None:
        return module.alpha
    if config is not None and config.lora_alpha is not None:
        alpha = _pattern_value(config.alpha_pattern, module.path)
        alpha = float(config.lora_alpha if alpha is None else alpha)
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        return scale * rank
    if default_alpha is not None:
        return float(default_alpha)
    return float(rank)  # what diffusers assumes for a file without alphas


def kohya_name(module: LoraModule, layout: str, unet_config: Optional[Mapping] = None) -> str:
    kohya = KOHYA_LAYOUTS.get(layout)
    if kohya is None:
        raise UserError(f"--lora-format kohya: not supported for {layout} models ({', '.join(KOHYA_LAYOUTS)} are)")
    prefixes = kohya.prefixes
    if module.component not in prefixes:
        raise UserError(f"--lora-format kohya: a {layout} LoRA cannot hold '{module.component}' weights")
    path = module.path
    if module.component == "unet" and kohya.sgm_unet_names:
        from sdkit.export.single_file import UNetLayout, UnmappedKeyError

        try:
            path = UNetLayout(unet_config).original_name(path)
        except UnmappedKeyError:
            raise UserError(f"--lora-format kohya: no original {layout} name for UNet module '{path}'") from None
    elif module.component.startswith("text_encoder"):
        # transformers 5 drops `text_model.` from CLIPTextModel names; kohya names keep it.
        if not path.startswith(("text_model.", "text_projection")):
            path = "text_model." + path
    return prefixes[module.component] + path.replace(".", "_")


def to_kohya(
    state_dict: Mapping,
    file_metadata: Mapping[str, str],
    *,
    layout: str,
    unet_config: Optional[Mapping] = None,
    default_alpha: Optional[float] = None,
    dtype=None,
) -> tuple[dict, dict[str, float]]:
    """kohya tensors and each kohya module's alpha. Alphas stay float32, so they are exact."""
    import torch

    from sdkit.training.adapters.lycoris import algo_of_keys

    if algo_of_keys(state_dict):  # LoHa/LoKr: already in the LyCORIS (kohya) layout
        alphas = {k[: -len(".alpha")]: float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
        return {k: (v.to(dtype) if dtype is not None and k not in alphas else v) for k, v in state_dict.items()}, alphas
    configs = adapter_configs(file_metadata)
    out: dict = {}
    alphas: dict[str, float] = {}
    for module in split_modules(state_dict):
        name = kohya_name(module, layout, unet_config)
        alpha = module_alpha(module, configs.get(module.component), default_alpha)
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out[f"{name}.lora_down.weight"] = cast(module.down).contiguous()
        out[f"{name}.lora_up.weight"] = cast(module.up).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if module.magnitude is not None:  # DoRA as LyCORIS writes it: dora_scale, one value per output
            shape = (module.up.shape[0],) + (1,) * (module.up.dim() - 1)
            out[f"{name}.dora_scale"] = cast(module.magnitude).reshape(shape).contiguous()
        alphas[name] = alpha
    return out, alphas


def training_metadata(
    *,
    layout: str,
    modules_alphas: Mapping[str, float],
    configs: Mapping[str, AdapterConfig],
    recipe=None,
    network_module: str = "networks.lora",
    output_name: str,
    resolution: int,
    prediction_type: str,
    base_model: str,
) -> dict[str, str]:
    """kohya's `ss_*` keys (all strings), from the run's recipe when there is one."""
    first = configs.get("unet") or next(iter(configs.values()), None)
    dim = first.r if first and first.r else None
    alpha = first.lora_alpha if first and first.lora_alpha is not None else None
    if recipe is not None:
        dim = dim or recipe.method.rank
        if alpha is None:
            alpha = recipe.lora_alpha
    if alpha is None and modules_alphas:
        alpha = next(iter(modules_alphas.values()))
    kohya = KOHYA_LAYOUTS[layout]
    meta = {
        "ss_network_module": network_module,
        "ss_network_dim": str(dim) if dim is not None else "",
        "ss_network_alpha": str(float(alpha)) if alpha is not None else "",
        "ss_base_model_version": kohya.base_model_version,
        "ss_v2": str(kohya.v2),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": base_model,
        "ss_output_name": output_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_comment": "exported by sdkit from a diffusers/peft LoRA",
    }
    if recipe is not None:
        meta.update(_recipe_metadata(recipe, text_encoders=any(k.startswith("lora_te") for k in modules_alphas)))
    return {k: v for k, v in meta.items() if v != ""}


# kohya records the optimizer's class path; the others are named by their recipe name.
KOHYA_OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                         "adafactor": "transformers.optimization.Adafactor", "prodigy": "prodigyopt.Prodigy",
                         "adamw_schedulefree": "schedulefree.AdamWScheduleFree"}


def _recipe_metadata(recipe, *, text_encoders: bool) -> dict[str, str]:
    """The `ss_*` keys that describe how the run trained."""
    train, optim, data = recipe.train, recipe.optim, recipe.data
    return {
        "ss_learning_rate": str(optim.lr),
        "ss_unet_lr": str(optim.lr),
        "ss_text_encoder_lr": str(optim.text_encoder_lr or optim.lr) if text_encoders else "0",
        "ss_lr_scheduler": optim.lr_scheduler,
        "ss_lr_warmup_steps": str(optim.warmup_steps),
        "ss_optimizer": KOHYA_OPTIMIZER_NAMES.get(optim.name, optim.name),
        "ss_max_train_steps": str(train.max_steps) if train.max_steps else "",
        "ss_steps": str(train.max_steps) if train.max_steps else "",
        "ss_num_epochs": str(train.epochs) if train.epochs else "",
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_mixed_precision": train.mixed_precision,
        "ss_seed": str(train.seed),
        "ss_noise_offset": str(train.noise_offset) if train.noise_offset else "",
        "ss_min_snr_gamma": str(train.snr_gamma) if train.snr_gamma else "",
        "ss_network_dropout": str(recipe.method.dropout),
        "ss_cache_latents": str(data.cache),
        "ss_dataset_dirs": json.dumps({source.dataset: {"n_repeats": source.repeats} for source in data.sources()}),
        "ss_caption_dropout_rate": str(data.caption_dropout),
        "ss_flip_aug": str(data.random_flip),
    }
