"""`sdkit plan`: will this recipe fit my GPU? Answered on a CPU, from configs only.

One training step of the recipe's real denoiser runs on fake tensors (`sdkit.plan.trace`),
giving the peak bytes of each phase (VAE encode when latents are not cached, forward and
backward, optimizer step, and validation sampling when the recipe has prompts) and what each
is made of. Frozen encoders kept on the GPU are added from their parameter counts. The verdict
also allows for the CUDA context, which no tensor accounts for.

When the recipe does not fit (or fits with little to spare), the knobs that would help are
estimated, not guessed: the optimizer, the EMA and the cache change fixed amounts that the
trace keeps apart; a smaller batch rescales the traced activations (measured exact on SD 1.5);
gradient checkpointing needs a second trace, which runs only then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

from sdkit.errors import UserError

GiB = 2**30
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN handles: 0.5-1 GiB depending on GPU and driver
TIGHT_SHARE = 0.10  # less spare than this share of the peak: allocator fragmentation may take it
TRAINING_PHASES = ("encode", "forward/backward", "optimizer step")


# ------------------------------------------------------------------ recipe -> step


def cache_used(recipe) -> bool:
    """As the trainer decides: latents and text embeddings come from the cache (encoders off the GPU)."""
    return recipe.data.cache and not recipe.method.train_text_encoder and recipe.data.center_crop


def _is_t5(component) -> bool:
    return component.class_name == "T5EncoderModel"


def _text_encoders_loaded(recipe, model) -> list:
    """Text encoders the trainer loads (SD3 without T5 when model.load_t5 is false)."""
    return [te for te in model.text_encoders if not (_is_t5(te) and not recipe.model.load_t5)]


def _text_encoders_trained(recipe, model) -> list:
    """method.train_text_encoder trains the CLIP encoders; SD3's T5 stays frozen (sdkit.families.sd3)."""
    if not recipe.method.train_text_encoder:
        return []
    return [te for te in _text_encoders_loaded(recipe, model) if not _is_t5(te)]


def _text_tokens(model) -> int:
    """Length of the denoiser's text input: 77 CLIP tokens, plus T5's for SD3 (as the family encodes)."""
    from sdkit.plan.trace import CLIP_TOKENS

    if model.family != "sd3":
        return CLIP_TOKENS
    from sdkit.families import family_class

    return CLIP_TOKENS + family_class("sd3").t5_max_length


def vae_config(recipe, model) -> Optional[dict]:
    """The VAE the trainer uses: model.vae's config when readable, else the model's own."""
    from sdkit.plan.architectures import load_vae_config

    base = model.vae.config if model.vae else None
    return load_vae_config(recipe.model.vae, base) if recipe.model.vae else base


def _vae_upcast(recipe, model, config: Optional[dict]) -> bool:
    """SDXL's stock VAE overflows in fp16: the family encodes and the pipeline decodes in fp32."""
    return bool(config) and model.family == "sdxl" and recipe.train.mixed_precision == "fp16" \
        and config.get("force_upcast", True)


def step_spec(recipe, model, **changes):
    """The StepSpec of a recipe on a model architecture, with optional changes."""
    from sdkit.plan.trace import CLIP_TOKENS, SD3_LORA_TARGETS, UNET_LORA_TARGETS, StepSpec, TextEncoderSpec

    m, t, v = recipe.method, recipe.train, recipe.validation
    trained = tuple(TextEncoderSpec(te.class_name, te.config, CLIP_TOKENS) for te in _text_encoders_trained(recipe, model))
    vae = vae_config(recipe, model)
    default_targets = SD3_LORA_TARGETS if model.family == "sd3" else UNET_LORA_TARGETS
    spec = StepSpec(
        denoiser_class=model.denoiser.class_name,
        denoiser_config=model.denoiser.config,
        method=m.type,
        lora_rank=m.rank,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        lora_targets=tuple(m.target_modules) if m.target_modules else default_targets,
        precision=t.mixed_precision,
        gradient_checkpointing=t.gradient_checkpointing,
        optimizer=recipe.optim.name,
        batch_size=t.batch_size,
        resolution=recipe.data.resolution,
        gradient_accumulation=t.gradient_accumulation,
        ema=t.ema and m.type == "full",  # the trainer keeps an EMA for full fine-tunes only
        vae_config=vae,
        encode_images=not cache_used(recipe),
        trained_text_encoders=trained,
        validation_batch=(2 if v.guidance > 1 else 1) if v.prompts else 0,  # CFG doubles the batch
        text_tokens=_text_tokens(model),
        vae_upcast=_vae_upcast(recipe, model, vae),
    )
    return replace(spec, **changes)


def _param_count(component) -> int:
    """Parameters of a component, counted on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        if component.library == "diffusers":
            import diffusers

            model = getattr(diffusers, component.class_name).from_config(component.config)
        else:
            import transformers

            cls = getattr(transformers, component.class_name)
            cfg = {k: v for k, v in component.config.items() if k not in ("architectures", "model_type")}
            model = cls(cls.config_class(**cfg))
    return sum(p.numel() for p in model.parameters())


def frozen_encoder_bytes(recipe, model) -> dict[str, int]:
    """Bytes of each frozen VAE / text encoder when on the GPU (trained encoders are traced instead).

    An upcast VAE (SDXL's stock VAE under fp16) is counted in fp32: it is while it encodes or decodes.
    """
    bytes_per = 4 if recipe.train.mixed_precision == "no" else 2
    trained = {te.name for te in _text_encoders_trained(recipe, model)}
    out = {}
    if model.vae:
        upcast = _vae_upcast(recipe, model, vae_config(recipe, model))
        out["vae"] = _param_count(model.vae) * (4 if upcast else bytes_per)
    for te in _text_encoders_loaded(recipe, model):
        if te.name not in trained:
            out[te.name] = _param_count(te) * bytes_per
    return out


# ------------------------------------------------------------------ estimate


@dataclass
class Estimate:
    recipe: object
    model: object
    trace: object  # plan_trace.TraceResult
    encoders: dict[str, int]  # frozen encoders' bytes when on the GPU
    cached: bool  # training reads the latent cache: encoders on the GPU only while sampling

    def _encoders_in(self, phase: str) -> int:
        return 0 if (self.cached and phase != "validation") else sum(self.encoders.values())

    def phases(self) -> dict[str, int]:
        return {k: v["Total"] + self._encoders_in(k) for k, v in self.trace.phase_peaks.items()}

    @property
    def peak_phase(self) -> str:
        """Phase of the training step's peak (validation sampling is reported apart)."""
        phases = {k: v for k, v in self.phases().items() if k in TRAINING_PHASES}
        return max(phases, key=phases.get)

    @property
    def peak_bytes(self) -> int:
        return self.phases()[self.peak_phase]

    @property
    def validation_bytes(self) -> int:
        return self.phases().get("validation", 0)

    @property
    def run_peak_bytes(self) -> int:
        return max(self.peak_bytes, self.validation_bytes)

    def breakdown(self, phase: Optional[str] = None) -> dict[str, int]:
        tr = self.trace
        phase = phase or self.peak_phase
        snap = tr.phase_peaks[phase]
        opt_temp = max(0, snap.get("Optstate", 0) - tr.opt_state_bytes)
        other = snap.get("Other", 0)
        return {
            "weights": snap.get("Parameter", 0) + snap.get("Buffer", 0),
            "gradients": snap.get("Gradient", 0),
            "optimizer_state": snap.get("Optstate", 0) - opt_temp,
            "optimizer_temporaries": opt_temp,
            "ema": min(tr.ema_bytes, other),
            "activations": snap.get("Activation", 0) + snap.get("Temp", 0) + max(0, other - tr.ema_bytes),
            "autocast_weight_copies": snap.get("weight_copies", 0),  # part of activations
            "frozen_encoders": self._encoders_in(phase),
        }

    def what_if(self, *, batch_scale: float = 1.0, accumulate: bool = False, opt_state: Optional[int] = None,
                opt_temp: Optional[int] = None, ema: bool = True, cached: Optional[bool] = None,
                validation: bool = True, without: tuple[str, ...] = ()) -> int:
        """Run peak (training and sampling) with fixed amounts swapped and activations rescaled.

        Every phase is: weights + optimizer state + EMA + encoders on the GPU + what the phase
        adds. Forward/backward adds activations (batch-proportional, except autocast's weight
        copies) and gradients, sampled after every op of the trace; the optimizer step adds
        all gradients and its temporaries; the VAE encode adds batch-proportional activations.
        """
        tr = self.trace
        cached = self.cached if cached is None else cached
        encoders = sum(v for k, v in self.encoders.items() if k not in without)
        state = tr.opt_state_bytes if opt_state is None else opt_state
        resident = tr.params_bytes + tr.buffers_bytes + state + (tr.ema_bytes if ema else 0)
        training = resident + (0 if cached else encoders)
        grads_all = tr.trainable_bytes
        traced_resident = tr.params_bytes + tr.buffers_bytes + tr.opt_state_bytes + tr.ema_bytes
        peaks = []
        tl = tr.timeline
        if len(tl["act"]):
            hold = grads_all if accumulate else 0
            peaks.append(training + max(
                batch_scale * (a - w) + w + max(g, hold) for a, w, g in zip(tl["act"], tl["weight_copies"], tl["grad"])
            ))
        opt = tr.phase_peaks.get("optimizer step")
        if opt is not None:
            traced_temp = max(0, opt.get("Optstate", 0) - tr.opt_state_bytes)
            peaks.append(training + grads_all + (traced_temp if opt_temp is None else opt_temp))
        enc = tr.phase_peaks.get("encode")
        if enc is not None and not cached:
            act = enc["Total"] - traced_resident - enc.get("Gradient", 0)
            peaks.append(training + max(enc.get("Gradient", 0), grads_all if accumulate else 0) + batch_scale * act)
        val = tr.phase_peaks.get("validation")
        if val is not None and validation:
            peaks.append(resident + encoders + val["Total"] - traced_resident)
        return int(max(peaks))


def _load(recipe_or_path, overrides=None):
    from sdkit.recipe import Recipe, load_recipe

    if isinstance(recipe_or_path, Recipe):
        return recipe_or_path
    return load_recipe(recipe_or_path, overrides or [])


def model_spec(recipe):
    """Architecture of the recipe's model; the family must agree with model.family."""
    from sdkit.plan.architectures import load_model_spec

    model = load_model_spec(recipe.model.pretrained, recipe.model.revision)
    if recipe.model.family not in ("auto", model.family):
        raise UserError(
            f"model.family: recipe says '{recipe.model.family}' but '{recipe.model.pretrained}' is a "
            f"{model.pipeline_class} ({model.family})"
        )
    return model


def estimate(recipe, model=None, **changes) -> Estimate:
    """Trace one step of `recipe` (with optional StepSpec changes)."""
    from sdkit.plan.trace import trace_training_step

    model = model or model_spec(recipe)
    spec = step_spec(recipe, model, **changes)
    trace = trace_training_step(spec)
    return Estimate(recipe, model, trace, frozen_encoder_bytes(recipe, model), cached=not spec.encode_images)


def _gib(n: float) -> float:
    return round(n / GiB, 2)


def _numbers(est: Estimate) -> dict:
    tr = est.trace
    return {
        "model": est.recipe.model.pretrained,
        "family": est.model.family,
        "config_source": est.model.source,
        "peak_gib": _gib(est.peak_bytes),  # one training step
        "peak_bytes": est.peak_bytes,
        "peak_phase": est.peak_phase,
        "validation_gib": _gib(est.validation_bytes) if est.validation_bytes else None,
        "run_peak_gib": _gib(est.run_peak_bytes),
        "phases_gib": {k: _gib(v) for k, v in est.phases().items()},
        "breakdown_gib": {k: _gib(v) for k, v in est.breakdown().items()},
        "encoders_gib": {k: _gib(v) for k, v in est.encoders.items()},
        "latent_cache": est.cached,
        "denoiser_params": tr.total_params,
        "trainable_params": tr.trainable_params,
        "trace_seconds": round(tr.seconds, 1),
    }


def estimate_peak(recipe) -> dict:
    """Peak GPU memory of one training step of `recipe` (a Recipe or a recipe path), as numbers.

    Keys: peak_gib (training step), peak_phase, validation_gib, run_peak_gib, phases_gib,
    breakdown_gib, encoders_gib, denoiser_params, trainable_params, trace_seconds, ...
    """
    recipe = _load(recipe)
    return _numbers(estimate(recipe))


# ------------------------------------------------------------------ knobs


@dataclass
class Knob:
    overrides: str
    peak: int  # run peak, bytes
    how: str  # exact | scaled | traced


def _smaller_batches(b: int) -> list[int]:
    """Batch sizes that keep the effective batch with an integer accumulation, largest first."""
    return [d for d in range(b - 1, 0, -1) if b % d == 0]


def _knobs(est: Estimate, budget: int) -> tuple[list[Knob], Optional[Knob]]:
    """Each knob that helps, alone; then the first combination, least intrusive first, under `budget`."""
    from sdkit.plan.trace import AdamW8bitStates

    r = est.recipe
    b, a = r.train.batch_size, r.train.gradient_accumulation

    def batch(nb: int):
        return (f"train.batch_size={nb} train.gradient_accumulation={a * b // nb}",
                {"batch_scale": nb / b, "accumulate": True}, "scaled")

    # (overrides, what_if changes, how); "adam8" depends on the estimate it is applied to
    cheap = []
    if not est.cached and not r.method.train_text_encoder:
        cheap.append(("data.cache=true" + ("" if r.data.center_crop else " data.center_crop=true"), {"cached": True}, "exact"))
    if r.optim.name == "adamw":
        cheap.append(("optim.name=adamw8bit", "adam8", "exact"))
    batches = [batch(nb) for nb in _smaller_batches(b)]
    last = [("train.ema=false", {"ema": False}, "exact")] if est.trace.ema_bytes else []
    t5 = [te.name for te in _text_encoders_loaded(r, est.model) if te.class_name == "T5EncoderModel"]
    if t5 and est.model.family == "sd3" and not r.method.train_text_encoder:
        last.append(("model.load_t5=false", {"without": tuple(t5)}, "exact"))
    if est.validation_bytes > est.peak_bytes:  # sampling is the peak: train without sample images
        last.append(("validation.prompts=[]", {"validation": False}, "exact"))

    def apply(e: Estimate, chosen) -> int:
        kw: dict = {}
        for _, change, _how in chosen:
            if change == "adam8":
                kw.update(opt_state=AdamW8bitStates.state_bytes(e.trace.trainable_numels), opt_temp=0)
            else:
                kw.update(change)
        return e.what_if(**kw)

    singles = [Knob(o[0], apply(est, [o]), o[2]) for o in cheap]
    ckpt = None
    if not r.train.gradient_checkpointing:
        ckpt = estimate(r, est.model, gradient_checkpointing=True)
        singles.append(Knob("train.gradient_checkpointing=true", ckpt.run_peak_bytes, "traced"))
    singles += [Knob(o[0], apply(est, [o]), o[2]) for o in batches[:1] + last]

    # The combination: add knobs in this order; for the batch, the largest batch that fits.
    combo, chosen, base = None, [], est
    stages = [[o] for o in cheap] + ([["ckpt"]] if ckpt else []) + ([batches] if batches else []) + [[o] for o in last]
    for alternatives in stages:
        for alt in alternatives:
            if alt == "ckpt":
                base, trial = ckpt, chosen
            else:
                trial = chosen + [alt]
            names = [c[0] for c in trial] + (["train.gradient_checkpointing=true"] if base is ckpt else [])
            hows = {c[2] for c in trial} | ({"traced"} if base is ckpt else set())
            how = next(h for h in ("scaled", "traced", "exact") if h in hows or h == "exact")
            combo = Knob(" ".join(names), apply(base, trial), how)
            if combo.peak <= budget:
                return singles, combo
        if alternatives[-1] != "ckpt":
            chosen = chosen + [alternatives[-1]]
    return singles, combo


def _not_estimated(r) -> list[str]:
    out = []
    if r.method.type == "full":
        out.append("method.type=lora (trains adapters only)")
    if r.train.mixed_precision == "no":
        out.append("train.mixed_precision=bf16 (fp16 on GPUs without bf16)")
    if r.data.resolution > 512:
        out.append(f"data.resolution={r.data.resolution // 16 * 8} (activations shrink ~4x)")
    return out


# ------------------------------------------------------------------ the command


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

    r, t = est.recipe, est.recipe.train
    console.print(
        f"[bold]{r.model.pretrained}[/]: {n['family']}, {est.model.denoiser.class_name} "
        f"{_count(n['denoiser_params'])} parameters (configs: {est.model.source})"
    )
    method = "full fine-tune" if r.method.type == "full" else f"LoRA rank {r.method.rank}"
    accum = f" x {t.gradient_accumulation} accumulated" if t.gradient_accumulation > 1 else ""
    ema = t.ema and r.method.type == "full"
    console.print(
        f"{method}, {r.data.resolution} px, batch {t.batch_size}{accum}, mixed precision {t.mixed_precision}, "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, {r.optim.name}, "
        f"EMA {'on' if ema else 'off'}, latent cache {'on' if est.cached else 'off'}"
    )
    b = n["breakdown_gib"]
    optimizer = "AdamW8bit: 1 byte per moment" if r.optim.name == "adamw8bit" else "AdamW: 2 fp32 moments"
    if est.cached:
        encoders = "latents cached: encoders off the GPU while training"
    else:
        encoders = ", ".join(n["encoders_gib"]) or "none"
    table = Table(title=f"One training step, at its peak ({n['peak_phase']})", title_justify="left")
    table.add_column("memory")
    table.add_column("GiB", justify="right")
    table.add_column("", style="dim")
    rows = [
        ("weights", b["weights"], f"{_count(n['trainable_params'])} trainable (fp32)"),
        ("gradients", b["gradients"], ""),
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
    if n["verdict"] != "fits":
        for line in _not_estimated(r):
            console.print(f"[dim]Also possible, not estimated: {line}[/]")
