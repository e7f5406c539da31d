"""Single-file checkpoints as base models (the one `.safetensors` file A1111/ComfyUI users download).

Torch-free: the recipe and the CLI ask it before anything loads. Which pipeline class reads a file
and with which extra arguments is the families' business (`Family.load`); this module only says
what counts as a single file, refuses pickles and names where the diffusers configs come from.
"""

from __future__ import annotations

import os
from typing import Optional

SINGLE_FILE_SUFFIX = ".safetensors"
# Pickled checkpoints run code when loaded: sdkit never opens them.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def pickle_refusal(ref: str) -> Optional[str]:
    """Why `ref` is refused (a pickled single file), or None."""
    if ref.lower().endswith(PICKLE_SUFFIXES):
        return (f"'{ref}' is a pickled checkpoint, which sdkit never loads (loading a pickle can run code); "
                f"use a .safetensors single file or a diffusers folder")
    return None


def is_single_file(ref: Optional[str]) -> bool:
    """True when `ref` names a single-file `.safetensors` checkpoint on this machine."""
    return bool(ref) and ref.lower().endswith(SINGLE_FILE_SUFFIX) and os.path.isfile(os.path.expanduser(ref))


def config_source(model_cfg) -> Optional[str]:
    """Where the diffusers configs (model_index.json, component configs, tokenizers) come from:
    `model.config` when set, else the model itself; None for a single file without one
    (diffusers then infers its config repo from the checkpoint's keys, which needs the hub)."""
    if model_cfg.config:
        return model_cfg.config
    return None if is_single_file(model_cfg.pretrained) else model_cfg.pretrained


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


def inferred_config_repo(path: str) -> str:
    """The hub repo whose configs diffusers' `from_single_file` takes for this checkpoint, told
    from its tensor names and shapes (read from the header; no weights are loaded)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import safe_open

    with safe_open(os.path.expanduser(path), framework="pt") as f:
        shapes = {name: _Shape(f.get_slice(name).get_shape()) for name in f.keys()}
    return fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
