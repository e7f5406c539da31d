"""method.init_from: start a run's adapters from an adapter file the user already has.

The file is read by the loader that reads it for generation (diffusers' `load_lora_weights`
for peft and kohya LoRA/DoRA files, sdkit's LyCORIS loader for LoHa/LoKr) into a second
adapter, whose weights are then copied into the adapter that trains and which is then dropped.
So every layout the loaders know can be continued, and a file that does not fit the recipe
(another variant, rank, alpha or target set) is refused in one line before training starts.
"""

from __future__ import annotations

from sdkit.errors import UserError, first_line

KEY = "method.init_from"
INIT = "sdkit_init"


def _read(path: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _file_kind(tensors) -> str:
    from sdkit.training.adapters.lycoris import algo_of_keys

    algo = algo_of_keys(tensors)
    if algo:
        return algo
    return "dora" if any("magnitude" in k or k.endswith(".dora_scale") for k in tensors) else "lora"


def load_initial_weights(adapter, family, modules: list, ref: str) -> None:
    from sdkit.inference.loading import resolve_lora

    path = resolve_lora(ref, key=KEY)
    tensors = _read(path)
    kind = _file_kind(tensors)
    wanted = "dora" if adapter.kind == "lora" and adapter.method.use_dora else adapter.kind
    if kind != wanted:
        raise UserError(f"{KEY}: '{ref}' holds a {kind} adapter; the recipe trains {wanted} "
                        f"(set method.type{'/use_dora' if 'ora' in kind else ''} to match)")
    components = dict(zip(adapter.component_attrs(family, modules), modules))
    if kind in ("loha", "lokr"):
        from sdkit.training.adapters.lycoris import load_lycoris

        load_lycoris(family, tensors, components, adapter_name=INIT, key=KEY)
    else:
        pipe = family.pipeline(**components)
        try:
            pipe.load_lora_weights(path, adapter_name=INIT, use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{KEY}: cannot read '{ref}': {first_line(e)}") from None
    for attr, module in components.items():
        _copy_adapter(module, attr, ref)


def _copy_adapter(module, attr: str, ref: str) -> None:
    """Copy adapter INIT's weights into 'default' (same layers, ranks, scales), then drop INIT."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if INIT not in getattr(module, "peft_config", {}):
        raise UserError(f"{KEY}: '{ref}' holds no weights for the {attr}, which this run trains")
    for name, layer in module.named_modules():
        if not isinstance(layer, BaseTunerLayer) or "default" not in layer.scaling:
            continue
        if INIT not in layer.scaling:
            raise UserError(f"{KEY}: '{ref}' has no weights for {attr}.{name}; set method.target_modules "
                            "to the modules the file adapts")
        if abs(layer.scaling[INIT] - layer.scaling["default"]) > 1e-6:
            r = layer.r["default"]
            raise UserError(f"{KEY}: '{ref}' was trained with strength alpha/rank = {layer.scaling[INIT]:g} at "
                            f"{attr}.{name}; set method.alpha={layer.scaling[INIT] * r:g} (rank {r})")
    init = get_peft_model_state_dict(module, adapter_name=INIT)
    default = get_peft_model_state_dict(module, adapter_name="default")
    for key, value in init.items():
        if key not in default:
            raise UserError(f"{KEY}: '{ref}' adapts {attr}.{key.rsplit('.', 2)[0]}, which this run does not; "
                            "set method.target_modules to the file's modules")
        if value.shape != default[key].shape:
            raise UserError(f"{KEY}: '{ref}' has shape {tuple(value.shape)} at {attr}.{key}, the recipe gives "
                            f"{tuple(default[key].shape)}; set method.rank (and lokr keys) to the file's")
    if init.keys() != default.keys():
        missing = sorted(set(default) - set(init))[0]
        raise UserError(f"{KEY}: '{ref}' lacks {attr}.{missing}; set method.target_modules to the file's modules")
    set_peft_model_state_dict(module, {k: v.float() for k, v in init.items()}, adapter_name="default")
    module.delete_adapters(INIT) if hasattr(module, "delete_adapters") else module.delete_adapter(INIT)
    module.set_adapter("default")
