"""Where a model lives: hub id, local diffusers folder, an sdkit run folder or one of its checkpoints.

A run folder (it holds the `recipe.yaml` that `sdkit train` writes) is resolved to what it
produced: the pipeline saved in it (full fine-tune) or its base model plus its LoRA file. A
checkpoint (RUN/checkpoints/checkpoint-N) is resolved the same way, to the model it stands for,
built once by sdkit.training.checkpoint_model (the only case that imports torch here).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError, first_line, shorten
from sdkit.recipe import check_local_ref
from sdkit.training.checkpoints import STATE_FILE  # a checkpoint folder holds it (no torch at import)

LORA_FILE = "pytorch_lora_weights.safetensors"
RECIPE_FILE = "recipe.yaml"
MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class ResolvedModel:
    base: str  # hub id or local diffusers folder
    lora: Optional[str] = None  # a LoRA file or folder holding one
    run_dir: Optional[str] = None  # set when the model came from a training run
    checkpoint: Optional[str] = None  # set when it came from one of the run's checkpoints

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
    if (path / STATE_FILE).is_file():
        return _resolve_checkpoint(path, key)
    if (path / "model_index.json").is_file():
        return ResolvedModel(base=str(path), run_dir=str(path) if is_run_dir(path) else None)
    if is_run_dir(path):
        if (path / LORA_FILE).is_file():
            from sdkit.recipe import load_recipe

            recipe = load_recipe(path / RECIPE_FILE)
            if recipe.model.pretrained.lower().endswith(".safetensors"):
                raise UserError(f"{key}: run '{ref}' was trained on the single-file checkpoint "
                                f"'{recipe.model.pretrained}', which {key} does not load yet; load its LoRA "
                                f"({path / LORA_FILE}) into that checkpoint in A1111/ComfyUI or diffusers")
            return ResolvedModel(base=recipe.model.pretrained, lora=str(path / LORA_FILE), run_dir=str(path))
        from sdkit.training.adapters.textual_inversion import LEARNED_EMBEDS  # no torch at import

        if (path / LEARNED_EMBEDS).is_file():
            raise UserError(f"{key}: '{shorten(ref)}' is a textual-inversion run (an embedding, not a model): "
                            f"sdkit generate --model BASE --embedding {shorten(ref)} uses it; eval, export and serve "
                            "take no embeddings")
        raise UserError(f"{key}: run folder '{ref}' holds no result yet (has training finished?)")
    raise UserError(f"{key}: '{ref}' is not a diffusers model folder (no model_index.json)")


def _resolve_checkpoint(path: Path, key: str) -> ResolvedModel:
    """A run's checkpoint: the model it stands for (a LoRA file on the run's base, or a pipeline)."""
    from sdkit.training.checkpoint_model import checkpoint_model, is_checkpoint_dir, run_of

    if not is_checkpoint_dir(path):
        raise UserError(f"{key}: '{shorten(str(path))}' holds a {STATE_FILE} but is not named checkpoint-N")
    run = run_of(path, key)
    model = checkpoint_model(path, key)
    if (model / LORA_FILE).is_file():
        from sdkit.recipe import load_recipe

        return ResolvedModel(base=load_recipe(run / RECIPE_FILE).model.pretrained, lora=str(model / LORA_FILE),
                             run_dir=str(run), checkpoint=str(path))
    return ResolvedModel(base=str(model), run_dir=str(run), checkpoint=str(path))


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


def local_lora_file(ref: str, key: str = "--lora") -> str:
    """The LoRA file on this machine: `ref` itself, or a hub LoRA's file fetched to the cache."""
    path = os.path.expanduser(ref)
    if os.path.isfile(path):
        return path
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(ref, LORA_FILE)
    except Exception as e:  # offline, missing repo or file
        raise UserError(f"{key}: cannot fetch {LORA_FILE} from '{ref}': {type(e).__name__}: {first_line(e)}") from None


# A component of model_index.json is a sub-folder of the model: a plain name, never a path.
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def read_model_index(base: str, revision: Optional[str] = None) -> dict:
    """model_index.json of a local folder or (cache / hub) repo; a component named like a path
    (`../Documents`, `a/b`) is refused: loaders and exports would read or write outside the model."""
    index = read_model_json(base, MODEL_INDEX, revision)
    if not isinstance(index, dict):
        raise UserError(f"'{base}': {MODEL_INDEX} is not a JSON object")
    for component, spec in index.items():
        if isinstance(spec, list) and not component.startswith("_") and (
                not COMPONENT_NAME.fullmatch(component)):
            raise UserError(f"'{base}': {MODEL_INDEX} names a component {shorten(component)!r}, "
                            "which is not a plain folder name (a path out of the model folder is refused)")
    return index


def read_model_json(base: str, name: str, revision: Optional[str] = None, key: Optional[str] = None) -> dict:
    """A JSON file of a model (model_index.json, unet/config.json ...): from a local folder, or
    from the hub through its cache. Problems are UserErrors, prefixed with `key` when given."""
    where = f"{key}: " if key else ""
    folder = Path(os.path.expanduser(base))
    if (folder / name).is_file():
        return _parse_json(folder / name, where)
    if folder.is_dir():
        what = f"is not a diffusers model folder (no {MODEL_INDEX})" if name == MODEL_INDEX else f"has no {name}"
        raise UserError(f"{where}'{base}' {what}")
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(base, name, revision=revision)
    except Exception as e:  # offline, missing repo, gated repo...
        raise UserError(f"{where}cannot read {name} of '{base}': {type(e).__name__}: {first_line(e)}") from None
    return _parse_json(Path(file), where)


def _parse_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nested too deep
        raise UserError(f"{where}'{path}' is not valid JSON ({shorten(first_line(e))})") from None


# ---------------------------------------------------------------------------- LoRA into a pipeline


def load_lora(pipe, ref: str, *, adapter_name: Optional[str] = None, key: str = "--lora") -> None:
    """Load a LoRA (a .safetensors file, a folder holding one, or a hub id) into `pipe`.

    use_safetensors=True: never fall back to unpickling a .bin from a hub repo or folder.
    """
    if _load_lycoris_file(pipe, ref, adapter_name, key):
        return
    kwargs = {"adapter_name": adapter_name} if adapter_name else {}
    try:
        pipe.load_lora_weights(ref, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{key}: cannot load '{ref}' into this model: {first_line(e)}") from None


def _load_lycoris_file(pipe, ref: str, adapter_name: Optional[str], key: str) -> bool:
    """Load a LoHa/LoKr file (LyCORIS layout, which diffusers does not read) through peft;
    False when `ref` is not one."""
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        return False
    from safetensors import safe_open

    from sdkit.families import DETECT, family_class
    from sdkit.training.adapters.lycoris import algo_of_keys, load_lycoris

    with safe_open(str(path), framework="pt", device="cpu") as f:
        if algo_of_keys(f.keys()) is None:
            return False
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = DETECT.get(type(pipe).__name__)
    if name is None:
        raise UserError(f"{key}: LyCORIS files load into {', '.join(sorted(DETECT))} pipelines only")
    family = family_class(name)(dict(pipe.components))
    load_lycoris(family, tensors, pipe.components, adapter_name=adapter_name or "default_0", key=key)
    return True


def fuse_lora(pipe, ref: str, scale: float = 1.0, *, key: str = "--lora") -> None:
    """Merge a LoRA into `pipe`'s weights at `scale` and drop the adapter layers: the result
    needs no peft and runs at the base model's speed."""
    load_lora(pipe, ref, key=key)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
