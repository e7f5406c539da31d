"""The knobs `sdkit plan` proposes when a recipe does not fit, each estimated, not guessed.

The optimizer, the EMA, the cache and frozen encoders change fixed amounts that the trace
keeps apart ("exact"); a smaller batch rescales the traced activations ("scaled", measured
exact on SD 1.5); gradient checkpointing needs a second trace, which runs only then ("traced").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sdkit.plan.estimate import Estimate, estimate, text_encoders_trained


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
    from sdkit.plan.tracker import AdamW8bitStates

    r = est.recipe
    b, a = r.train.batch_size, r.train.gradient_accumulation

    def batch(nb: int):
        return (f"train.batch_size={nb} train.gradient_accumulation={a * b // nb}",
                {"batch_scale": nb / b, "accumulate": True}, "scaled")

    # (overrides, what_if changes, how); "adam8" depends on the estimate it is applied to
    cheap = []
    if not est.cached and not r.method.trains_text_encoders:
        cheap.append(("data.cache=true" + ("" if r.data.center_crop else " data.center_crop=true"), {"cached": True}, "exact"))
    if r.optim.name == "adamw":
        cheap.append(("optim.name=adamw8bit", "adam8", "exact"))
    batches = [batch(nb) for nb in _smaller_batches(b)]
    last = [("train.ema=false", {"ema": False}, "exact")] if est.trace.ema_bytes else []
    trained = {te.name for te in text_encoders_trained(r, est.model)}
    for name, override in _family_of(est).optional_components().items():  # e.g. SD3's T5
        if name in est.encoders and name not in trained:
            last.append((override, {"without": (name,)}, "exact"))
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
        ckpt = estimate(r, est.model, **{"train.gradient_checkpointing": True})
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


def _family_of(est: Estimate):
    from sdkit.families import family_class

    return family_class(est.model.family)


def _not_estimated(r) -> list[str]:
    out = []
    if r.method.type == "full":
        if not r.optim.fused_backward:
            out.append("train.weights_dtype=bf16 train.mixed_precision=bf16 optim.name=adafactor "
                       "optim.fused_backward=true train.gradient_accumulation=1 (as recipes/sdxl-full.yaml)")
        out.append("method.type=lora (trains adapters only)")
    if r.train.mixed_precision == "no":
        out.append("train.mixed_precision=bf16 (fp16 on GPUs without bf16)")
    if r.data.resolution > 512:
        out.append(f"data.resolution={r.data.resolution // 16 * 8} (activations shrink ~4x)")
    return out
