"""What the Runs tab reads from a training run's folder, while the run writes it.

The layout is the trainer's (sdkit.training.trainer): recipe.yaml, logs/ (TensorBoard events
through accelerate), samples/step-NNNNNNN/PP-K.png (prompt PP of validation.prompts, image K),
checkpoints/. plan.json / bench.json are shown when someone saved `sdkit plan` / `sdkit bench`
figures there. Every reader tolerates a run that is half written: a missing file reads as
nothing yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from sdkit.inference.loading import RECIPE_FILE, is_run_dir

SAMPLE_STEP_RE = re.compile(r"^step-(\d+)$")
SAMPLE_FILE_RE = re.compile(r"^(\d+)-(\d+)\.png$")
CURVES = {"train/loss": "loss", "train/lr": "lr"}  # the trainer's TensorBoard tags -> curve names
FIGURE_FILES = ("plan.json", "bench.json")
MAX_SAMPLE_STEPS = 12  # the newest rows of the grid; a long run has hundreds
MAX_RUN_COLUMNS = 6  # Generate's columns for one run: checkpoints spread over the run, then its result
FINAL_LABEL = "final result"


def find_runs(roots: list[str]) -> list[str]:
    """Run folders among `roots`: each root is a run folder or a folder of runs (./runs)."""
    found = []
    for root in roots:
        path = Path(root).expanduser()
        if is_run_dir(path):
            found.append(str(path))
        elif path.is_dir():
            found += [str(p) for p in sorted(path.iterdir()) if p.is_dir() and is_run_dir(p)]
    return list(dict.fromkeys(found))


def read_recipe_text(run_dir: str) -> str:
    path = Path(run_dir) / RECIPE_FILE
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def validation_prompts(run_dir: str) -> list[str]:
    """The run's validation prompts, from its resolved recipe (safe_load: the folder may be anyone's)."""
    import yaml

    try:
        recipe = yaml.safe_load(read_recipe_text(run_dir)) or {}
        prompts = (recipe.get("validation") or {}).get("prompts") or []
    except (yaml.YAMLError, AttributeError):
        return []
    return [str(p) for p in prompts]


def read_curves(run_dir: str):
    """Loss and lr per step from the run's TensorBoard events: a DataFrame (step, value, curve)."""
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for events in sorted((Path(run_dir) / "logs").rglob("events.out.tfevents.*")):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point
        try:
            reader.Reload()
        except Exception:  # a file the trainer is writing this moment; the next refresh reads it
            continue
        tags = set(reader.Tags().get("scalars", []))
        for tag, curve in CURVES.items():
            if tag in tags:
                rows += [(e.step, e.value, curve) for e in reader.Scalars(tag)]
    frame = pd.DataFrame(rows, columns=["step", "value", "curve"])
    # a resumed run logs some steps again: keep the newest value of each
    return frame.drop_duplicates(["curve", "step"], keep="last").sort_values(["curve", "step"]).reset_index(drop=True)


def sample_grid(run_dir: str, max_steps: int = MAX_SAMPLE_STEPS) -> tuple[list[tuple[str, str]], int]:
    """(images with captions, row length): one row per validation step (newest `max_steps`),
    one column per prompt and image, in the order the trainer wrote them."""
    root = Path(run_dir) / "samples"
    if not root.is_dir():
        return [], 1
    steps = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := SAMPLE_STEP_RE.match(d.name)) and d.is_dir())
    prompts = validation_prompts(run_dir)
    items, width = [], 1
    for step, folder in steps[-max_steps:]:
        files = sorted((int(m.group(1)), int(m.group(2)), f) for f in folder.iterdir()
                       if (m := SAMPLE_FILE_RE.match(f.name)))
        width = max(width, len(files))
        for i, k, f in files:
            prompt = prompts[i] if i < len(prompts) else f"prompt {i + 1}"
            items.append((str(f), f"step {step} · {prompt}" + (f" · #{k + 1}" if k else "")))
    return items, width


def read_figures(run_dir: str) -> Optional[dict]:
    """plan.json / bench.json found in the run folder, by name; None when there are none."""
    found = {}
    for name in FIGURE_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                found[name] = f"unreadable: {e}"
    return found or None


def run_columns(run_dir: str, max_columns: int = MAX_RUN_COLUMNS) -> tuple[list[tuple[str, str]], str]:
    """(model, label) of each column comparing a run's checkpoints, and a line saying what they are.

    The models are what `sdkit generate --model` takes: each checkpoint folder (oldest first,
    spread evenly over the run when more than fit) and the run folder itself for its result.
    """
    from sdkit.errors import UserError
    from sdkit.inference.loading import resolve_model
    from sdkit.training.checkpoints import CHECKPOINT_RE, list_checkpoints

    checkpoints = list_checkpoints(Path(run_dir))
    try:
        resolve_model(run_dir)
        final = [(str(run_dir), FINAL_LABEL)]
    except UserError:  # still training: no result yet
        final = []
    room = max_columns - len(final)
    shown = checkpoints
    if len(checkpoints) > room:
        shown = [checkpoints[round(i * (len(checkpoints) - 1) / (room - 1))] for i in range(room)] if room > 1 \
            else checkpoints[-1:]
    columns = [(str(c), f"step {int(CHECKPOINT_RE.match(c.name).group(1))}") for c in shown] + final
    line = f"{run_dir}: {len(checkpoints)} checkpoints" + (f" (showing {len(shown)})" if len(shown) < len(checkpoints) else "")
    return columns, line + (" + the final result" if final else ", no final result yet")
