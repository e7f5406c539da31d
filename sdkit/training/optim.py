"""The optimizer, its learning-rate schedule and the EMA of the weights, as the trainer builds them.

`sdkit plan` builds the same optimizer on fake tensors (bitsandbytes' 8-bit AdamW excepted: its
kernels do not run on fake tensors, so plan stands in an optimizer with the same state tensors).
"""

from __future__ import annotations

from sdkit.errors import UserError


def make_optimizer(params, optim, lr: float):
    """AdamW (fused) or bitsandbytes' AdamW8bit over `params`, at peak learning rate `lr`."""
    import torch

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


def make_lr_schedule(optimizer, optim, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=total_steps)


class EMA:
    """Exponential moving average of the trainable weights (fp32), for full fine-tunes."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    def update(self, module, step: int) -> None:
        import torch

        # Warm-up so early averages are not dominated by the random start (as diffusers' EMAModel).
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    def copy_to(self, module) -> None:
        import torch

        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    p.copy_(self.shadow[n].to(p.dtype))
