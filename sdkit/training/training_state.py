"""What a checkpoint restores, for one process or DDP (every rank holds the whole state), as
safetensors + JSON (sdkit.training.state_io), never a pickle:

    trainable_I.safetensors         module I's trainable weights (LoRA: the adapters; full: all)
    optimizer.{json,safetensors}    the optimizer's state_dict (any torch optimizer)
    scheduler.{json,safetensors}    the LR schedule's state_dict
    scaler.{json,safetensors}       the fp16 gradient scaler's, when there is one
    rng_R.{json,safetensors}        rank R's Python, numpy, torch (and CUDA) RNG states

Rank 0 writes the shared files; each rank writes its own RNG. A piece that is missing or does
not fit stops the resume with one line: a resume that cannot be exact does not pretend to be.
"""

from __future__ import annotations

from pathlib import Path

from sdkit.errors import UserError, first_line, shorten
from sdkit.training.state_io import StateFormatError, load_tree, save_tree


def _modules(step) -> list:
    return [getattr(m, "_orig_mod", m) for m in step.modules]  # undo torch.compile


def _cpu_tensors(state: dict) -> dict:
    """Detached CPU copies; tensors sharing memory (tied weights) each get their own, as safetensors requires."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        if ptr is not None:
            seen.add(ptr)
    return out


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, warn) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warn("[yellow]warning: the checkpoint's CUDA random state does not fit this machine's GPUs: "
                 "the resumed run is not bit-exact[/]")


def save(folder: Path, acc, adapter, step) -> None:
    from safetensors.torch import save_file

    if acc.is_main_process:
        for i, module in enumerate(_modules(step)):
            save_file(_cpu_tensors(adapter.trainable_state(module)), str(folder / f"trainable_{i}.safetensors"))
        save_tree(step.optimizer.state_dict(), folder / "optimizer")
        save_tree(step.lr_scheduler.state_dict(), folder / "scheduler")
        if acc.scaler is not None:
            save_tree(acc.scaler.state_dict(), folder / "scaler")
        save_tree({"accelerator_step": acc.step}, folder / "accelerator")
    save_tree(rng_state(), folder / f"rng_{acc.process_index}")


def load(folder: Path, acc, adapter, step, *, warn) -> None:
    from safetensors.torch import load_file

    def need(name: str) -> Path:
        path = folder / name
        if not path.is_file():
            raise UserError(f"train.resume: {folder} has no {name}; it cannot be resumed exactly")
        return path

    try:
        for i, module in enumerate(_modules(step)):
            adapter.load_trainable_state(module, load_file(str(need(f"trainable_{i}.safetensors"))))
        need("optimizer.json"), need("scheduler.json"), need(f"rng_{acc.process_index}.json")
        step.optimizer.load_state_dict(load_tree(folder / "optimizer"))
        step.lr_scheduler.load_state_dict(load_tree(folder / "scheduler"))
        if acc.scaler is not None:
            acc.scaler.load_state_dict(load_tree(need("scaler.json").with_suffix("")))
        acc.step = load_tree(need("accelerator.json").with_suffix(""))["accelerator_step"]
        set_rng_state(load_tree(folder / f"rng_{acc.process_index}"), warn)
    except (StateFormatError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"train.resume: {folder} does not fit this run ({type(e).__name__}: "
                        f"{shorten(first_line(e))})") from None
