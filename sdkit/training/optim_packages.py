"""Optimizers from their own packages: Prodigy (prodigyopt) and schedule-free AdamW (schedulefree).

Both are regular dependencies (small, pure Python); an install without them still gets a
one-line error naming the package. Schedule-free AdamW keeps two sets of weights: the
parameters hold the point gradients are taken at while training (train mode) and the average
that should be evaluated and saved in eval mode; `averaged_weights()` switches around
validation, checkpoints and the final save, for any optimizer that has such modes.
"""

from __future__ import annotations

import contextlib

from sdkit.errors import UserError

PACKAGES = {"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree"}


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(PACKAGES[name])
    except ImportError as e:
        raise UserError(f"optim.name: {name} needs the {PACKAGES[name]} package "
                        f"(pip install {PACKAGES[name]}): {e}") from None


def make_package_optimizer(params, optim, lr: float):
    """The optimizer named by optim.name when it comes from its own package, else None."""
    betas = (optim.beta1, optim.beta2)
    if optim.name == "prodigy":
        # lr multiplies Prodigy's own step-size estimate d: 1.0 is the package's advice.
        return _import("prodigy").Prodigy(params, lr=lr, betas=betas, eps=optim.eps,
                                          weight_decay=optim.weight_decay, use_bias_correction=True,
                                          safeguard_warmup=optim.warmup_steps > 0)
    if optim.name == "adamw_schedulefree":
        # Schedule-free warms up itself; the recipe keeps lr_scheduler constant (recipe check).
        return _import("adamw_schedulefree").AdamWScheduleFree(params, lr=lr, betas=betas, eps=optim.eps,
                                                               weight_decay=optim.weight_decay,
                                                               warmup_steps=optim.warmup_steps)
    return None


def _modes(optimizer):
    """The object with train()/eval() modes (accelerate's wrapper forwards them), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return optimizer if callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None)) else None


def train_mode(optimizer) -> None:
    modes = _modes(optimizer)
    if modes is not None:
        modes.train()


@contextlib.contextmanager
def averaged_weights(optimizer):
    """The weights to evaluate or save (schedule-free: the average) inside; training's outside."""
    modes = _modes(optimizer)
    if modes is None:
        yield
        return
    modes.eval()
    try:
        yield
    finally:
        modes.train()
