"""Per-parameter optimizer steps: bf16 weights with stochastic rounding, and the fused backward.

sdkit.training.optim.make_optimizer wraps the recipe's optimizer in `ParamwiseOptimizer` when
the trained weights are bf16 or optim.fused_backward is on. kohya sd-scripts and OneTrainer train
all of SDXL's UNet on 24 GB this way; written here over any torch optimizer (AdamW, bitsandbytes'
AdamW8bit, transformers' Adafactor) instead of patching each one's step.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

LOW_PRECISION = (torch.bfloat16,)  # train.weights_dtype allows fp32 or bf16


def round_stochastically(x, generator):
    """fp32 -> bf16, rounding up with probability (distance to the lower bf16) / (spacing):
    the expected value is x. bf16 is fp32's upper 16 bits: add 16 random low bits, then cut."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # 0xFFFF0000: carry decides the rounding
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


class ParamwiseOptimizer(Optimizer):
    """Steps `inner` one parameter at a time: in fp32 with stochastic rounding for bf16 weights,
    and, with `fused_backward`, inside each parameter's post-accumulate-grad hook.

    It is a torch Optimizer over the same param_groups and state as `inner` (the schedule and
    accelerate see an ordinary optimizer; its state_dict is inner's, so checkpoints are the
    same format). The rounding noise is drawn from a generator seeded by (seed, step, parameter
    index), with the step counted in the param groups: a resumed run rounds exactly as an
    uninterrupted one, with no generator state to save.
    """

    def __init__(self, inner, *, fused_backward: bool = False, clip_norm=None, seed: int = 0):
        self.inner = inner
        self.fused_backward, self.clip_norm, self.seed = fused_backward, clip_norm, seed
        # The same group dicts: the schedule's lr changes reach `inner`.
        super().__init__(inner.param_groups, dict(inner.defaults))
        self.state = inner.state
        for group in self.param_groups:
            group.setdefault("rounding_step", 0)
        self.params = [p for g in self.param_groups for p in g["params"]]
        self._index = {p: i for i, p in enumerate(self.params)}
        self._hooks = []
        if fused_backward:
            self._hooks = [p.register_post_accumulate_grad_hook(self._step_in_backward) for p in self.params]

    # -- the per-parameter update
    def _step_in_backward(self, p) -> None:
        if self.clip_norm:  # per tensor: the others' gradients are gone or not there yet
            torch.nn.utils.clip_grad_norm_([p], self.clip_norm)
        self.step_param(p)
        p.grad = None  # freed now: the point of a fused backward

    @torch.no_grad()
    def step_param(self, p) -> None:
        """Update one parameter from its gradient (inner's rule, only this parameter)."""
        groups = self.param_groups
        kept = [g["params"] for g in groups]
        for g in groups:
            g["params"] = [p] if any(q is p for q in g["params"]) else []
        low = p.dtype in LOW_PRECISION
        try:
            if low:  # the optimizer sees fp32 weights and gradients; its state is fp32 too
                p.data, p.grad = p.data.float(), p.grad.float()
            self._inner_step()
        finally:
            for g, params in zip(groups, kept):
                g["params"] = params
            if low:
                step = next(g for g in groups if any(q is p for q in g["params"]))["rounding_step"]
                p.grad = None
                p.data = round_stochastically(p.data, self._generator(p, step))

    def _inner_step(self) -> None:
        """inner's own update rule, without torch's step wrapper: that wrapper runs every global
        optimizer hook per call, and a memory tracker's hook walks all optimizer state, which made
        a per-parameter update O(parameters) and the whole step O(parameters^2) under `sdkit plan`.
        The hooks still run once per step around this optimizer's own step()."""
        step = type(self.inner).step
        if getattr(step, "hooked", False):  # torch's profile_hook_step wrapper (functools.wraps)
            step.__wrapped__(self.inner)
        else:
            self.inner.step()

    def _generator(self, p, step: int):
        seed = (self.seed * 1_000_003 + step) * 100_003 + self._index[p]
        return torch.Generator(device=p.device).manual_seed(seed % (1 << 63))

    @torch.no_grad()
    def step(self, closure=None):
        """The optimizer step: with a fused backward the updates already happened in backward."""
        if not self.fused_backward:
            self.step_each()
        for group in self.param_groups:
            group["rounding_step"] += 1

    def step_each(self) -> None:
        """Update every parameter that holds a gradient, one at a time."""
        for p in self.params:
            if p.grad is not None:
                self.step_param(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict) -> None:
        """Optimizer.load_state_dict casts floating state to its parameter's dtype: bf16 weights
        would turn the fp32 moments bf16. Load while the parameters are fp32 (as in step_param)."""
        low = [(p, p.data) for p in self.params if p.dtype in LOW_PRECISION]
        for p, data in low:
            p.data = data.float()
        try:
            super().load_state_dict(state_dict)
        finally:
            for p, data in low:
                p.data = data
        self.inner.param_groups, self.inner.state = self.param_groups, self.state

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
