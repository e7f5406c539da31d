"""`sdkit bench`: time the trainer's real step and say where the time goes.

Each variant (the recipe, an optional `--compare` variant, an optional plain hand-written
diffusers loop) is built in this process, runs warm-up steps, then timed steps. A step is
split into data loading, encoders (VAE encode + frozen text encoders; ~0 when cached),
forward, backward and optimizer, as the step itself marks them (TrainStep.phase); on GPU
every boundary synchronises, so the split is real time.

The sdkit variants run the trainer's public `TrainStep`, set up by `Trainer.setup()` exactly
as `sdkit train` sets it up: no second training loop. The plain loop (sdkit.bench.baseline)
is the reference to compare against.

Compiling (train.compile) happens in the first step: the report gives the first step's latency
and the compile time (dynamo's compile callbacks) apart from the steady steps/s, which counts only the
timed steps after the warm-up. `train.compile: auto` is decided for the run the recipe describes
(its max_steps), not for the bench's few steps.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdkit.bench.baseline import PLAIN_LABEL, PlainLoopRunner, check_plain_loop_supported
from sdkit.bench.measure import (
    CLOCKS, Measurement, PhaseTimer, _now, compile_clock, cuda, peak_memory, reset_peak_memory, sync,
)
from sdkit.bench.report import print_report
from sdkit.errors import UserError


# ----------------------------------------------------------------- recipes for a bench

def bench_recipe(recipe_path: str, overrides: list[str], *, steps: int, warmup: int, out: Path):
    """The recipe as bench runs it: no checkpoints, samples, TensorBoard or resume; a scratch
    run folder; only as many samples as the timed and warm-up steps consume (so a cache
    build costs seconds, not an epoch)."""
    from sdkit.recipe import load_recipe

    r = load_recipe(recipe_path, list(overrides))
    # train.compile=auto depends on the run's length: decide it for the run the recipe describes,
    # before the bench shortens it.
    r.train.compile = r.compiles("cuda" if cuda() else "cpu")
    total = warmup + steps
    per_step = r.train.batch_size * r.train.gradient_accumulation
    r.output_dir = str(out)
    r.train.max_steps = total
    r.train.epochs = None
    r.train.resume = None
    r.train.checkpoint_every = total + 1
    r.validation.prompts = []
    r.logging.tensorboard = False
    r.data.max_samples = min(r.data.max_samples or per_step * total, per_step * total)
    return r


# ----------------------------------------------------------------- sdkit's step

class SdkitRunner:
    """The trainer, set up as `sdkit train` would, stepping its public step one at a time."""

    def __init__(self, recipe, label: str, console):
        from sdkit.training.trainer import Trainer

        self.label = label
        start = time.perf_counter()
        self.trainer = trainer = Trainer(recipe, console=console)
        trainer.setup()
        self.setup_s = time.perf_counter() - start
        self.cache_build_s = trainer.data.cache_build_s
        self.samples_per_step = recipe.effective_batch()
        for m in trainer.step.modules:
            m.train()
        self.batches = trainer.batches()
        self.steps_done = 0

    def step(self, timer: PhaseTimer) -> float:
        self.trainer.step.phase = timer.phase
        self.steps_done += 1
        return self.trainer.step(self.batches, self.steps_done).float().item()

    def close(self) -> None:
        self.trainer.accelerator.free_memory()
        self.trainer = self.batches = None


# ----------------------------------------------------------------- the driver

@dataclass
class _Variant:
    label: str
    overrides: list[str]
    plain: bool = False


def _variants(overrides: list[str], compare: list[str], baseline: bool) -> list[_Variant]:
    first = _Variant("recipe" + (" " + " ".join(overrides) if overrides else ""), list(overrides))
    out = [first]
    if compare:
        out.append(_Variant(" ".join(compare), [*overrides, *compare]))
    if baseline:
        out.append(_Variant(PLAIN_LABEL, list(overrides), plain=True))
    return out


def _build(variant: _Variant, recipe_path: str, steps: int, warmup: int, root: Path, index: int, console):
    recipe = bench_recipe(recipe_path, variant.overrides, steps=steps, warmup=warmup, out=root / f"variant-{index}")
    if variant.plain:
        from sdkit.training.trainer import fresh_accelerator_state

        fresh_accelerator_state()  # as the Trainer does: variants may differ in precision
        return PlainLoopRunner(recipe, variant.label)
    return SdkitRunner(recipe, variant.label, console)


def _run_steps(runner, m: Measurement, timer: PhaseTimer, n: int) -> None:
    for _ in range(n):
        sync()
        start = _now()
        m.last_loss = runner.step(timer)
        sync()
        end = _now()
        for i, clock in enumerate(CLOCKS):
            m.step_s[clock].append(end[i] - start[i])


def _accumulate(m: Measurement, timer: PhaseTimer) -> None:
    for clock, totals in timer.totals.items():
        for k, v in totals.items():
            m.phase_s[clock][k] += v
    timer.reset()


def _release() -> None:
    gc.collect()
    if cuda():
        import torch

        torch.cuda.empty_cache()


def run_bench(
    recipe_path: str,
    overrides: list[str],
    *,
    steps: int = 20,
    warmup: int = 3,
    compare: list[str] = (),
    baseline: bool = False,
    rounds: int = 1,
    clock: str = "wall",
    console=None,
) -> dict:
    """Measure the recipe (and variants); returns the numbers, prints nothing but progress.

    rounds=1 builds, warms and times one variant after another and frees each before the
    next (peak memory is then each variant's own). rounds=R>1 keeps every variant alive and
    times them in R alternating blocks, so that load from other processes on a shared
    machine hits all of them alike; peak memory then includes the other variants.
    clock="cpu" reports this process's CPU time instead of wall time (steady on a CPU that
    other jobs share; meaningless on GPU, where the CPU waits on the device).
    """
    from rich.console import Console

    if steps < 1 or warmup < 0 or rounds < 1:
        raise UserError("bench: --steps and --rounds must be at least 1, --warmup at least 0")
    if clock not in CLOCKS:
        raise UserError(f"bench: --clock must be one of {', '.join(CLOCKS)}, not {clock!r}")
    console = console or Console(stderr=True)
    variants = _variants(list(overrides), list(compare), baseline)
    for v in variants:  # every recipe problem before anything loads
        checked = bench_recipe(recipe_path, v.overrides, steps=steps, warmup=warmup, out=Path("unused"))
        if v.plain:
            check_plain_loop_supported(checked)
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="sdkit-bench-") as tmp:
        measure = _one_after_another if rounds == 1 else _interleaved
        measured = measure(variants, recipe_path, steps, warmup, rounds, Path(tmp), console)
    return _report_dict(measured, variants, steps, warmup, rounds, clock, load_before)


def _one_after_another(variants, recipe_path, steps, warmup, rounds, root, console) -> list[Measurement]:
    """Build, warm and time each variant alone, freeing it before the next."""
    measured = []
    for i, v in enumerate(variants):
        console.print(f"[bold]bench[/] {v.label}: set-up, {warmup} warm-up + {steps} timed steps")
        reset_peak_memory()
        runner = _build(v, recipe_path, steps, warmup, root, i, console)
        measured.append(_measure_alone(runner, steps, warmup))
        runner.close()
        del runner
        _release()
    return measured


def _interleaved(variants, recipe_path, steps, warmup, rounds, root, console) -> list[Measurement]:
    """Keep every variant alive and time them in `rounds` alternating blocks."""
    runners, measured = [], []
    for i, v in enumerate(variants):
        console.print(f"[bold]bench[/] {v.label}: set-up and {warmup} warm-up steps")
        reset_peak_memory()
        runner = _build(v, recipe_path, steps, warmup, root, i, console)
        timer = PhaseTimer(sync)
        warm = Measurement(v.label, 0, 0.0)
        _warm_up(runner, warm, timer, warmup)
        runners.append((runner, timer))
        measured.append(Measurement(runner.label, runner.samples_per_step, runner.setup_s, runner.cache_build_s,
                                    peak_memory=peak_memory(), first_step_s=warm.first_step_s,
                                    compile_s=warm.compile_s))
    console.print(f"[bold]bench[/] timing {steps} steps per variant in {rounds} alternating blocks")
    block = math.ceil(steps / rounds)
    for _ in range(rounds):
        for (runner, timer), m in zip(runners, measured):
            n = min(block, steps - len(m.step_s["wall"]))
            if n <= 0:
                continue
            timer.reset()
            reset_peak_memory()
            _run_steps(runner, m, timer, n)
            _accumulate(m, timer)
            m.peak_memory = max(m.peak_memory, peak_memory())
    for runner, _ in runners:
        runner.close()
    del runners
    _release()
    return measured


def _warm_up(runner, m: Measurement, timer: PhaseTimer, warmup: int) -> None:
    """Warm-up steps; the first one's latency and the compile time (dynamo's compile callbacks) apart."""
    with compile_clock() as compiling:
        _run_steps(runner, m, timer, warmup)
    if m.step_s["wall"]:
        m.first_step_s = m.step_s["wall"][0]
    m.compile_s = compiling[0]


def _measure_alone(runner, steps: int, warmup: int) -> Measurement:
    timer = PhaseTimer(sync)
    m = Measurement(runner.label, runner.samples_per_step, runner.setup_s, runner.cache_build_s)
    _warm_up(runner, m, timer, warmup)
    m.clear_steps()
    timer.reset()
    _run_steps(runner, m, timer, steps)
    _accumulate(m, timer)
    m.peak_memory = peak_memory()
    return m


def _loadavg() -> Optional[tuple[float, float, float]]:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()
    return None


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def _report_dict(measured: list[Measurement], variants, steps, warmup, rounds, clock, load_before) -> dict:
    summaries = [m.summary(clock) for m in measured]
    for s, v in zip(summaries, variants):
        s["overrides"] = v.overrides
        s["plain_loop"] = v.plain
    first = summaries[0]
    ratios = {}
    for s in summaries[1:]:
        ratios[s["label"]] = {
            # How many times faster the recipe runs than this variant (>1: the recipe wins).
            "steps_per_s": first["steps_per_s"] / s["steps_per_s"] if s["steps_per_s"] else float("inf"),
            **{
                key: first[key] / s[key] if s[key] else float("inf")
                for key in ("steps_per_s_median", "steps_per_s_wall", "steps_per_s_cpu")
            },
        }
    return {
        "device": _device_line(),
        "memory": "CUDA max allocated" if cuda() else "process peak RSS",
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "clock": clock,
        "load_average": {"before": load_before, "after": _loadavg()},
        "variants": summaries,
        "ratios": ratios,
    }


def bench_command(
    recipe_path: str,
    overrides: list[str],
    steps: int = 20,
    warmup: int = 3,
    compare: list[str] = [],  # noqa: B006 - never mutated; the CLI's signature
    baseline: bool = False,
    rounds: int = 1,
    clock: str = "wall",
) -> dict:
    report = run_bench(recipe_path, overrides, steps=steps, warmup=warmup, compare=compare,
                       baseline=baseline, rounds=rounds, clock=clock)
    print_report(report)
    return report
