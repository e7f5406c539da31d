"""The optimizer, its learning-rate schedule and the EMA of the weights, as the trainer builds them.

`make_optimizer` builds the recipe's optimizer (AdamW, bitsandbytes' AdamW8bit or transformers'
Adafactor); `training_optimizer` wraps it, when the recipe asks for it, in `ParamwiseOptimizer`,
which owns the two memory savers of full fine-tunes on 24 GB:
- bf16 trained weights (train.weights_dtype=bf16): each parameter is updated in fp32 and written
  back with stochastic rounding, so updates smaller than bf16's spacing are kept on average
  instead of being rounded away;
- a fused backward (optim.fused_backward): each parameter is updated in a post-accumulate-grad
  hook as soon as its gradient exists, and the gradient is freed at once, so no full set of
  gradients ever exists.
The trainer's step does not know either: `step()` and `zero_grad()` keep their meaning
(sdkit.training.paramwise holds the wrapper: it subclasses torch's Optimizer, and this module
imports without torch).

`sdkit plan` builds the same optimizer on fake tensors (bitsandbytes' 8-bit AdamW excepted: its
kernels do not run on fake tensors, so plan passes `training_optimizer` a `base` with the same
state tensors).
"""

from __future__ import annotations

from sdkit.errors import UserError


def make_optimizer(params, optim, lr: float):
    """The recipe's optimizer over `params`, at peak learning rate `lr`."""
    import torch

    from sdkit.training.optim_packages import make_package_optimizer

    packaged = make_package_optimizer(params, optim, lr)  # prodigy, adamw_schedulefree
    if packaged is not None:
        return packaged
    if optim.name == "adafactor":
        return _adafactor(params, optim, lr)
    kwargs = dict(lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - a dependency, but give a clear message
            raise UserError(f"optim.name: adamw8bit needs bitsandbytes ({e})") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # Fused AdamW (one kernel for all parameters) runs on CUDA and, since torch 2.4, on the CPU,
    # where it is ~4x faster than the per-parameter loop, and it updates in place (no step
    # temporaries the size of the weights). The parameters are still on the CPU here (accelerate
    # moves them in prepare), so decide by the device training will use.
    mps_only = hasattr(torch.backends, "mps") and torch.backends.mps.is_available() and not torch.cuda.is_available()
    return torch.optim.AdamW(params, fused=(not mps_only) or None, **kwargs)


def _adafactor(params, optim, lr: float):
    """transformers' Adafactor: factored second moments (a row and a column vector per matrix)
    instead of Adam's two full moments; a fixed lr, or its own relative step size."""
    from transformers.optimization import Adafactor

    # Relative step: lr must be None to construct it; it is set afterwards only so that the
    # schedule (then unused) has a number to scale.
    opt = Adafactor(params, lr=None if optim.relative_step else lr, relative_step=optim.relative_step,
                    scale_parameter=optim.relative_step, warmup_init=False, weight_decay=optim.weight_decay)
    if optim.relative_step:
        for group in opt.param_groups:
            group["lr"] = lr
    return opt


def training_optimizer(params, optim, lr: float, *, base=make_optimizer, seed: int = 0):
    """`base(params, optim, lr)`, wrapped in a ParamwiseOptimizer when the weights are bf16 or
    the backward is fused (fp32 weights and an ordinary backward get the plain optimizer)."""
    from sdkit.training.paramwise import LOW_PRECISION, ParamwiseOptimizer

    params = list(params)  # tensors, or param groups (optim.text_encoder_lr)
    inner = base(params, optim, lr)
    low = any(p.dtype in LOW_PRECISION for g in inner.param_groups for p in g["params"])
    if not (low or optim.fused_backward):
        return inner
    return ParamwiseOptimizer(inner, fused_backward=optim.fused_backward, clip_norm=optim.max_grad_norm, seed=seed)


def param_groups(modules: list, optim, lr: float):
    """The trainable parameters of `modules` (denoiser first); with optim.text_encoder_lr, the
    text encoders' form a second group at that rate (the schedule scales both alike)."""
    if optim.text_encoder_lr is None or len(modules) == 1:
        return [p for m in modules for p in m.parameters() if p.requires_grad]
    return [
        {"params": [p for p in modules[0].parameters() if p.requires_grad], "lr": lr},
        {"params": [p for m in modules[1:] for p in m.parameters() if p.requires_grad], "lr": optim.text_encoder_lr},
    ]


def make_lr_schedule(optimizer, optim, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=total_steps)


class EMA:
    """Exponential moving average of the trainable weights (fp32), for full fine-tunes; on the
    CPU (`device="cpu"`) it costs no accelerator memory, at a copy of the weights a step."""

    def __init__(self, module, decay: float, device=None):
        import torch

        self.decay = decay
        self.shadow = {n: p.detach().to(device or p.device, torch.float32, copy=True)
                       for n, p in module.named_parameters() if p.requires_grad}

    def update(self, module, step: int) -> None:
        import torch

        # Warm-up so early averages are not dominated by the random start (as diffusers' EMAModel).
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    shadow = self.shadow[n]
                    shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - decay)

    def copy_to(self, module) -> None:
        import torch

        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    p.copy_(self.shadow[n].to(p.device, p.dtype))
