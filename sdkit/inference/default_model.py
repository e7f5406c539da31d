"""The model a command uses when none is named: the one rule generate, eval, export, serve and ui share.

`--model` when given; else `SDKIT_MODEL` from the environment; else the newest *complete*
training run under `./runs` (the model you just trained). A run is complete when its result
and then its model card were written (`Trainer.finish` writes the card after the result), so a
run stopped mid-training or mid-save is skipped, and named when it is newer than the choice.
With none of the three there is no guess: a one-line UserError says how to pass one (a silent
fall-back to a multi-GB hub model would start a download the user did not ask for).

`use_model(given)` chooses and prints the line saying which model and why; `choose_model` only
chooses. Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from sdkit.errors import UserError
from sdkit.inference.loading import LORA_FILE, MODEL_INDEX, RECIPE_FILE, is_run_dir
from sdkit.recipe import check_local_ref

ENV_VAR = "SDKIT_MODEL"
RUNS_DIR = Path("runs")
MODEL_CARD = "README.md"  # written last by a finished run
NAMED_AT_MOST = 3  # interrupted runs named in the line; the rest are counted

FLAG, ENV, RUNS = "--model", ENV_VAR, "runs"  # where a choice came from


@dataclass(frozen=True)
class ModelChoice:
    ref: str  # what to load: hub id, diffusers folder or run folder
    source: str  # FLAG, ENV or RUNS
    runs_dir: str = str(RUNS_DIR)
    skipped: tuple[str, ...] = ()  # interrupted runs newer than the choice

    @property
    def run_dir(self) -> Optional[str]:
        return self.ref if is_run_dir(self.ref) else None

    def reason(self) -> str:
        if self.source == FLAG:
            return "--model"
        if self.source == ENV:
            return f"from {ENV_VAR}; --model to choose another"
        why = f"newest complete run in {_shown(self.runs_dir)}"
        if self.skipped:
            named = ", ".join(self.skipped[:NAMED_AT_MOST])
            more = f" and {len(self.skipped) - NAMED_AT_MOST} more" if len(self.skipped) > NAMED_AT_MOST else ""
            why += f", skipping interrupted {named}{more}"
        return why + "; --model to choose"

    def line(self, beside: Optional[str] = None) -> str:
        """`model: runs/sdxl-lora (newest complete run in ./runs; --model to choose)`."""
        also = f", beside its base model {beside}" if beside else ""
        return f"model: {self.ref} ({self.reason()}){also}"


def run_is_complete(run: str | os.PathLike) -> bool:
    """A run folder whose result (pipeline or LoRA file) and model card were written."""
    run = Path(run)
    has_result = (run / MODEL_INDEX).is_file() or (run / LORA_FILE).is_file()
    return is_run_dir(run) and has_result and (run / MODEL_CARD).is_file()


def _finished_at(run: Path) -> float:
    """A complete run: when its card was written; an interrupted one: when it was last touched."""
    if run_is_complete(run):
        return (run / MODEL_CARD).stat().st_mtime
    return max(run.stat().st_mtime, (run / RECIPE_FILE).stat().st_mtime)


def newest_complete_run(runs_dir: str | os.PathLike = RUNS_DIR) -> tuple[Optional[Path], list[Path]]:
    """(the newest complete run folder or None, the interrupted runs newer than it, newest first)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None, []
    runs = sorted((d for d in root.iterdir() if d.is_dir() and is_run_dir(d)), key=_finished_at, reverse=True)
    interrupted = []
    for run in runs:
        if run_is_complete(run):
            return run, interrupted
        interrupted.append(run)
    return None, interrupted


def choose_model(given: Optional[str] = None, *, env: Optional[Mapping[str, str]] = None,
                 runs_dir: str | os.PathLike = RUNS_DIR) -> ModelChoice:
    """--model > SDKIT_MODEL > newest complete run under `runs_dir`; a UserError when there is none
    (or when a given local folder is missing: that error, not the choice, is then the one line)."""
    if given:
        check_local_ref(given, FLAG)
        return ModelChoice(given, FLAG)
    env = os.environ if env is None else env
    if env.get(ENV_VAR, "").strip():
        check_local_ref(env[ENV_VAR].strip(), ENV_VAR)
        return ModelChoice(env[ENV_VAR].strip(), ENV)
    run, interrupted = newest_complete_run(runs_dir)
    skipped = tuple(str(p) for p in interrupted)
    if run is not None:
        return ModelChoice(str(run), RUNS, runs_dir=str(runs_dir), skipped=skipped)
    where = f"{_shown(runs_dir)} holds no complete training run"
    if skipped:
        where += f" (interrupted: {', '.join(skipped[:NAMED_AT_MOST])})"
    raise UserError(f"--model: none given, {ENV_VAR} is not set and {where}; pass --model "
                    f"(a hub id, a diffusers folder or a run folder), set {ENV_VAR}, or train one with `sdkit train RECIPE`")


def use_model(given: Optional[str] = None, **kwargs) -> ModelChoice:
    """choose_model, then print the line saying which model and why (on stderr: stdout stays the output)."""
    choice = choose_model(given, **kwargs)
    print(choice.line(), file=sys.stderr, flush=True)
    return choice


def base_model_of(run_dir: str | os.PathLike) -> str:
    """The base model a run was trained from, as its recipe names it."""
    from sdkit.recipe import load_recipe

    return load_recipe(Path(run_dir) / RECIPE_FILE).model.pretrained


def models_to_compare(given: Optional[list[str]], **kwargs) -> list[str]:
    """What `sdkit eval` scores: the models given; else the default model and, when it is a
    training run, the base model it was trained from beside it (what fine-tuning changed)."""
    if given:
        for ref in given:
            check_local_ref(ref, FLAG)
        print(f"model: {', '.join(given)} (--model)", file=sys.stderr, flush=True)
        return list(given)
    choice = choose_model(None, **kwargs)
    base = base_model_of(choice.run_dir) if choice.run_dir else None
    print(choice.line(beside=base), file=sys.stderr, flush=True)
    return [choice.ref] + ([base] if base else [])


def _shown(runs_dir: str | os.PathLike) -> str:
    """`./runs` for a relative folder (as users type it), the path itself otherwise."""
    text = str(runs_dir)
    return text if os.path.isabs(text) or text.startswith(".") else f"./{text}"
