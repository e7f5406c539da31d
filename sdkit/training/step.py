"""ONE training step, for every family and method: the trainer loops over it, `sdkit bench`
times it and `sdkit plan` traces it on fake tensors. Nothing else computes a training loss.

A step takes `accumulation` micro-batches from an iterator: each is encoded (unless its
latents / text embeddings come from the cache), noised by the objective, denoised and
back-propagated; then the gradients are clipped and the optimizer, the schedule and the EMA
step once. It returns the mean loss as a tensor on the device and never reads it back, so
the device is synchronised only where the caller asks for the number (the log interval).

Its parts come from the builders (sdkit.training.build). It calls through ONE prepared module,
`model` (sdkit.training.prepared): the denoiser, or, when text encoders train too, a container
whose forward runs them and the denoiser, so every trainable gradient is synced as one model's.
The `accelerator` is anything with
accelerate's Accelerator methods used here (accumulate, backward, clip_grad_norm_, autocast,
unwrap_model, device, num_processes): plan passes a plain-torch stand-in. `phase(name)` is a
context manager factory the caller may replace to time or trace the phases "data",
"encoders", "forward", "backward" and "optimizer".

A fused backward (optim.fused_backward) lives in the optimizer (sdkit.training.paramwise): its
updates happen in gradient hooks during `backward` and its `step()` only counts, so the step
does not branch on it. A compiled denoiser's first call goes through its CompileGuard.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

PHASES = ("data", "encoders", "forward", "backward", "optimizer")


def no_phase(name: str):
    return contextlib.nullcontext()


@dataclass
class TrainStep:
    family: Any
    model: Any  # what the accelerator prepared: the denoiser, or the denoiser + trained text encoders
    modules: list  # the trainable modules in `model`, unwrapped, denoiser first
    params: list  # their trainable parameters
    objective: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    noise_rng: Any  # torch.Generator: latents, noise and timesteps; saved in every checkpoint
    compute_dtype: Any  # dtype of the denoiser's inputs (the adapter's answer)
    resolution: int
    accumulation: int = 1
    max_grad_norm: Optional[float] = None
    ema: Any = None
    trains_text: bool = False  # the text encoders are among `modules`
    compile_guard: Any = None  # sdkit.training.compiled.CompileGuard when the denoiser is compiled
    # DreamBooth prior preservation: the weight of the class samples' loss (None: no class samples)
    prior_loss_weight: Optional[float] = None
    # full_parameters(prepared) -> context giving the unwrapped module with full weights
    # (ZeRO-3/FSDP gather them); the EMA reads through it. Default: unwrap_model.
    full_parameters: Optional[Callable] = field(default=None, repr=False)
    phase: Callable[[str], Any] = field(default=no_phase, repr=False)
    # with class samples, the loss terms of the last step ("instance", "prior": device tensors,
    # mean over its micro-batches); the trainer logs them at its log interval
    terms: dict = field(default_factory=dict, repr=False)
    _micro_terms: dict = field(default_factory=dict, init=False, repr=False)
    # the last step's gradient norm before clipping, a device tensor read only when logged;
    # None while no step has run and with a fused backward (its gradients never exist together)
    grad_norm: Any = field(default=None, repr=False)

    def __call__(self, batches: Iterator[dict], step_number: int):
        """One optimizer step over `accumulation` micro-batches; `step_number` counts from 1."""
        total, terms = None, {}
        acc = self.accelerator
        if getattr(acc, "gradient_accumulation_steps", self.accumulation) != self.accumulation:
            # accelerate keeps ONE accumulation setting per process; runs that share a process
            # (bench --compare, tests) each set theirs back before they step.
            acc.gradient_accumulation_steps = self.accumulation
        for micro in range(self.accumulation):
            with self.phase("data"):
                batch = next(batches)
            # accelerate decides per micro-batch whether gradients sync (DDP/FSDP: no all-reduce
            # before the window's last; DeepSpeed: its engine steps once per window) and scales
            # the loss by its gradient_accumulation_steps, which the trainer sets to `accumulation`.
            with acc.accumulate(self.model):
                with self.phase("forward"):
                    loss = self.compute_loss(batch)
                with self.phase("backward"):
                    acc.backward(loss)
            loss = loss.detach()
            total = loss if total is None else total + loss
            for name, value in self._micro_terms.items():
                terms[name] = value if name not in terms else terms[name] + value
        with self.phase("optimizer"):
            self.optimizer_step(step_number)
        self.terms = {name: value / self.accumulation for name, value in terms.items()}
        return total / self.accumulation

    def compute_loss(self, batch: dict):
        """The objective's loss on one micro-batch (a compiled denoiser's first call is guarded:
        a compile failure warns once and the micro-batch is computed again eagerly)."""
        if self.compile_guard is not None:
            return self.compile_guard.run(lambda: self._loss(batch), self.noise_rng)
        return self._loss(batch)

    def _loss(self, batch: dict):
        from sdkit.training.prepared import predict

        moments, text = self._encode(batch)
        family = self.family
        latents = family.sample_latents(moments, self.noise_rng).to(self.accelerator.device)
        noisy = self.objective.noise(latents, self.noise_rng)
        dtype = self.compute_dtype
        with self.accelerator.autocast():
            if text is None:  # trained text encoders: the prepared container runs them with the denoiser
                pred = self.model(noisy.noisy.to(dtype), noisy.timesteps, batch)
            else:
                pred = predict(family, self.model, noisy.noisy.to(dtype), noisy.timesteps, text, batch,
                               self.resolution, dtype)
        from sdkit.training.objectives import combine

        prior = batch.get("prior") if self.prior_loss_weight is not None else None
        terms = self.objective.loss_terms(pred, noisy, prior)
        self._micro_terms = {name: value.detach() for name, value in terms.items()} if prior is not None else {}
        return combine(terms, self.prior_loss_weight or 0.0)

    def _encode(self, batch: dict):
        """Posterior moments and text embeddings: from the batch (cache) or the frozen encoders.
        Text is None when the text encoders train (compute_loss runs them with gradients)."""
        import torch

        device = self.accelerator.device
        if "moments" in batch:
            moments = batch["moments"].to(device)
        else:
            with self.phase("encoders"), torch.no_grad():
                moments = self.family.encode_images(batch["pixel_values"].to(device))
        if "text" in batch:
            return moments, {k: v.to(device) for k, v in batch["text"].items()}
        if self.trains_text:
            return moments, None
        with self.phase("encoders"), torch.no_grad():
            return moments, self.family.encode_text(batch["caption"])

    def optimizer_step(self, step_number: int) -> None:
        """After the last micro-batch's backward: clip, step, schedule, clear the gradients, EMA."""
        acc = self.accelerator
        if self.max_grad_norm:
            self.grad_norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)  # None under DeepSpeed
        else:  # a fused backward left no gradients: None
            self.grad_norm = _total_norm(self.params)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            from sdkit.training.prepared import parts_of

            gather = self.full_parameters or (lambda m: contextlib.nullcontext(acc.unwrap_model(m)))
            with gather(self.model) as module:
                self.ema.update(parts_of(module)[0], step_number)


def _total_norm(params):
    """The 2-norm of all gradients, as clipping would measure it (nothing to measure: None)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None
