"""How `sdkit plan` counts bytes on fake tensors: torch's MemTracker narrowed to one step,
CUDA's autocast policy on the CPU, and bitsandbytes' 8-bit AdamW state without its kernels.

Why these and not the plain tools (ENVIRONMENT.md, "Estimating GPU memory without a GPU"):
- `StepMemTracker` is torch's `MemTracker` (`torch.distributed._tools.mem_tracker`): it sees
  every tensor storage created or freed inside it and sorts them into parameters, gradients,
  optimizer state, activations. Two of its habits are switched off: per-module bookkeeping
  (it walks every module on every op, which never finished for SDXL) and its own module hooks
  (they register gradient hooks on every parameter and fail on the frozen base of a LoRA
  model). Parameters, optimizer state and inputs are registered up front instead, and
  gradients through post-accumulate hooks on the trainable parameters only.
- Fake tensors live on device "cpu": this torch is a CPU-only build, where fake CUDA tensors
  abort at the first autograd op. CUDA autocast runs group_norm, layer_norm and softmax in
  fp32 where CPU autocast keeps bf16 (~10% low): `cuda_autocast_policy()` corrects that.
"""

from __future__ import annotations

import contextlib
import weakref
from array import array

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType


@contextlib.contextmanager
def cuda_autocast_policy():
    """Make CPU autocast follow CUDA's policy for the ops where the two differ in memory.

    CUDA autocast lists group_norm and layer_norm as fp32 ops and softmax / log_softmax as
    "fp32 unless a dtype is given"; CPU autocast runs all four in the input's (low) precision.
    The kernels registered here upcast like CUDA's and redispatch below autocast; removed on exit.
    """
    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(x):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        return x

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.aten.group_norm(up(input), num_groups, up(weight), up(bias), eps, cudnn_enabled)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.aten.layer_norm(up(input), normalized_shape, up(weight), up(bias), eps, cudnn_enable)

    def softmax(input, dim, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(below):
            if dtype is None and input.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            return torch.ops.aten.softmax.int(input, dim, dtype)

    def log_softmax(input, dim, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(below):
            if dtype is None and input.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            return torch.ops.aten.log_softmax.int(input, dim, dtype)

    lib.impl("group_norm", group_norm, "AutocastCPU")
    lib.impl("layer_norm", layer_norm, "AutocastCPU")
    lib.impl("softmax.int", softmax, "AutocastCPU")
    lib.impl("log_softmax.int", log_softmax, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


# ------------------------------------------------------------------ the tracker


class _AutogradOnly:
    """Stands in for MemTracker's ModTracker: knows only whether backward is running."""

    parents = {"Global"}

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *hooks) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _category_totals(snap: dict) -> dict[str, int]:
    return {getattr(k, "value", k): v for k, v in snap.items()}


class StepMemTracker(MemTracker):
    """MemTracker without module bookkeeping, plus per-phase peaks and a forward/backward timeline."""

    def __init__(self):
        super().__init__()
        self._mod_tracker = _AutogradOnly()
        self.phase = "setup"
        self.phase_peaks: dict[str, dict[str, int]] = {}
        # Per op while forward/backward runs: activation bytes, the part of them that is
        # autocast's low-precision copies of weights (not proportional to the batch), and
        # gradient bytes. Lets sdkit.plan.estimate rescale the batch without another trace.
        self.timeline = {"act": array("q"), "weight_copies": array("q"), "grad": array("q")}
        self._weight_copy_bytes = 0
        self._grad_hooks: list = []

    @contextlib.contextmanager
    def in_phase(self, name: str):
        """Count what happens inside as `name` (nested phases restore the outer one)."""
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    def track_gradients(self, params) -> None:
        """Count gradients as such once accumulated (MemTracker's module hooks would do it)."""

        def categorize(p):
            if p.grad is not None:  # a fused backward's hook (registered first) may have freed it
                self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)

        self._grad_hooks = [p.register_post_accumulate_grad_hook(categorize) for p in params]

    def remove_gradient_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()

    def _is_param(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        winfo, _ = self._WINFO.get(t.untyped_storage(), (None, None))
        return winfo is not None and winfo.reftype == _MemRefType.PARAM

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(res, torch.Tensor) and self._is_param(args[0]):
            storage = res.untyped_storage()
            self._weight_copy_bytes += storage.nbytes()
            weakref.finalize(storage, self._weight_copy_freed, storage.nbytes())
        self._sample()
        return res

    def _weight_copy_freed(self, nbytes: int) -> None:
        self._weight_copy_bytes -= nbytes

    def _sample(self) -> None:
        # Runs after every op: a few dict reads, a copy only at a new peak.
        for snap in self._curr_mem_snap.values():
            best = self.phase_peaks.get(self.phase)
            if best is None or snap[_TOTAL_KEY] > best["Total"]:
                totals = _category_totals(snap)
                totals["weight_copies"] = self._weight_copy_bytes
                self.phase_peaks[self.phase] = totals
            if self.phase == "forward/backward":
                self.timeline["act"].append(snap[_MemRefType.ACT] + snap[_MemRefType.TEMP])
                self.timeline["weight_copies"].append(self._weight_copy_bytes)
                self.timeline["grad"].append(snap[_MemRefType.GRAD])


class AdamW8bitStates(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's memory without bitsandbytes: same state tensors, in-place update.

    Per parameter of 4096+ elements: two uint8 moments and two fp32 absmax vectors (one value per
    256-element block); smaller parameters keep two fp32 moments. bnb's 8-bit kernels update in
    place, so a step allocates nothing; here the update is an in-place no-op (fake or tiny tensors).
    """

    MIN_8BIT_SIZE = 4096
    BLOCK = 256

    def __init__(self, params, lr=1e-4):
        super().__init__(params, {"lr": lr})

    @classmethod
    def state_bytes(cls, numels) -> int:
        """State bytes for trainable tensors of these element counts."""
        total = 0
        for n in numels:
            if n < cls.MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * n + 2 * 4 * -(-n // cls.BLOCK)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    n = p.numel()
                    if n < self.MIN_8BIT_SIZE:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        blocks = -(-n // self.BLOCK)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32)
                p.mul_(1.0)  # the in-place update


class ProdigyStates(torch.optim.Optimizer):
    """Prodigy's memory without its data-dependent step (it reads its step-size estimate d back
    with .item(), which fake tensors cannot): per parameter the two Adam moments, the starting
    point p0 and the accumulator s, all in the parameter's dtype; the update is in place."""

    STATES = ("exp_avg", "exp_avg_sq", "p0", "s")

    def __init__(self, params, lr=1.0):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    self.state[p].update({name: torch.zeros_like(p) for name in self.STATES})
                p.mul_(1.0)  # the in-place update
