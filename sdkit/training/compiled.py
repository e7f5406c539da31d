"""torch.compile of the denoiser: for training, compiled once per input shape, the compiled
code cached in the run folder, and eager training on a compile failure; for inference
(generate/eval/serve --compile), the same fallback per call.

Shapes: the denoiser is compiled with static shapes (`dynamic=False`), so each batch shape
(each aspect bucket) compiles once and is then reused, never once per step; the recompile limit
is raised so that many buckets stay compiled. Static shapes give inductor the most to fuse.

Failures: compiling happens on the first call. The backward is lowered together with the
forward (not lazily at the first backward), so a failure (no C++ compiler, an op inductor
cannot lower) surfaces in the forward, where `CompileGuard` catches it once: one warning
naming the reason, the module goes back to eager, and the micro-batch is computed again from
the same random numbers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from sdkit.errors import first_line

RECOMPILE_LIMIT = 64  # distinct batch shapes (buckets) kept compiled


_SET_BY_US: set = set()  # cache folders this process put in TORCHINDUCTOR_CACHE_DIR


def inductor_cache(run_dir) -> Path:
    """The inductor/AOTAutograd cache: in the run folder, so a resumed run reuses its compiled
    code; TORCHINDUCTOR_CACHE_DIR set by the user wins (one cache for all runs)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    ours = _SET_BY_US | {os.path.abspath(default_cache_dir())}  # inductor writes its default back too
    path = Path(user) if user and user not in ours else Path(run_dir).resolve() / "compile-cache"
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(path):
        from torch._inductor.utils import clear_caches

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        # Inductor keeps loaded kernels and some cache paths in memory: without this, a process that
        # compiled before would reuse them and leave the new folder empty (torch's own fresh_cache does this).
        clear_caches()
    _SET_BY_US.add(str(path))
    return path


def compile_module(module, run_dir) -> "CompileGuard":
    """Compile `module` in place (its state_dict keys do not change); returns its guard."""
    import torch._functorch.config as functorch_config

    inductor_cache(run_dir)
    functorch_config.force_non_lazy_backward_lowering = True
    _compile_static(module)
    return CompileGuard(module)


def _compile_static(module) -> None:
    """Compile in place with static shapes, each shape (bucket, image size) kept compiled up to the limit."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    module.compile(dynamic=False)


def _fall_back(module, error: Exception, flag: str, then: str) -> str:
    """After a compile error: one warning naming its reason, and `module` eager again; returns the reason."""
    reason = failure_reason(error)
    warnings.warn(f"{flag}: compiling the denoiser failed ({reason}); {then}", RuntimeWarning, stacklevel=3)
    uncompile(module)
    return reason


def compile_for_inference(module, flag: str = "--compile") -> None:
    """Compile `module` in place for inference (generate/eval/serve --compile); a call whose
    compile fails warns once naming the reason and runs eagerly, and so does every later call.
    No randomness happens inside the denoiser, so computing the call again eagerly is exact."""
    _compile_static(module)
    compiled = module._compiled_call_impl

    def guarded(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except _compile_errors() as e:
            _fall_back(module, e, flag, "going on eagerly")
            return module(*args, **kwargs)

    module._compiled_call_impl = guarded


def uncompile(module) -> None:
    module._compiled_call_impl = None  # nn.Module.compile's compiled call; None: eager again


def failure_reason(error: Exception) -> str:
    """The error's type and first line; for dynamo's BackendCompilerFailed ("backend='inductor'
    raised:"), those of the error inductor raised."""
    error = getattr(error, "inner_exception", None) or error
    return f"{type(error).__name__}: {first_line(error)}"[:300]


def _compile_errors() -> tuple:
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
            torch._inductor.exc.CppCompileError)


class CompileGuard:
    """Runs the compiled module's first forward; on a compile error: one warning, then eager."""

    def __init__(self, module):
        self.module = module
        self.pending = True  # until one compiled forward (and its backward's lowering) succeeded
        self.failure = None

    def run(self, compute, rng):
        """`compute()` once; if compiling fails, again eagerly with `rng` where it started."""
        if not self.pending:
            return compute()
        start = rng.get_state()
        try:
            out = compute()
        except _compile_errors() as e:
            self.failure = _fall_back(self.module, e, "train.compile", "training goes on eagerly")
            rng.set_state(start)
            out = compute()
        self.pending = False
        return out
