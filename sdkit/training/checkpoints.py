"""Checkpoints of a run: save, find, verify and resume; no pickle is ever written or read.

A checkpoint folder holds the trainable weights (for LoRA only the adapters), the optimizer,
LR schedule and RNG states (sdkit.training.training_state: safetensors + JSON), each rank's
noise generator, the EMA, and `sdkit_state.json`: the progress counters, the run's shape
(family, method, LoRA rank/alpha/targets, resolution, batch, processes) and the size and
sha256 of every other file. That file is written last and the folder is renamed into place,
so a folder with it was complete; `verify` checks it still is before a resume uses it. A resume
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

from sdkit.errors import UserError, shorten
from sdkit.training import training_state

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
        "data.buckets": recipe.data.buckets,  # the batches of an epoch, hence where the resume continues
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
    """Checkpoints with a state file (complete when written; `verify` says whether still intact), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(folder: Path) -> dict:
    """Size and sha256 of every file of a checkpoint but its state file, by relative path."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def verify(ckpt: Path) -> Optional[str]:
    """What is wrong with a checkpoint (one phrase naming the file), or None when it is intact."""
    try:
        state = read_state(ckpt)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({type(e).__name__})"
    pickles = sorted(p.name for p in Path(ckpt).iterdir() if p.suffix in (".bin", ".pkl"))
    if pickles:
        return f"it holds pickled state ({pickles[0]}) from an older sdkit, which is never loaded"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"{STATE_FILE} lists no files (written by an older sdkit)"
    for rel, want in files.items():
        path = Path(ckpt) / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{rel} is {path.stat().st_size} bytes, {want.get('bytes')} were written (truncated?)"
        if _sha256(path) != want.get("sha256"):
            return f"{rel} does not match its recorded sha256 (damaged)"
    return None


def find_resume_checkpoint(recipe, warn=None) -> Optional[Path]:
    """The checkpoint to resume from: the newest intact one for `auto` (each damaged newer one is
    named through `warn`), or the one named, which must be intact."""
    ref = recipe.train.resume
    if not ref:
        return None
    if ref == "auto":
        found = list_checkpoints(Path(recipe.output_dir))
        damaged = []
        for ckpt in reversed(found):
            problem = verify(ckpt)
            if problem is None:
                for bad, why in damaged:
                    (warn or _stderr)(f"warning: checkpoint {bad} is damaged: {why}; resuming from {ckpt.name} instead")
                return ckpt
            damaged.append((ckpt, problem))
        if damaged:
            bad, why = damaged[0]
            raise UserError(f"train.resume: no intact checkpoint in {Path(recipe.output_dir) / 'checkpoints'} "
                            f"(newest {bad.name}: {why}); remove the damaged ones or choose a new output_dir")
        return None
    path = Path(ref)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume: '{shorten(ref)}' is not a complete sdkit checkpoint (no {STATE_FILE})")
    problem = verify(path)
    if problem:
        raise UserError(f"train.resume: checkpoint {path} is damaged: {problem}")
    return path


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


class Checkpointer:
    """Saves and restores a run's state through its accelerator.

    Single process and DDP (every rank holds the whole state): sdkit's own pickle-free files.
    Sharded engines (DeepSpeed, FSDP, Megatron) hold optimizer and weights in shards only they
    can gather, so they keep accelerate's `save_state`/`load_state` (their own format) through
    `_save_sharded`/`_load_sharded`; those checkpoints are not pickle-free.
    """

    def __init__(self, run_dir: Path, accelerator, adapter, keep: int, log):
        self.root = Path(run_dir) / "checkpoints"
        self.run_dir = Path(run_dir)
        self.acc, self.adapter, self.keep, self.log = accelerator, adapter, keep, log
        if adapter.checkpoints_adapters_only:
            accelerator.register_save_state_pre_hook(self._save_adapters_hook)
            accelerator.register_load_state_pre_hook(self._load_adapters_hook)

    @property
    def sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                             DistributedType.MEGATRON_LM)

    def save(self, progress: Progress, shape: dict, step) -> Path:
        """Write checkpoint-STEP: weights, optimizer, schedule, RNG, EMA, then the state file listing
        every file's size and sha256 (last: a folder with it is complete)."""
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
        if self.sharded:
            self._save_sharded(tmp)
        else:
            training_state.save(tmp, acc, self.adapter, step)
        save_file({"noise_rng": step.noise_rng.get_state()}, str(tmp / f"sdkit_rng_{acc.process_index}.safetensors"))
        if acc.is_main_process and step.ema:
            save_file({k: v.contiguous() for k, v in step.ema.shadow.items()}, str(tmp / EMA_FILE))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {**asdict(progress), "processes": acc.num_processes, "family": shape["model.family"],
                     "shape": shape, "files": file_manifest(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: resume never sees a half-written checkpoint
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"checkpoint {final}")
        acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path, shape: dict, step) -> Progress:
        """Restore weights, optimizer, schedule, RNG and EMA; the shape is checked first. Anything
        that cannot be restored exactly stops the run (UserError naming the checkpoint)."""
        from safetensors.torch import load_file

        acc = self.acc
        saved = read_state(ckpt)
        check_shape(ckpt, saved, shape)
        if self.sharded:
            self._load_sharded(ckpt)
        else:
            training_state.load(ckpt, acc, self.adapter, step, warn=self.log)
        rng_file = ckpt / f"sdkit_rng_{acc.process_index}.safetensors"
        if not rng_file.is_file():
            raise UserError(f"train.resume: {ckpt} has no noise generator state for rank {acc.process_index}")
        step.noise_rng.set_state(load_file(str(rng_file))["noise_rng"])
        if step.ema and (ckpt / EMA_FILE).is_file():
            step.ema.shadow = load_file(str(ckpt / EMA_FILE))
        self.log(f"resumed from {ckpt} at step {saved['step']}")
        return Progress(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])

    def _save_sharded(self, tmp: Path) -> None:
        self.acc.save_state(str(tmp), safe_serialization=True)

    def _load_sharded(self, ckpt: Path) -> None:
        self.acc.load_state(str(ckpt))

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
