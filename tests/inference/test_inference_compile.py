"""`--compile` for generate / eval / serve: the denoiser compiled in place, the same pixels as
eager, and eager images with one warning when compiling fails. Compiling takes tens of seconds
on a CPU: marked slow, one tiny model, two steps."""

import warnings

import numpy as np
import pytest

from sdkit.inference.generate import generate_command

FAST = dict(prompts=["a red circle"], steps=2, guidance=5.0, seed=3)


def _pixels(paths):
    from PIL import Image

    return np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.int16)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_generate_compiled_matches_eager(tiny_sd, tmp_path):
    eager = _pixels(generate_command(model=str(tiny_sd), out=tmp_path / "eager", **FAST))
    before = _graphs()
    compiled = _pixels(generate_command(model=str(tiny_sd), out=tmp_path / "compiled", compile=True, **FAST))
    assert _graphs() > before  # the denoiser really went through torch.compile
    assert np.abs(compiled - eager).max() <= 2  # of 255: fused kernels round differently


@pytest.mark.slow
def test_failed_compile_warns_once_and_generates_eagerly(tiny_sd, tmp_path):
    """No C++ compiler for inductor (a real failure on machines without one). Inductor's
    in-memory caches are cleared before (kernels built by an earlier test would not need the
    compiler) and after (the failure must not stay behind for later tests)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    def forget_compiled():  # dynamo's compiled frames and inductor's kernels, as in a new process
        torch._dynamo.reset()
        clear_caches()

    eager = _pixels(generate_command(model=str(tiny_sd), out=tmp_path / "eager", **FAST))
    import torch._functorch.config as functorch_config

    # torch's own config patch: pytest's monkeypatch deletes a torch config entry when it undoes.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            functorch_config.patch(enable_autograd_cache=False), warnings.catch_warnings(record=True) as caught:
        forget_compiled()
        warnings.simplefilter("always")
        failed = _pixels(generate_command(model=str(tiny_sd), out=tmp_path / "failed", compile=True, **FAST))
    forget_compiled()
    ours = [w for w in caught if "--compile" in str(w.message)]
    assert len(ours) == 1 and "going on eagerly" in str(ours[0].message)
    assert np.array_equal(failed, eager)
