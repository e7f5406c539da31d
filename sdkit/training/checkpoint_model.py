"""A checkpoint of a training run as a model: what `--model RUN/checkpoints/checkpoint-N` loads.

A checkpoint holds what trains (LoRA: the adapters; full: the denoiser and text encoders) in the
trainer's layout, not a model. The run's own pieces turn it into one: the family from the run's
resolved recipe, the adapter attached as the trainer attaches it, the checkpoint's trainable state
(and EMA, as the final result applies it) loaded into it, and the adapter's `save` writing what
the run's result would have been at that step: a LoRA file, or a diffusers folder.

That result is kept in the user's cache (SDKIT_CACHE, else $XDG_CACHE_HOME/sdkit or ~/.cache/sdkit,
under checkpoints/), named by the checkpoint's state file (which lists the sha256 of every file it
holds) and the run's recipe, so a later use costs nothing, a rewritten checkpoint is built again,
and sdkit.inference loads it like any other model. Nothing here unpickles: the checkpoint is
verified against its recorded sha256s, then read as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from sdkit.errors import UserError, first_line, shorten
from sdkit.inference.loading import RECIPE_FILE
from sdkit.training.checkpoints import CHECKPOINT_RE, EMA_FILE, STATE_FILE, read_state, verify

DONE_FILE = "sdkit_checkpoint.json"  # written last into a cache entry: its presence marks it complete
FORMAT = 1  # bump when what a cache entry holds changes: older entries are then rebuilt


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint folder of sdkit's (its state file marks it complete); no torch."""
    path = Path(path)
    return bool(CHECKPOINT_RE.match(path.name)) and (path / STATE_FILE).is_file()


def cache_root() -> Path:
    if os.environ.get("SDKIT_CACHE"):
        return Path(os.environ["SDKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sdkit"


def run_of(ckpt: Path, key: str = "--model") -> Path:
    """The run folder a checkpoint belongs to (RUN/checkpoints/checkpoint-N), which holds its recipe."""
    run = Path(ckpt).resolve().parent.parent
    if not (run / RECIPE_FILE).is_file():
        raise UserError(f"{key}: checkpoint '{shorten(str(ckpt))}' is not inside its run folder "
                        f"(RUN/checkpoints/checkpoint-N next to RUN/{RECIPE_FILE}, which says how to rebuild the model)")
    return run


def cache_entry(ckpt: Path, key: str = "--model") -> Path:
    """Where the model of `ckpt` is (or will be) kept: named by its state file and the run's recipe."""
    run = run_of(ckpt, key)
    digest = hashlib.sha256(f"sdkit-checkpoint-model {FORMAT}\n".encode())
    for path in (Path(ckpt) / STATE_FILE, run / RECIPE_FILE):
        digest.update(path.read_bytes())
    return cache_root() / "checkpoints" / f"{run.name}-{Path(ckpt).name}-{digest.hexdigest()[:16]}"


def checkpoint_model(ckpt: Path, key: str = "--model", log=None) -> Path:
    """The folder holding the model of checkpoint `ckpt` (built on first use): a LoRA file
    (pytorch_lora_weights.safetensors) for adapter runs, a diffusers pipeline for full fine-tunes."""
    ckpt = Path(ckpt)
    entry = cache_entry(ckpt, key)
    if (entry / DONE_FILE).is_file():
        return entry
    problem = verify(ckpt)
    if problem:
        raise UserError(f"{key}: checkpoint {ckpt} is damaged: {problem}")
    if not (ckpt / "trainable_0.safetensors").is_file():
        raise UserError(f"{key}: checkpoint {ckpt} was written by a sharded engine (DeepSpeed/FSDP) in its own "
                        "format; sdkit rebuilds models from single-process or DDP checkpoints only")
    (log or _stderr)(f"building the model of {ckpt} (once; kept in {entry.parent})")
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        step = _save_model(ckpt, run_of(ckpt, key), tmp, key)
        (tmp / DONE_FILE).write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "step": step}))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first: its copy is as good
            if not (entry / DONE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _save_model(ckpt: Path, run: Path, out: Path, key: str) -> int:
    """Rebuild the run's trainable modules at the checkpoint and save them with the run's adapter."""
    import torch
    from safetensors.torch import load_file

    from sdkit.families import family_class, resolve_family_name
    from sdkit.recipe import load_recipe
    from sdkit.training import build
    from sdkit.training.adapters import make_adapter

    recipe = load_recipe(run / RECIPE_FILE)
    state = read_state(ckpt)
    family_name = resolve_family_name(recipe.model)
    # init_from only seeds a fresh run; the checkpoint's weights replace it, so it is not read again.
    adapter = make_adapter(recipe.method.model_copy(update={"init_from": None}))
    _check_shape(ckpt, state, adapter.shape(family_class(family_name)), key)
    precision, _ = build.run_precision(recipe.train.mixed_precision, torch.cuda.is_available())
    family = build.load_family(recipe, family_name, build.weight_dtype(precision))
    modules = adapter.attach(family, dtype=build.trained_dtype(recipe))
    try:
        for i, module in enumerate(modules):
            path = ckpt / f"trainable_{i}.safetensors"
            if not path.is_file():
                raise UserError(f"{key}: checkpoint {ckpt} has no {path.name} for the run's module {i}")
            adapter.load_trainable_state(module, load_file(str(path)))
        if recipe.ema_applies and (ckpt / EMA_FILE).is_file():  # the final result is the EMA's too
            _copy_ema(modules[0], load_file(str(ckpt / EMA_FILE)))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{key}: checkpoint {ckpt} does not fit its run's recipe ({type(e).__name__}: "
                        f"{shorten(first_line(e))})") from None
    adapter.save(family, modules, out)
    return int(state.get("step", 0))


def _check_shape(ckpt: Path, state: dict, current: dict, key: str) -> None:
    """The method keys the checkpoint was trained with must be the recipe's (a resumed run with
    another rank, say, has a recipe.yaml that no longer describes its older checkpoints)."""
    saved = state.get("shape") or {}
    for name, value in current.items():
        if name in saved and saved[name] != value:
            raise UserError(f"{key}: checkpoint {ckpt} was trained with {name}={saved[name]!r}, its run's "
                            f"recipe.yaml says {value!r}; it cannot be rebuilt from this run folder")


def _copy_ema(module, shadow: dict) -> None:
    import torch

    params = dict(module.named_parameters())
    if not set(shadow) <= set(params):
        raise KeyError(f"EMA weights for {sorted(set(shadow) - set(params))[0]}, which the model lacks")
    with torch.no_grad():
        for name, value in shadow.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)
