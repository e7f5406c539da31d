"""Pickle-free checkpoints: optimizer, schedule and RNG state round-trip exactly through
safetensors + JSON; a damaged newest checkpoint is named and the previous one is used."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError
from sdkit.training.state_io import StateFormatError, load_tree, save_tree


def same(a, b) -> bool:
    """Equal values of equal types all the way down (tensors: dtype and every element)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _optimizer(name: str, params):
    from sdkit.recipe import OptimConfig
    from sdkit.training.optim import make_optimizer

    return make_optimizer(params, OptimConfig(name=name, lr=1e-2, weight_decay=0.01), 1e-2)


def _steps(optimizer, params, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_state_round_trips_exactly(name, tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(64))]
    optimizer = _optimizer(name, params)
    _steps(optimizer, params, 3, seed=1)
    state = optimizer.state_dict()
    save_tree(state, tmp_path / "optimizer")
    loaded = load_tree(tmp_path / "optimizer")
    assert same(state, loaded)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))

    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = _optimizer(name, twin_params)
    twin.load_state_dict(loaded)
    _steps(optimizer, params, 2, seed=2)
    _steps(twin, twin_params, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_schedule_rng_and_odd_values_round_trip(tmp_path):
    import random

    import numpy as np

    from sdkit.training.training_state import rng_state, set_rng_state

    tree = {"t": (1, 2.5, float("inf"), float("nan")), 3: [None, True, "x"], "dtype": torch.bfloat16,
            "np": np.arange(5, dtype=np.uint32), "scalar": np.float64(0.1), "__sdkit__": "not a tag"}
    save_tree(tree, tmp_path / "odd")
    assert same({k: v for k, v in tree.items() if k != "np"}, {k: v for k, v in load_tree(tmp_path / "odd").items()
                                                                 if k != "np"})
    assert (load_tree(tmp_path / "odd")["np"] == tree["np"]).all()

    save_tree(rng_state(), tmp_path / "rng")
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_tree(tmp_path / "rng"), warn=print)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])

    with pytest.raises(StateFormatError, match="cannot store a function"):
        save_tree({"f": lambda: 0}, tmp_path / "bad")


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny_sd, tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    tmp = tmp_path_factory.mktemp("state")
    images = make_image_folder(tmp / "images", n=4, size=32)
    out = tmp / "run"
    recipe = write_recipe(tmp, tiny_sd, images, out, train={"max_steps": 6, "checkpoint_every": 2, "resume": "auto",
                                                             "checkpoints_keep": 3})
    train_recipe(recipe)
    return recipe, out


def test_checkpoints_hold_no_pickle(run_with_checkpoints):
    _, out = run_with_checkpoints
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-0000002", "checkpoint-0000004"]
    names = {p.name for p in ckpts[-1].iterdir()}
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth"))], names
    assert {"trainable_0.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
            "rng_0.json", "rng_0.safetensors", "sdkit_state.json"} <= names


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(run_with_checkpoints):
    from rich.console import Console

    from sdkit.recipe import load_recipe
    from sdkit.training.checkpoints import find_resume_checkpoint
    from sdkit.training.trainer import Trainer

    recipe, out = run_with_checkpoints
    newest = out / "checkpoints" / "checkpoint-0000004"
    weights = newest / "trainable_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(UserError, match="checkpoint-0000004 is damaged: trainable_0.safetensors is .* bytes"):
        find_resume_checkpoint(load_recipe(recipe, [f"train.resume={newest}"]))

    log = io.StringIO()
    trainer = Trainer(load_recipe(recipe, ["train.max_steps=7"]), console=Console(file=log, width=400))
    trainer.fit()
    text = log.getvalue()
    assert f"checkpoint {newest} is damaged: trainable_0.safetensors is" in text
    assert "resuming from checkpoint-0000002 instead" in text and "at step 2" in text
    assert trainer.state.step == 7 and len(trainer.loss_history) == 5
