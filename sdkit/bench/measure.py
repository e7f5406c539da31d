"""How `sdkit bench` measures: two clocks, exclusive phase times, peak memory, per-variant numbers."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from sdkit.training.step import PHASES
from sdkit.units import peak_rss_bytes

CLOCKS = ("wall", "cpu")


def _now() -> tuple[float, float]:
    """Wall time, and this process's CPU time: on a CPU shared with other jobs the second
    counts only our own work, so it stays steady when other processes steal the cores."""
    return time.perf_counter(), time.process_time()


def _zeros() -> dict[str, dict[str, float]]:
    return {c: dict.fromkeys(PHASES, 0.0) for c in CLOCKS}


class PhaseTimer:
    """Exclusive time per phase on both clocks: a phase nested in another is not counted twice."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.totals = _zeros()
        self._nested: list[list[float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = _now()
        self._nested.append([0.0, 0.0])
        try:
            yield
        finally:
            self.sync()
            end = _now()
            inner = self._nested.pop()
            for i, clock in enumerate(CLOCKS):
                elapsed = end[i] - start[i]
                self.totals[clock][name] += elapsed - inner[i]
                if self._nested:
                    self._nested[-1][i] += elapsed

    def reset(self) -> None:
        self.totals = _zeros()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def compile_clock():
    """Yields [seconds]: the wall time torch.compile spends inside the block, counted through dynamo's
    compile callbacks. They fire for the outermost compile only (a frame, or a backward lowered lazily in
    the first backward pass), so nested work is not counted twice, as summing torch's per-function timers
    does (642 s against a 412 s first step for the tiny SD 1.5-structure UNet with gradient checkpointing).
    Registered for the block alone: torch._dynamo.reset() drops every callback."""
    from torch._dynamo.callback import callback_handler

    spent, started = [0.0], []

    def start(_args) -> None:
        started.append(time.perf_counter())

    def end(_args) -> None:
        if started:  # a compile already under way when the block began has no start here
            spent[0] += time.perf_counter() - started.pop()

    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)
    try:
        yield spent
    finally:
        for remove, callback in ((callback_handler.remove_start_callback, start),
                                 (callback_handler.remove_end_callback, end)):
            with contextlib.suppress(ValueError):  # already gone after a torch._dynamo.reset()
                remove(callback)


def reset_peak_memory() -> None:
    if cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory() -> int:
    """CUDA max allocated bytes on GPU; the process's peak resident set (bytes) on CPU."""
    if cuda():
        import torch

        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


@dataclass
class Measurement:
    label: str
    samples_per_step: int
    setup_s: float
    cache_build_s: float = 0.0
    step_s: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    phase_s: dict[str, dict[str, float]] = field(default_factory=_zeros)
    peak_memory: int = 0
    last_loss: float = float("nan")
    first_step_s: float = 0.0  # latency of the first warm-up step (compiling included)
    compile_s: float = 0.0  # torch.compile time during the warm-up

    def clear_steps(self) -> None:
        self.step_s = {c: [] for c in CLOCKS}
        self.phase_s = _zeros()

    def summary(self, clock: str = "wall") -> dict:
        """Numbers on `clock` (wall or cpu); steps/s on both clocks in any case."""
        steps, phases = self.step_s[clock], self.phase_s[clock]
        total, n = sum(steps), len(steps)
        shares = {k: v / total for k, v in phases.items()} if total else dict.fromkeys(PHASES, 0.0)
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))  # loss.item(), Python between phases
        median = statistics.median(steps) if n else float("nan")
        rate = {c: n / sum(self.step_s[c]) if n and sum(self.step_s[c]) > 0 else 0.0 for c in CLOCKS}
        return {
            "label": self.label,
            "clock": clock,
            "steps": n,
            "seconds": total,
            "steps_per_s": rate[clock],
            "steps_per_s_median": 1.0 / median if n and median > 0 else 0.0,
            "steps_per_s_wall": rate["wall"],
            "steps_per_s_cpu": rate["cpu"],
            "samples_per_s": rate[clock] * self.samples_per_step,
            "ms_per_step": {k: 1000 * v / n for k, v in phases.items()} if n else {},
            "shares": shares,
            "peak_memory_bytes": self.peak_memory,
            "setup_s": self.setup_s,
            "cache_build_s": self.cache_build_s,
            "first_step_s": self.first_step_s,
            "compile_s": self.compile_s,
            "last_loss": self.last_loss,
        }
