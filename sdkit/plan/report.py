"""`sdkit plan`'s command: the verdict against a GPU size, and the report a person reads."""

from __future__ import annotations

import time

from sdkit.errors import UserError
from sdkit.plan.estimate import Estimate, _load, _numbers, estimate, model_spec
from sdkit.plan.knobs import Knob, _knobs, _not_estimated
from sdkit.units import GIB as GiB
from sdkit.units import gib as _gib

CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN handles: 0.5-1 GiB depending on GPU and driver
TIGHT_SHARE = 0.10  # less spare than this share of the peak: allocator fragmentation may take it


def verdict(peak_bytes: int, gpu_gib: float) -> tuple[str, float]:
    """("fits" | "tight" | "does not fit", spare GiB) after the CUDA context."""
    margin = gpu_gib - peak_bytes / GiB - CUDA_CONTEXT_GIB
    if margin < 0:
        return "does not fit", margin
    if margin < TIGHT_SHARE * peak_bytes / GiB:
        return "tight", margin
    return "fits", margin


def plan_command(recipe_path: str, overrides: list[str], gpu_memory: float = 24.0) -> dict:
    """Estimate, print the report, return the numbers (peak_gib, fits, verdict, breakdown, knobs...)."""
    if gpu_memory <= 0:
        raise UserError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}")
    from rich.console import Console

    console = Console()
    recipe = _load(recipe_path, overrides)
    model = model_spec(recipe)
    started = time.perf_counter()
    with console.status(f"tracing one training step of {model.denoiser.class_name} on fake tensors..."):
        est = estimate(recipe, model)
    n = _numbers(est)
    word, margin = verdict(est.run_peak_bytes, gpu_memory)
    n.update(
        gpu_memory_gib=gpu_memory,
        cuda_context_gib=CUDA_CONTEXT_GIB,
        needed_gib=round(est.run_peak_bytes / GiB + CUDA_CONTEXT_GIB, 2),
        margin_gib=round(margin, 2),
        fits=word != "does not fit",
        verdict=word,
        knobs=[],
        suggestion=None,
    )
    singles, combo = [], None
    if word != "fits":
        # aim for "fits": after the CUDA context, spare of at least TIGHT_SHARE of the peak
        budget = int((gpu_memory - CUDA_CONTEXT_GIB) * GiB / (1 + TIGHT_SHARE))
        with console.status("estimating what would make it fit..."):
            singles, combo = _knobs(est, budget)

        def as_dict(k: Knob) -> dict:
            return {"overrides": k.overrides, "peak_gib": _gib(k.peak), "how": k.how,
                    "verdict": verdict(k.peak, gpu_memory)[0]}

        n["knobs"] = [as_dict(k) for k in singles]
        n["suggestion"] = as_dict(combo) if combo else None
    n["seconds"] = round(time.perf_counter() - started, 1)
    _print_report(console, est, n, singles, combo)
    return n


# ------------------------------------------------------------------ printing


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _print_report(console, est: Estimate, n: dict, singles, combo) -> None:
    from rich.table import Table

    r = est.recipe
    _print_settings(console, est, n)
    b = n["breakdown_gib"]
    optimizer = {"adamw8bit": "AdamW8bit: 1 byte per moment", "adafactor": "Adafactor: factored second moments",
                 "adamw": "AdamW: 2 fp32 moments"}.get(r.optim.name, r.optim.name)
    if est.cached:
        encoders = "latents cached: encoders off the GPU while training"
    else:
        encoders = ", ".join(n["encoders_gib"]) or "none"
    table = Table(title=f"One training step, at its peak ({n['peak_phase']})", title_justify="left")
    table.add_column("memory")
    table.add_column("GiB", justify="right")
    table.add_column("", style="dim")
    rows = [
        ("weights", b["weights"], f"{_count(n['trainable_params'])} trainable ({r.train.weights_dtype})"),
        ("gradients", b["gradients"], "one tensor at a time: fused backward" if r.optim.fused_backward else ""),
        ("optimizer state", b["optimizer_state"], optimizer),
        ("optimizer step temporaries", b["optimizer_temporaries"], ""),
        ("EMA", b["ema"], "fp32 copy of the weights" if b["ema"] else ""),
        ("activations", b["activations"],
         f"incl. {b['autocast_weight_copies']:.2f} autocast weight copies" if b["autocast_weight_copies"] else ""),
        ("frozen encoders", b["frozen_encoders"], encoders),
    ]
    for name, gib, note in rows:
        if name == "optimizer step temporaries" and gib < 0.01:
            continue  # fused AdamW and AdamW8bit update in place
        table.add_row(name, f"{gib:.2f}", note)
    table.add_section()
    table.add_row("[bold]training step peak[/]", f"[bold]{n['peak_gib']:.2f}[/]", "tensors, as torch.cuda.max_memory_allocated")
    if n["validation_gib"] is not None:
        table.add_row("validation sampling peak", f"{n['validation_gib']:.2f}", "encoders on the GPU, VAE decode")
    table.add_row("CUDA context", f"~{CUDA_CONTEXT_GIB:.2f}", "not a tensor; added for the verdict")
    table.add_row("[bold]needed[/]", f"[bold]{n['needed_gib']:.2f}[/]", f"of {n['gpu_memory_gib']:g} GiB")
    console.print(table)
    phases = ", ".join(f"{k} {v:.2f}" for k, v in n["phases_gib"].items())
    console.print(f"[dim]phase peaks (GiB): {phases}. Estimated in {n['seconds']:.0f} s.[/]")
    style = {"fits": "green", "tight": "yellow", "does not fit": "red"}[n["verdict"]]
    gpu = f"{n['gpu_memory_gib']:g} GiB"
    message = {
        "fits": f"fits {gpu}, {n['margin_gib']:.2f} GiB to spare",
        "tight": f"tight on {gpu}: {n['margin_gib']:.2f} GiB to spare, and allocator fragmentation often takes 5-20%",
        "does not fit": f"does not fit {gpu}: {-n['margin_gib']:.2f} GiB short",
    }[n["verdict"]]
    if n["validation_gib"] is not None and n["validation_gib"] > n["peak_gib"]:
        message += " (the peak is validation sampling, not training)"
    console.print(f"[bold {style}]{message}[/]")
    console.print("[dim]Not counted: allocator fragmentation, cuDNN/cuBLAS workspaces.[/]")
    _print_knobs(console, singles, combo, n, gpu)
    if n["verdict"] != "fits":
        for line in _not_estimated(r):
            console.print(f"[dim]Also possible, not estimated: {line}[/]")


def _print_settings(console, est: Estimate, n: dict) -> None:
    r, t = est.recipe, est.recipe.train
    console.print(
        f"[bold]{r.model.pretrained}[/]: {n['family']}, {est.model.denoiser.class_name} "
        f"{_count(n['denoiser_params'])} parameters (configs: {est.model.source})"
    )
    from sdkit.training.adapters import make_adapter

    adapter = make_adapter(r.method)
    method = adapter.label
    accum = f" x {t.gradient_accumulation} accumulated" if t.gradient_accumulation > 1 else ""
    console.print(
        f"{method}, {_size(est)}, batch {t.batch_size}{accum}, mixed precision {t.mixed_precision}, "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, {r.optim.name}, "
        f"EMA {'on' if r.ema_applies else 'off'}{' (CPU)' if r.ema_applies and t.ema_on_cpu else ''}, "
        f"latent cache {'on' if est.cached else 'off'}"
        + (f", {t.weights_dtype} weights" if t.weights_dtype != "fp32" else "")
        + (", fused backward" if r.optim.fused_backward else "")
    )


def _size(est: Estimate) -> str:
    """The traced size: the resolution, and the largest bucket when buckets are on."""
    r, (width, height) = est.recipe, est.bucket
    size = f"{r.data.resolution} px"
    if r.data.buckets:
        size += f" (at its largest bucket {width}x{height})"
    if r.prior_preservation:
        size += f", {r.train.batch_size} class images beside each batch"
    return size


def _print_knobs(console, singles, combo, n: dict, gpu: str) -> None:
    from rich.table import Table

    if singles:
        kt = Table(title="What would help, each alone (run peak)", title_justify="left")
        kt.add_column("override")
        kt.add_column("GiB", justify="right")
        kt.add_column("estimate", style="dim")
        for k in singles:
            kt.add_row(k.overrides, f"{k.peak / GiB:.2f}", k.how)
        console.print(kt)
    if combo is not None:
        console.print(f"Together: [bold]{combo.overrides}[/] -> {combo.peak / GiB:.2f} GiB "
                      f"({verdict(combo.peak, n['gpu_memory_gib'])[0]} {gpu})")
