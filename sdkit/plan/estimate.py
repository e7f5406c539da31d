"""`sdkit plan`: will this recipe fit my GPU? Answered on a CPU, from configs only.

One training step of the recipe runs on fake tensors (`sdkit.plan.trace`), built by the
trainer's own builders and run by its own step, giving the peak bytes of each phase (VAE
encode when latents are not cached, forward and backward, optimizer step, and validation
sampling when the recipe has prompts) and what each is made of. Frozen encoders kept on the
GPU are added from their parameter counts. The verdict also allows for the CUDA context,
which no tensor accounts for (sdkit.plan.report).

When the recipe does not fit (or fits with little to spare), the knobs that would help are
estimated, not guessed (sdkit.plan.knobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sdkit.errors import UserError
from sdkit.units import gib as _gib

TRAINING_PHASES = ("encode", "forward/backward", "optimizer step")


# ------------------------------------------------------------------ recipe -> step


def _family(model):
    from sdkit.families import family_class

    return family_class(model.family)


def text_encoders_loaded(recipe, model) -> list:
    """Text encoders the trainer loads: the family's loading leaves some out (SD3's T5 with
    model.load_t5=false)."""
    dropped = {k for k, v in _family(model).load_overrides(recipe.model, None).items() if v is None}
    return [te for te in model.text_encoders if te.name not in dropped]


def text_encoders_trained(recipe, model) -> list:
    """What method.train_text_encoder trains: the family's trainable text encoders."""
    if not recipe.method.trains_text_encoders:
        return []
    return [te for te in text_encoders_loaded(recipe, model) if te.name in _family(model).text_encoder_attrs]


def _param_count(component) -> int:
    """Parameters of a component, counted on the meta device (no memory)."""
    from sdkit.plan.trace import _from_config

    return sum(p.numel() for p in _from_config(component).parameters())


def frozen_encoder_bytes(recipe, model) -> dict[str, int]:
    """Bytes of each frozen VAE / text encoder when on the GPU (trained encoders are traced instead).

    An upcast VAE (SDXL's stock VAE under fp16) is counted in fp32: it is while it encodes or decodes.
    """
    from sdkit.plan.trace import vae_config_of

    bytes_per = 4 if recipe.train.mixed_precision == "no" else 2
    trained = {te.name for te in text_encoders_trained(recipe, model)}
    out = {}
    if model.vae:
        upcast = _family(model).upcasts_vae(recipe.train.mixed_precision, vae_config_of(recipe, model))
        out["vae"] = _param_count(model.vae) * (4 if upcast else bytes_per)
    for te in text_encoders_loaded(recipe, model):
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
    bucket: tuple = (0, 0)  # (width, height) the step was traced at (plan_bucket)

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
    """Architecture of the recipe's model; the family must agree with model.family and accept the recipe."""
    from sdkit.plan.architectures import load_model_spec

    from sdkit.single_file import config_source, inferred_config_repo

    # a single file's architecture is its config folder's (or the repo diffusers infers for it)
    model = load_model_spec(config_source(recipe.model) or inferred_config_repo(recipe.model.pretrained),
                            recipe.model.revision)
    if recipe.model.family not in ("auto", model.family):
        raise UserError(
            f"model.family: recipe says '{recipe.model.family}' but '{recipe.model.pretrained}' is a "
            f"{model.pipeline_class} ({model.family})"
        )
    problems = _family(model).check_recipe(recipe)
    if problems:
        raise UserError("\n".join(problems))
    return model


def with_changes(recipe, **changes):
    """A copy of the recipe with dotted keys changed: with_changes(r, **{"train.batch_size": 2})."""
    copy = recipe.model_copy(deep=True)
    for key, value in changes.items():
        section, leaf = key.rsplit(".", 1)
        setattr(copy.get(section), leaf, value)
    return copy


def estimate(recipe, model=None, **changes) -> Estimate:
    """Trace one step of `recipe` (with optional dotted-key changes, see with_changes)."""
    from sdkit.plan.trace import plan_bucket, trace_training_step

    model = model or model_spec(recipe)
    recipe = with_changes(recipe, **changes) if changes else recipe
    trace = trace_training_step(recipe, model)
    return Estimate(recipe, model, trace, frozen_encoder_bytes(recipe, model), cached=recipe.cache_used,
                    bucket=plan_bucket(recipe, model))


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
        "bucket": list(est.bucket),  # (width, height) the step was traced at: the largest bucket
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
