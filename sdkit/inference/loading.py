"""Where a model lives: hub id, local diffusers folder, or an sdkit run folder.

A run folder (it holds the `recipe.yaml` that `sdkit train` writes) is resolved to what it
produced: the pipeline saved in it (full fine-tune) or its base model plus its LoRA file.
No torch import here: the CLI calls this to fail fast on bad paths.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError
from sdkit.recipe import check_local_ref

LORA_FILE = "pytorch_lora_weights.safetensors"
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class ResolvedModel:
    base: str  # hub id or local diffusers folder
    lora: Optional[str] = None  # a LoRA file or folder holding one
    run_dir: Optional[str] = None  # set when the model came from a training run

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.base)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RECIPE_FILE).is_file()


def resolve_model(ref: str, key: str = "--model") -> ResolvedModel:
    """Turn what the user typed into a base model (+ LoRA when it is a LoRA run)."""
    check_local_ref(ref, key)
    path = Path(os.path.expanduser(ref))
    if not path.exists():
        return ResolvedModel(base=ref)  # a hub id; loading reports if it is wrong
    if path.is_file():
        raise UserError(f"{key}: '{ref}' is a file; pass a diffusers model folder or a training run folder")
    if (path / "model_index.json").is_file():
        return ResolvedModel(base=str(path), run_dir=str(path) if is_run_dir(path) else None)
    if is_run_dir(path):
        if (path / LORA_FILE).is_file():
            from sdkit.recipe import load_recipe

            recipe = load_recipe(path / RECIPE_FILE)
            return ResolvedModel(base=recipe.model.pretrained, lora=str(path / LORA_FILE), run_dir=str(path))
        raise UserError(f"{key}: run folder '{ref}' holds no result yet (has training finished?)")
    raise UserError(f"{key}: '{ref}' is not a diffusers model folder (no model_index.json)")


def resolve_lora(ref: str, key: str = "--lora") -> str:
    """A LoRA file, a folder with pytorch_lora_weights.safetensors, or a LoRA run folder."""
    path = Path(os.path.expanduser(ref))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{key}: '{ref}' is not a .safetensors file (pickled weights are not loaded)")
        return str(path)
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return str(path / LORA_FILE)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return str(found[0])
        raise UserError(f"{key}: no {LORA_FILE} in '{ref}'")
    check_local_ref(ref, key)
    return ref  # hub repo id holding a LoRA


def read_model_index(base: str, revision: Optional[str] = None) -> dict:
    """model_index.json of a local folder or (cache / hub) repo."""
    local = Path(os.path.expanduser(base)) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(os.path.expanduser(base)):
        raise UserError(f"'{base}' is not a diffusers model folder (no model_index.json)")
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(base, "model_index.json", revision=revision)
    except Exception as e:  # offline, missing repo, gated repo...
        raise UserError(f"cannot read model_index.json of '{base}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return json.loads(Path(file).read_text())
