"""Tensors between the parts of a split model (`sdkit serve --split`): Open Inference Protocol v2 tensors.

Wire format: datatype "FP32", "shape" the tensor's shape, "data" its values flat in row-major order (JSON).
FP32 because KServe's REST server refuses FP16 in JSON (it needs the protocol's binary extension) and FP32
survives JSON exactly (Python writes each float's shortest round-tripping repr), so a chain of parts gives
the whole pipeline's pixels; a server running in fp16/bf16 sends its tensors upcast to FP32. Servers also
take FP16/FP64 (FP16 only through KServe's binary extension); every tensor is checked against the shape the
model expects before anything runs on it, since a request is untrusted.
"""

from __future__ import annotations

from typing import Any, Optional

FLOAT_TYPES = {"FP16": "float16", "FP32": "float32", "FP64": "float64"}

from sdkit.export.handler_requests import RequestError, show  # the shared errors: a 400 naming the input


def to_v2(name: str, tensor) -> dict:
    """A torch tensor as a v2 output/input tensor (FP32, flat data)."""
    values = tensor.detach().float().cpu()
    return {"name": name, "datatype": "FP32", "shape": list(values.shape), "data": values.flatten().tolist()}


def from_v2(tensor: Any):
    """A v2 tensor (a dict, or KServe's InferInput/InferOutput) as a float32 torch tensor; RequestError if malformed."""
    import numpy as np
    import torch

    name = tensor_field(tensor, "name")
    datatype = tensor_field(tensor, "datatype")
    if datatype not in FLOAT_TYPES:
        raise RequestError(f"input {show(name)} must be FP32 (or FP16/FP64), got datatype {show(datatype)}")
    shape = tensor_field(tensor, "shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise RequestError(f"input {show(name)} has shape {show(shape)}; give its sizes, e.g. [1, 77, 768]")
    try:
        if hasattr(tensor, "as_numpy"):  # KServe decoded it: JSON data or the binary extension
            array = tensor.as_numpy()
        else:
            array = np.array(_flat(tensor.get("data")), dtype=FLOAT_TYPES[datatype]).reshape(shape)
    except (ValueError, TypeError) as e:
        raise RequestError(f"input {show(name)}: data does not fit shape {show(shape)} ({show(str(e))})") from None
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise RequestError(f"input {show(name)} holds NaN or infinite values")
    return torch.from_numpy(array.copy())


def check_shape(name: str, tensor, expected: tuple, max_batch: int, what: str = "") -> None:
    """[batch, *expected] with 1 <= batch <= max_batch; `expected` None-free sizes the model takes."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) + 1 or shape[1:] != tuple(expected) or not 1 <= shape[0] <= max_batch:
        want = ", ".join(str(s) for s in ("N", *expected))
        raise RequestError(f"input '{name}' has shape {list(shape)}; this model takes [{want}] with N from 1 to "
                           f"{max_batch}{what}")


def tensor_field(tensor: Any, key: str) -> Optional[Any]:
    """A field of a v2 tensor given as a JSON dict or as KServe's InferInput/InferOutput."""
    if isinstance(tensor, dict):
        return tensor.get(key)
    return getattr(tensor, key, None)


def _flat(values: Any) -> list:
    if not isinstance(values, list):
        raise RequestError("tensor data must be a list of numbers")
    if values and isinstance(values[0], list):
        return [v for row in values for v in _flat(row)]
    return values
