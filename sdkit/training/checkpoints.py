"""Checkpoints of a run: save, find, verify and resume; no pickle is ever written or read.

A checkpoint folder holds accelerate's state (safetensors; for LoRA only the adapters), each
rank's noise generator, the EMA, and `sdkit_state.json`: the progress counters and the run's
shape (family, method, LoRA rank/alpha/targets, resolution, batch, processes). That file is
written last and the folder is renamed into place, so a folder with it is complete. A resume
whose recipe changes the shape is refused with one line naming the key, before any tensor loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "sdkit_state.json"  # written last: its presence marks a complete checkpoint
EMA_FILE = "ema.safetensors"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's micro-batches consumed in the current epoch


def run_shape(recipe, family_name: str, adapter, family, processes: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint, by recipe key."""
    return {
        "model.family": family_name,
        **adapter.shape(family),
        "data.resolution": recipe.data.resolution,
        "train.batch_size": recipe.train.batch_size,
        "train.gradient_accumulation": recipe.train.gradient_accumulation,
        "processes": processes,
    }


def check_shape(ckpt: Path, saved: dict, current: dict) -> None:
    """One line naming the first key whose value differs from the checkpoint's."""
    old = saved.get("shape") or {"processes": saved.get("processes", current["processes"])}
    for key, value in old.items():
        if key in current and current[key] != value:
            if key == "processes":
                raise UserError(
                    f"train.resume: {ckpt} was written by {value} processes, this run has {current[key]}; "
                    "resume with the same accelerate config"
                )
            raise UserError(
                f"{key}: the checkpoint {ckpt} was trained with {value!r}, the recipe says {current[key]!r}; "
                f"resume with {key}={value} or start a new output_dir"
            )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def find_resume_checkpoint(recipe) -> Optional[Path]:
    ref = recipe.train.resume
    if not ref:
        return None
    if ref == "auto":
        found = list_checkpoints(Path(recipe.output_dir))
        return found[-1] if found else None
    path = Path(ref)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume: '{ref}' is not a complete sdkit checkpoint (no {STATE_FILE})")
    return path


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


class Checkpointer:
    """Saves and restores a run's state through its accelerator."""

    def __init__(self, run_dir: Path, accelerator, adapter, keep: int, log):
        self.root = Path(run_dir) / "checkpoints"
        self.run_dir = Path(run_dir)
        self.acc, self.adapter, self.keep, self.log = accelerator, adapter, keep, log
        if adapter.checkpoints_adapters_only:
            accelerator.register_save_state_pre_hook(self._save_adapters_hook)
            accelerator.register_load_state_pre_hook(self._load_adapters_hook)

    def save(self, progress: Progress, shape: dict, noise_rng, ema) -> Path:
        from safetensors.torch import save_file

        acc = self.acc
        final = self.root / f"checkpoint-{progress.step:07d}"
        # Every rank writes into the same temporary folder, so its name is fixed (not
        # sdkit.atomic's per-process one); the main rank renames it once all have written.
        tmp = self.root / f".tmp-checkpoint-{progress.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        save_file({"noise_rng": noise_rng.get_state()}, str(tmp / f"sdkit_rng_{acc.process_index}.safetensors"))
        if acc.is_main_process and ema:
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / EMA_FILE))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {**asdict(progress), "processes": acc.num_processes, "family": shape["model.family"], "shape": shape}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: resume never sees a half-written checkpoint
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"checkpoint {final}")
        acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path, shape: dict, noise_rng, ema) -> Progress:
        """Restore weights, optimizer, schedule, RNG and EMA; the shape is checked first."""
        from safetensors.torch import load_file

        acc = self.acc
        saved = read_state(ckpt)
        check_shape(ckpt, saved, shape)
        acc.load_state(str(ckpt))
        noise_rng.set_state(load_file(str(ckpt / f"sdkit_rng_{acc.process_index}.safetensors"))["noise_rng"])
        if ema and (ckpt / EMA_FILE).is_file():
            ema.shadow = load_file(str(ckpt / EMA_FILE))
        self.log(f"resumed from {ckpt} at step {saved['step']}")
        return Progress(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])

    def _save_adapters_hook(self, models, weights, output_dir) -> None:
        """accelerate save_state hook: write adapter weights instead of whole models."""
        from safetensors.torch import save_file

        if not weights:  # DeepSpeed/FSDP save their own way
            return
        for i, model in enumerate(models):
            state = self.adapter.trainable_state(self.acc.unwrap_model(model))
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, f"{output_dir}/adapters_{i}.safetensors")
        weights.clear()

    def _load_adapters_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            state = load_file(f"{input_dir}/adapters_{i}.safetensors")
            self.adapter.load_trainable_state(self.acc.unwrap_model(model), state)
        models.clear()
