"""`sdkit bench`: time the trainer's real step and say where the time goes.

Each variant (the recipe, an optional `--compare` variant, an optional plain hand-written
diffusers loop) is built in this process, runs warm-up steps, then timed steps. A step is
split into data loading, encoders (VAE encode + text encoders; ~0 when cached), forward,
backward and optimizer; on GPU every boundary synchronises, so the split is real time.

The sdkit variants run `Trainer.compute_loss`, the accelerator's backward and the trainer's
optimizer step: no second training loop. The plain loop is the other side of the
"is sdkit slower than the reference script?" question, so it is written the way diffusers'
train_text_to_image.py writes its step, on the same modules and the same data.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sdkit.errors import UserError

PHASES = ("data", "encoders", "forward", "backward", "optimizer")
PLAIN_LABEL = "plain diffusers loop"


# ----------------------------------------------------------------- measuring

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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_memory() -> None:
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_memory() -> int:
    """CUDA max allocated bytes on GPU; the process's peak resident set (bytes) on CPU."""
    if _cuda():
        import torch

        return int(torch.cuda.max_memory_allocated())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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
            "last_loss": self.last_loss,
        }


# ----------------------------------------------------------------- recipes for a bench

def bench_recipe(recipe_path: str, overrides: list[str], *, steps: int, warmup: int, out: Path):
    """The recipe as bench runs it: no checkpoints, samples, TensorBoard or resume; a scratch
    run folder; only as many samples as the timed and warm-up steps consume (so a cache
    build costs seconds, not an epoch)."""
    from sdkit.recipe import load_recipe

    r = load_recipe(recipe_path, list(overrides))
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
    """The trainer, set up as `sdkit train` would, stepping one optimizer step at a time."""

    def __init__(self, recipe, label: str, console):
        from sdkit.training.trainer import Trainer

        self.label = label
        self.timer: Optional[PhaseTimer] = None
        start = time.perf_counter()
        self.trainer = trainer = Trainer(recipe, console=console)
        self.cache_build_s = 0.0
        build_cache = trainer._build_cache

        def timed_build(dataset):  # an instance attribute: times the trainer's own cache build
            t0 = time.perf_counter()
            try:
                return build_cache(dataset)
            finally:
                self.cache_build_s = time.perf_counter() - t0

        trainer._build_cache = timed_build
        trainer._setup()
        self.setup_s = time.perf_counter() - start
        self.accum = recipe.train.gradient_accumulation
        self.samples_per_step = recipe.train.batch_size * self.accum
        for name in ("encode_images", "encode_text"):
            self._time_as_encoders(trainer.family, name)
        for m in trainer.modules:
            m.train()
        self.batches = self._batches()

    def _time_as_encoders(self, family, name: str) -> None:
        original = getattr(family, name)

        def timed(*args, **kwargs):
            with self.timer.phase("encoders"):
                return original(*args, **kwargs)

        setattr(family, name, timed)

    def _batches(self):
        t = self.trainer
        epoch = 0
        while True:
            t.sampler.set_epoch(epoch)
            yield from t.loader
            epoch += 1

    def step(self, timer: PhaseTimer) -> float:
        self.timer = timer
        t = self.trainer
        for _ in range(self.accum):
            with timer.phase("data"):
                batch = next(self.batches)
            with timer.phase("forward"):
                loss = t.compute_loss(batch)
            with timer.phase("backward"):
                t.accelerator.backward(loss / self.accum)
        with timer.phase("optimizer"):
            t.optimizer_step()
        return loss.detach().float().item()

    def close(self) -> None:
        self.trainer.accelerator.free_memory()
        self.trainer = self.batches = None


# ----------------------------------------------------------------- the plain reference loop

def check_plain_loop_supported(recipe) -> None:
    from sdkit.families import resolve_family_name

    family = resolve_family_name(recipe.model)
    if family != "sd":
        raise UserError(f"bench --baseline: the plain diffusers loop covers SD 1.x/2.x models, not {family}")


class PlainLoopRunner:
    """UNet + VAE + CLIP text encoder + DDPMScheduler + AdamW, no caching: the step as
    diffusers' train_text_to_image.py (and its LoRA twin) writes it, over the recipe's model
    folder and the same samples. SD 1.x/2.x only: that is what the reference script trains."""

    def __init__(self, recipe, label: str = PLAIN_LABEL):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        check_plain_loop_supported(recipe)
        self.label = label
        self.cache_build_s = 0.0
        start = time.perf_counter()
        r = recipe
        self.recipe = r
        self.acc = acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=r.train.mixed_precision)
        set_seed(r.train.seed)
        path, revision = r.model.pretrained, r.model.revision
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
        if r.model.vae:
            self.vae = AutoencoderKL.from_pretrained(r.model.vae)
        else:
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(r.train.mixed_precision, torch.float32)
        self.weight_dtype = weight_dtype
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        if r.method.type == "lora":
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.to(acc.device, dtype=weight_dtype)
            unet.add_adapter(LoraConfig(
                r=r.method.rank, lora_alpha=r.method.alpha or r.method.rank, lora_dropout=r.method.dropout,
                init_lora_weights="gaussian",
                target_modules=r.method.target_modules or ["to_k", "to_q", "to_v", "to_out.0"],
            ))
            for p in unet.parameters():  # as diffusers' cast_training_params: adapters in fp32
                if p.requires_grad:
                    p.data = p.data.float()
        if r.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.vae.to(acc.device, dtype=weight_dtype)
        self.text_encoder.to(acc.device, dtype=weight_dtype)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        o = r.optim
        optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps
        )
        loader = self._loader()
        lr_scheduler = get_scheduler(
            o.lr_scheduler, optimizer=optimizer, num_warmup_steps=o.warmup_steps,
            num_training_steps=r.train.max_steps,
        )
        self.unet, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(unet, optimizer, loader, lr_scheduler)
        self.unet.train()
        self.accum = r.train.gradient_accumulation
        self.samples_per_step = r.train.batch_size * self.accum
        self.batches = self._batches()
        self.setup_s = time.perf_counter() - start

    def _loader(self):
        import torch

        from sdkit.training.data import TrainDataset, load_records

        r = self.recipe
        records = load_records(r.data, log=lambda _msg: None, progress=False)
        dataset = TrainDataset(records, r.data, seed=r.train.seed)
        tokenizer = self.tokenizer

        def collate(items):  # the reference script tokenizes in its data pipeline
            return {
                "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "input_ids": tokenizer(
                    [it["caption"] for it in items], max_length=tokenizer.model_max_length,
                    padding="max_length", truncation=True, return_tensors="pt",
                ).input_ids,
            }

        return torch.utils.data.DataLoader(
            dataset, shuffle=True, collate_fn=collate, batch_size=r.train.batch_size,
            num_workers=r.data.num_workers,
        )

    def _batches(self):
        while True:
            yield from self.loader

    def step(self, timer: PhaseTimer) -> float:
        import torch
        import torch.nn.functional as F

        acc = self.acc
        for _ in range(self.accum):
            with timer.phase("data"):
                batch = next(self.batches)
            with timer.phase("forward"):
                with timer.phase("encoders"), torch.no_grad():
                    latents = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist.sample()
                    latents = latents * self.vae.config.scaling_factor
                    encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                steps = self.noise_scheduler.config.num_train_timesteps
                timesteps = torch.randint(0, steps, (bsz,), device=latents.device).long()
                noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
                if self.noise_scheduler.config.prediction_type == "v_prediction":
                    target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            with timer.phase("backward"):
                acc.backward(loss / self.accum)
        with timer.phase("optimizer"):
            if self.recipe.optim.max_grad_norm:
                acc.clip_grad_norm_(self.params, self.recipe.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()

    def close(self) -> None:
        self.acc.free_memory()
        self.unet = self.vae = self.text_encoder = self.optimizer = self.batches = None


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
        from sdkit.training.trainer import _fresh_accelerator_state

        _fresh_accelerator_state()  # as the Trainer does: variants may differ in precision
        return PlainLoopRunner(recipe, variant.label)
    return SdkitRunner(recipe, variant.label, console)


def _run_steps(runner, m: Measurement, timer: PhaseTimer, n: int) -> None:
    for _ in range(n):
        _sync()
        start = _now()
        m.last_loss = runner.step(timer)
        _sync()
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
    if _cuda():
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
    block = math.ceil(steps / rounds)
    with tempfile.TemporaryDirectory(prefix="sdkit-bench-") as tmp:
        root = Path(tmp)
        measured: list[Measurement] = []
        if rounds == 1:
            for i, v in enumerate(variants):
                console.print(f"[bold]bench[/] {v.label}: set-up, {warmup} warm-up + {steps} timed steps")
                _reset_peak_memory()
                runner = _build(v, recipe_path, steps, warmup, root, i, console)
                m = _measure_alone(runner, steps, warmup)
                runner.close()
                del runner
                _release()
                measured.append(m)
        else:
            runners, ms = [], []
            for i, v in enumerate(variants):
                console.print(f"[bold]bench[/] {v.label}: set-up and {warmup} warm-up steps")
                _reset_peak_memory()
                runner = _build(v, recipe_path, steps, warmup, root, i, console)
                timer = PhaseTimer(_sync)
                _run_steps(runner, Measurement(v.label, 0, 0.0), timer, warmup)
                runners.append((runner, timer))
                ms.append(Measurement(runner.label, runner.samples_per_step, runner.setup_s, runner.cache_build_s,
                                      peak_memory=_peak_memory()))
            console.print(f"[bold]bench[/] timing {steps} steps per variant in {rounds} alternating blocks")
            for r in range(rounds):
                for (runner, timer), m in zip(runners, ms):
                    n = min(block, steps - len(m.step_s["wall"]))
                    if n <= 0:
                        continue
                    timer.reset()
                    _reset_peak_memory()
                    _run_steps(runner, m, timer, n)
                    _accumulate(m, timer)
                    m.peak_memory = max(m.peak_memory, _peak_memory())
            for runner, _ in runners:
                runner.close()
            del runners
            _release()
            measured = ms
    return _report_dict(measured, variants, steps, warmup, rounds, clock, load_before)


def _measure_alone(runner, steps: int, warmup: int) -> Measurement:
    timer = PhaseTimer(_sync)
    m = Measurement(runner.label, runner.samples_per_step, runner.setup_s, runner.cache_build_s)
    _run_steps(runner, m, timer, warmup)
    m.clear_steps()
    timer.reset()
    _run_steps(runner, m, timer, steps)
    _accumulate(m, timer)
    m.peak_memory = _peak_memory()
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
        "memory": "CUDA max allocated" if _cuda() else "process peak RSS",
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "clock": clock,
        "load_average": {"before": load_before, "after": _loadavg()},
        "variants": summaries,
        "ratios": ratios,
    }


# ----------------------------------------------------------------- printing

def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    load = report["load_average"]
    loads = " -> ".join(f"{x[0]:.1f}" for x in (load["before"], load["after"]) if x) or "n/a"
    blocks = f" in {report['rounds']} alternating blocks" if report["rounds"] > 1 else ""
    console.print(
        f"{report['device']}; {report['warmup']} warm-up + {report['steps']} timed steps per variant"
        f"{blocks}; {report['clock']} clock; load average {loads}"
    )
    # Variants as columns: three variants and a dozen numbers fit an 80-column terminal.
    table = Table(title="sdkit bench: steady state")
    table.add_column("")
    for s in report["variants"]:
        table.add_column(s["label"], justify="right")
    other = "cpu" if report["clock"] == "wall" else "wall"
    on_cpu = report["device"].startswith("cpu")
    rows = [
        ("steps/s", lambda s: f"{s['steps_per_s']:.2f}"),
        *([(f"  by {other} clock", lambda s: f"{s[f'steps_per_s_{other}']:.2f}")] if on_cpu else []),
        ("samples/s", lambda s: f"{s['samples_per_s']:.1f}"),
        ("ms/step", lambda s: f"{1000 * s['seconds'] / s['steps']:.0f}"),
        *((f"  {k}", lambda s, k=k: f"{100 * s['shares'][k]:.0f}%") for k in (*PHASES, "other")),
        (f"peak, {report['memory']}", lambda s: _gib(s["peak_memory_bytes"])),
        ("set-up s", lambda s: f"{s['setup_s']:.1f}"),
        ("  cache build s", lambda s: f"{s['cache_build_s']:.1f}"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in report["variants"]))
    console.print(table)
    first = report["variants"][0]["label"]
    for label, r in report["ratios"].items():
        console.print(
            f"[bold]{first}[/] runs [bold]{r['steps_per_s']:.2f}x[/] the steps/s of [bold]{label}[/] "
            f"({r['steps_per_s_median']:.2f}x by median step"
            + (f", {r[f'steps_per_s_{other}']:.2f}x by {other} clock)" if on_cpu else ")")
        )


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
