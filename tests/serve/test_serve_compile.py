"""`sdkit serve --compile`: the denoiser is compiled before the warm-up request, so the compile
is paid before the server reports ready (the model loaded as `sdkit serve` loads it, no server)."""

import pytest

pytest.importorskip("kserve")

from sdkit.serve.server import build_models  # noqa: E402


@pytest.mark.slow
def test_compile_happens_in_the_warm_up(tiny_sd):
    from torch._dynamo.utils import counters

    [model] = build_models(str(tiny_sd), compile=True)
    before = counters["stats"]["unique_graphs"]
    assert model.load()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before and model.service.pipe.unet._compiled_call_impl is not None
