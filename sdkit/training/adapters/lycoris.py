"""LoHa/LoKr files in the LyCORIS (kohya) key layout, to and from peft adapters.

A LyCORIS file names each adapted module as kohya does (`lora_unet_<module>` with dots as
underscores, see sdkit.export.kohya) and stores the factors under LyCORIS' own names, which are
peft's too (`hada_w1_a` ... / `lokr_w1`, `lokr_w2_a` ...), plus each module's `.alpha`; the
strength applied is alpha / rank, as in peft. One difference: LyCORIS applies scale 1 to a LoKr
module whose two Kronecker factors are both full matrices, so sdkit folds peft's scale into
`lokr_w2` there. `ss_network_module: lycoris.kohya` and `ss_network_args` say what it is, as
kohya writes them when it trains with LyCORIS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from sdkit.errors import UserError

FACTOR_NAMES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
ADAPTER = "default"


def algo_of_keys(keys) -> Optional[str]:
    """'loha' or 'lokr' when the tensor names are a LyCORIS file of that kind, else None."""
    suffixes = {k.rsplit(".", 1)[-1] for k in keys}
    for algo, names in FACTOR_NAMES.items():
        if suffixes & set(names):
            return algo
    return None


def _model_index(family_cls, components: Mapping) -> dict:
    return {"_class_name": family_cls.pipeline_class,
            **{k: (["", ""] if v is not None else [None, None]) for k, v in components.items()}}


def _config_dict(module) -> dict:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def kohya_layout(family, key: str = "--lora") -> tuple[str, dict]:
    """The kohya layout (sd1, sd2, sdxl) of a loaded family, and its UNet config."""
    from sdkit.export.kohya import KOHYA_LAYOUTS

    cls = type(family)
    comps = family.components
    # A component left out (sdkit plan's traced family) reads as an empty config: defaults.
    layout = cls.single_file_layout(_model_index(cls, comps),
                                    lambda name: _config_dict(comps[name]) if comps.get(name) is not None else {})
    if layout not in KOHYA_LAYOUTS:
        raise UserError(f"{key}: LyCORIS (LoHa/LoKr) files use kohya's module names, which exist for "
                        f"{', '.join(KOHYA_LAYOUTS)} models, not {cls.name}; train a LoRA instead")
    return layout, _config_dict(family.denoiser)


def kohya_names(module, component: str, layout: str, unet_config: Mapping) -> dict[str, str]:
    """kohya name -> module path, for every Linear/Conv module of `module`."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdkit.export.kohya import LoraModule, kohya_name
    from sdkit.export.single_file import UnmappedKeyError

    names = {}
    for path, sub in module.named_modules():
        # A module that already holds an adapter (init_from) is a peft layer around its base_layer.
        if not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)) or ".base_layer" in path:
            continue
        try:
            names[kohya_name(LoraModule(component, path, None, None), layout, unet_config)] = path
        except (UserError, UnmappedKeyError):
            continue  # a module with no original name is never adapted in a kohya file
    return names


# ----------------------------------------------------------------------------- peft -> file


def peft_to_lycoris(module, component: str, layout: str, unet_config: Mapping, adapter: str = ADAPTER) -> dict:
    """The LyCORIS tensors of the peft LoHa/LoKr layers in `module`."""
    import torch
    from peft.tuners.lycoris_utils import LycorisLayer

    from sdkit.export.kohya import LoraModule, kohya_name

    out = {}
    for path, layer in module.named_modules():
        if not isinstance(layer, LycorisLayer) or adapter not in layer.r:
            continue
        name = kohya_name(LoraModule(component, path, None, None), layout, unet_config)
        factors = {}
        for attr in layer.adapter_layer_names:
            params = getattr(layer, attr)
            if adapter in params:
                factors[attr] = params[adapter].detach().float().cpu()
        alpha = float(layer.alpha[adapter])
        if "lokr_w1" in factors and "lokr_w2" in factors:  # LyCORIS applies scale 1 here
            factors["lokr_w2"] = factors["lokr_w2"] * layer.scaling[adapter]
            alpha = float(layer.r[adapter])
        for attr, tensor in factors.items():
            out[f"{name}.{attr}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def network_metadata(algo: str, layout: str, rank: int, alpha: float, network_args: Mapping) -> dict[str, str]:
    from sdkit.export.kohya import KOHYA_LAYOUTS

    kohya = KOHYA_LAYOUTS[layout]
    return {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({"algo": algo, **{k: str(v) for k, v in network_args.items()}}),
        "ss_base_model_version": kohya.base_model_version,
        "ss_v2": str(kohya.v2),
    }


def save_lycoris(path: Path, family, components: Mapping, *, algo: str, rank: int, alpha: float,
                 network_args: Mapping) -> None:
    from safetensors.torch import save_file

    from sdkit.atomic import atomic_write_path

    layout, unet_config = kohya_layout(family)
    tensors = {}
    for component, module in components.items():
        tensors.update(peft_to_lycoris(module, component, layout, unet_config))
    with atomic_write_path(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=network_metadata(algo, layout, rank, alpha, network_args))


# ----------------------------------------------------------------------------- file -> peft


def _module_config(algo: str, parts: dict) -> dict:
    """rank, alpha and LoKr shape options of one module, read from its tensors."""
    from peft.tuners.lokr.layer import factorization

    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if algo == "loha":
        rank = int(parts["hada_w1_b"].shape[0])
        return {"r": rank, "alpha": alpha or rank}
    if "lokr_w1_a" in parts:
        rank = int(parts["lokr_w1_a"].shape[1])
    elif "lokr_w2_a" in parts:
        rank = int(parts["lokr_w2_a"].shape[1])
    else:  # both factors full: LyCORIS applies scale 1; any rank that keeps them full will do
        w2 = parts["lokr_w2"]
        rank = int(max(w2.shape[0], w2.shape[1]))
        alpha = rank
    w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    w2 = parts["lokr_w2"].shape if "lokr_w2" in parts else (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    out_dim, in_dim = w1[0] * w2[0], w1[1] * w2[1]
    default = (factorization(out_dim, -1)[0], factorization(in_dim, -1)[0])
    factor = -1 if tuple(w1[:2]) == default else int(w1[0])
    return {"r": rank, "alpha": alpha or rank, "factor": factor, "decompose_both": "lokr_w1_a" in parts}


def lycoris_to_peft(tensors: Mapping, module, prefix: str, component: str, layout: str, unet_config: Mapping):
    """(peft config, peft state dict) for the modules of `module` that the file adapts, or None."""
    names = kohya_names(module, component, layout, unet_config)
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        stem, _, attr = key.partition(".")
        if not stem.startswith(prefix):
            continue
        if stem not in names:
            raise UserError(f"--lora: '{stem}' in the LyCORIS file names no module of this model's {component}")
        grouped.setdefault(names[stem], {})[attr] = value
    if not grouped:
        return None
    algo = algo_of_keys(next(iter(grouped.values())))
    per_module = {path: _module_config(algo, parts) for path, parts in grouped.items()}
    first = next(iter(per_module.values()))
    rank_pattern = {p: c["r"] for p, c in per_module.items() if c["r"] != first["r"]}
    alpha_pattern = {p: c["alpha"] for p, c in per_module.items() if c["alpha"] != first["alpha"]}
    common = dict(r=first["r"], alpha=first["alpha"], target_modules=sorted(per_module),
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if algo == "loha":
        from peft import LoHaConfig

        config = LoHaConfig(**common)
    else:
        from peft import LoKrConfig

        if len({(c["factor"], c["decompose_both"]) for c in per_module.values()}) > 1:
            raise UserError("--lora: the LoKr modules of this file differ in factor or decomposition; sdkit "
                            "loads LoKr files with one factor")
        config = LoKrConfig(decompose_factor=first["factor"], decompose_both=first["decompose_both"], **common)
    state = {f"{path}.{attr}": value for path, parts in grouped.items() for attr, value in parts.items()
             if attr != "alpha"}
    return config, state


def load_lycoris(family, tensors: Mapping, components: Mapping, adapter_name: str = ADAPTER,
                 key: str = "--lora") -> list[str]:
    """Add the file's LoHa/LoKr adapters to `components` (attr -> module); returns the attrs adapted."""
    from peft.utils import set_peft_model_state_dict

    from sdkit.export.kohya import KOHYA_LAYOUTS

    layout, unet_config = kohya_layout(family, key=key)
    prefixes = KOHYA_LAYOUTS[layout].prefixes
    adapted = []
    for component, module in components.items():
        if component not in prefixes or module is None:
            continue
        found = lycoris_to_peft(tensors, module, prefixes[component], component, layout, unet_config)
        if found is None:
            continue
        config, state = found
        module.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, {k: v.to(module.dtype) for k, v in state.items()},
                                           adapter_name=adapter_name)
        missing = [k for k in getattr(result, "missing_keys", []) if adapter_name in k]
        if missing:
            raise UserError(f"{key}: the LyCORIS file lacks weights for {missing[0]}")
        adapted.append(component)
    if not adapted:
        raise UserError(f"{key}: the LyCORIS file adapts no module of this model")
    return adapted
