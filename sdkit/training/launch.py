"""Run `sdkit train` in this process, or relaunch it through `accelerate launch`.

One process: run in-process (fast start, plain tracebacks). More than one (the accelerate
config asks for it): re-execute `python -m sdkit train ...` under `accelerate launch`, which
starts the ranks; inside them the environment says we are already launched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from sdkit.errors import UserError
from sdkit.recipe import Recipe

DEFAULT_CONFIG = Path("accelerate_config.yaml")


def already_launched() -> bool:
    env = os.environ
    return "LOCAL_RANK" in env or "ACCELERATE_LAUNCHED" in env or int(env.get("WORLD_SIZE", "1")) > 1


def read_accelerate_config(path: Optional[Path]) -> tuple[Optional[Path], dict]:
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return None, {}
        path = DEFAULT_CONFIG
    if not Path(path).is_file():
        raise UserError(f"--accelerate-config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--accelerate-config: '{path}' is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--accelerate-config: '{path}' is not an accelerate config mapping")
    return Path(path), data


def process_count(config: dict) -> int:
    """Processes in all: accelerate's `num_processes` counts every machine's already."""
    from sdkit.training.engines import counts

    return counts(config)[1]


def describe(recipe: Recipe, processes: int) -> str:
    from sdkit.families import resolve_family_name
    from sdkit.training.checkpoints import find_resume_checkpoint

    family = resolve_family_name(recipe.model)
    t = recipe.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epochs"
    effective = recipe.effective_batch(processes)
    resume = find_resume_checkpoint(recipe) if t.resume else None
    lines = [
        f"family: {family}   method: {recipe.method.type}"
        + (f" (rank {recipe.method.rank})" if recipe.method.type == "lora" else ""),
        f"data: {recipe.data.dataset_names()} at {recipe.data.resolution} px, cache {'on' if recipe.data.cache else 'off'}",
        f"run: {length}, effective batch {effective} ({t.batch_size} x {t.gradient_accumulation} accumulation"
        f" x {processes} process{'es' if processes > 1 else ''}), mixed precision {t.mixed_precision}",
        f"output: {recipe.output_dir}" + (f"   resume from: {resume}" if resume else ""),
    ]
    return "\n".join(lines)


def launch_or_run(recipe: Recipe, recipe_path: Path, overrides: list[str], config_path: Optional[Path], *, dry_run: bool) -> None:
    config_path, config = read_accelerate_config(config_path)
    processes = process_count(config) if not already_launched() else int(os.environ.get("WORLD_SIZE", "1"))
    from sdkit.training.run_folder import check_output_dir

    check_output_dir(recipe)  # before a relaunch or a dry run's report
    if dry_run:
        from sdkit.training.engines import check_engine, describe as describe_engine

        engine = check_engine(config_path, config, recipe) if not already_launched() else None
        print(recipe.to_yaml().rstrip())
        print("---")
        print(describe(recipe, processes))
        if engine is not None:
            print("\n".join(describe_engine(engine)))
            if needs_launch(config, processes):
                print("launch: " + " ".join(launch_command(recipe_path, overrides, config_path, engine.per_machine)))
        if recipe.data.buckets or recipe.prior_preservation:  # the bucket table counts class images
            from sdkit.families import resolve_family_name
            from sdkit.training.build import bucket_report

            try:  # the table reads the dataset; a hub dataset offline still gets the rest of the dry run
                print(bucket_report(recipe, resolve_family_name(recipe.model), processes))
            except UserError as e:
                print(f"buckets: not shown ({e}); `sdkit data check RECIPE` lists them once the data can be read")
        print("dry run: no model was loaded, nothing was trained")
        return
    if needs_launch(config, processes) and not already_launched():
        relaunch(recipe_path, overrides, config_path, process_count_per_machine(config))
        return
    from sdkit.training.trainer import train

    train(recipe)


def needs_launch(config: dict, processes: int) -> bool:
    """Several processes, or an engine only `accelerate launch` sets up (DeepSpeed, FSDP: one GPU too)."""
    return processes > 1 or str(config.get("distributed_type", "NO")).upper() in ("DEEPSPEED", "FSDP")


def process_count_per_machine(config: dict) -> int:
    from sdkit.training.engines import counts

    machines, processes = counts(config)
    return processes // machines


def launch_command(recipe_path: Path, overrides: list[str], config_path: Path, local_processes: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // local_processes)
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_path),
        # accelerate sets OMP_NUM_THREADS=1 otherwise, which makes CPU ranks several times slower.
        "--num_cpu_threads_per_process", str(threads),
        "-m", "sdkit", "train", str(recipe_path), *overrides,
    ]


def relaunch(recipe_path: Path, overrides: list[str], config_path: Path, local_processes: int) -> None:
    cmd = launch_command(recipe_path, overrides, config_path, local_processes)
    print("launching:", " ".join(cmd), file=sys.stderr)
    code = subprocess.call(cmd)
    if code:
        sys.exit(code)
