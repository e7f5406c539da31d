"""Compiled training (train.compile): what `auto` means, the compiled step against eager on every
family, exact compiled-to-compiled resume with the compile cache in the run folder, and the eager
fallback when compiling fails. Compiling on a CPU takes tens of seconds: these tests are few,
tiny and marked slow; every other test trains eagerly (tests/helpers.write_recipe sets
train.compile=false, and `auto` does not compile runs that short anyway)."""

import warnings

import pytest

from helpers import write_recipe
from sdkit.recipe import COMPILE_AUTO_MIN_STEPS, load_recipe
from sdkit.training.trainer import Trainer

FULL = {"type": "full"}


def _trainer(tmp_path, model, images, name, *, steps=2, compile=True, **train):
    path = write_recipe(tmp_path, model, images, tmp_path / name, method=FULL, optim={"lr": 1e-3},
                        train={"batch_size": 1, "max_steps": steps, "compile": compile, **train})
    return Trainer(load_recipe(path))


def _losses(trainer, steps=2):
    """The first `steps` losses; compiling happens in the first step only, never once per step."""
    from torch._dynamo.utils import counters

    trainer.setup()
    batches = trainer.batches()
    losses, graphs = [], []
    try:
        for i in range(steps):
            losses.append(trainer.step(batches, i + 1).item())
            graphs.append(counters["stats"]["unique_graphs"])  # a recompile adds a graph
    finally:
        trainer.accelerator.end_training()
    assert len(set(graphs)) == 1, f"compiled again after the first step: {graphs}"
    return losses


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def test_auto_compiles_long_runs_on_cuda_only(tiny_sd, image_folder, tmp_path):
    path = write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "r")
    short = load_recipe(path, ["train.compile=auto", "train.max_steps=20"])
    long = load_recipe(path, ["train.compile=auto", f"train.max_steps={COMPILE_AUTO_MIN_STEPS}"])
    assert not short.compiles("cpu") and not short.compiles("cuda")
    assert long.compiles("cuda") and not long.compiles("cpu") and not long.compiles("mps")
    assert load_recipe(path, ["train.compile=true"]).compiles("cpu")
    assert not load_recipe(path, [f"train.max_steps={COMPILE_AUTO_MIN_STEPS}"]).compiles("cuda")  # helpers: false


@pytest.mark.slow
def test_compile_failure_warns_once_and_trains_eagerly(tiny_sd, image_folder, tmp_path):
    """No C++ compiler for inductor (a real failure on machines without one): one warning naming
    the reason, then eager steps with the same losses as an eager run."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    torch._dynamo.reset()  # nothing compiled earlier in this process may spare the compiler
    clear_caches()
    eager = _losses(_trainer(tmp_path, tiny_sd, image_folder, "eager", compile=False))
    trainer = _trainer(tmp_path, tiny_sd, image_folder, "failing")
    # torch's own config patch: pytest's monkeypatch deletes a torch config entry when it undoes.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _losses(trainer)
    ours = [w for w in caught if "train.compile" in str(w.message)]
    assert len(ours) == 1 and "training goes on eagerly" in str(ours[0].message)
    assert trainer.step.compile_guard.failure
    assert losses == pytest.approx(eager, abs=1e-6)
    torch._dynamo.reset()  # the failed compile stays behind for no later test
    clear_caches()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_compiled_step_loss_matches_eager(family, request, image_folder, tmp_path):
    """(SD 1.x: in the resume test below.)"""
    model = request.getfixturevalue(f"tiny_{family}")
    eager = _losses(_trainer(tmp_path, model, image_folder, "eager", compile=False))
    trainer = _trainer(tmp_path, model, image_folder, "compiled")
    compiled = _losses(trainer)
    assert trainer.step.compile_guard.failure is None  # compiled for real, not the eager fallback
    assert compiled == pytest.approx(eager, abs=1e-4)


@pytest.mark.slow
def test_compiled_resume_is_exact(tiny_sd, image_folder, tmp_path):
    eager = _losses(_trainer(tmp_path, tiny_sd, image_folder, "eager", steps=2, compile=False), steps=2)
    straight = _trainer(tmp_path, tiny_sd, image_folder, "run", steps=4, checkpoint_every=2)
    straight.fit()
    # The step's loss, compiled vs eager (SD 1.x), before any update: after one, inductor's fused
    # kernels round differently and the weights drift (1.6e-3 in the second loss at lr 1e-3).
    assert straight.loss_history[:1] == pytest.approx(eager[:1], abs=1e-4)
    cache = tmp_path / "run" / "compile-cache"  # inductor's cache folder points into the run folder
    assert any((cache / kind).is_dir() and any((cache / kind).iterdir()) for kind in ("fxgraph", "aotautograd"))
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-0000002"
    path = write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "run", method=FULL, optim={"lr": 1e-3},
                        train={"batch_size": 1, "max_steps": 4, "compile": True, "resume": str(ckpt)})
    resumed = Trainer(load_recipe(path))
    import torch._dynamo

    torch._dynamo.reset()  # as a new process starts: nothing compiled in memory, only the run folder's cache
    hits = _cache_hits()
    resumed.fit()
    assert _cache_hits() > hits  # the resumed run loaded the compiled graphs from the run folder
    assert resumed.state.step == 4 and len(resumed.loss_history) == 2
    assert resumed.loss_history == pytest.approx(straight.loss_history[2:], abs=1e-6)
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
