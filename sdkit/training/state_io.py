"""Training state without pickles: a tree of dicts, lists, tuples, numbers, strings, tensors and
numpy arrays as NAME.safetensors (every tensor) + NAME.json (the rest, pointing at the tensors).

Written for any `torch.optim` optimizer's `state_dict()` (AdamW, bitsandbytes' 8-bit AdamW,
Prodigy, schedule-free ...), LR schedulers, GradScaler and the RNG states of Python, numpy and
torch, so a checkpoint someone hands you loads without unpickling anything: `torch.load` and
accelerate's `optimizer.bin`/`random_states_*.pkl` are never used. Loading gives back exactly
what was saved: tuples stay tuples, int keys stay ints, dtypes and bit patterns are kept. A
value of any other type is refused when saving (loudly), never stored approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TAG = "__sdkit__"  # a JSON object with this key is an encoded value, not a plain mapping


class StateFormatError(ValueError):
    """Something cannot be stored (or read back) exactly without a pickle."""


def _encode(value: Any, tensors: dict) -> Any:
    import numpy as np
    import torch

    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return {TAG: "npscalar", "dtype": value.dtype.str, "v": _encode(value.item(), tensors)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # repr keeps every bit of a float; JSON's NaN/Infinity are not standard JSON
        return value if value == value and abs(value) != float("inf") else {TAG: "float", "v": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {TAG: "tensor", "v": name, "device": str(value.device)}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {TAG: "ndarray", "v": name}
    if isinstance(value, torch.dtype):
        return {TAG: "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {TAG: "dict", "v": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    kind = type(value).__qualname__
    raise StateFormatError(f"cannot store a {kind} without pickle (checkpoint state)")


def _decode(value: Any, tensors: dict) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if kind == "float":
        return float(value["v"])
    if kind == "tensor":
        return tensors[value["v"]]  # on the CPU: optimizers and RNG setters move what they need
    if kind == "ndarray":
        return tensors[value["v"]].numpy()
    if kind == "npscalar":
        import numpy as np

        return np.dtype(value["dtype"]).type(_decode(value["v"], tensors))
    if kind == "dtype":
        import torch

        dtype = getattr(torch, value["v"], None)
        if not isinstance(dtype, torch.dtype):
            raise StateFormatError(f"unknown dtype {value['v']!r}")
        return dtype
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value["v"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["v"]}
    raise StateFormatError(f"unknown entry {kind!r}")


def save_tree(tree: Any, stem: Path) -> list[Path]:
    """Write `stem`.json and `stem`.safetensors; returns both paths."""
    from safetensors.torch import save_file

    stem = Path(stem)
    tensors: dict = {}
    encoded = _encode(tree, tensors)
    json_path, tensor_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps({"sdkit_state_tree": 1, "tree": encoded}))
    return [json_path, tensor_path]


def load_tree(stem: Path) -> Any:
    from safetensors.torch import load_file

    stem = Path(stem)
    data = json.loads(stem.with_name(stem.name + ".json").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("sdkit_state_tree") != 1:
        raise StateFormatError(f"{stem.name}.json is not an sdkit state file")
    return _decode(data["tree"], load_file(str(stem.with_name(stem.name + ".safetensors"))))
