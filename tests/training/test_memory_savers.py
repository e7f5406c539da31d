"""The memory savers of full fine-tunes on 24 GB: a fused backward (each parameter updated in its
gradient hook), bf16 trained weights with stochastic rounding, Adafactor; exact, and exactly resumable."""

import pytest
import torch

from helpers import write_recipe
from sdkit.errors import UserError
from sdkit.recipe import load_recipe
from sdkit.training.paramwise import ParamwiseOptimizer, round_stochastically
from sdkit.training.trainer import Trainer

FULL = {"type": "full"}


def _stepped(tmp_path, model, images, name, steps=2, **sections):
    """A Trainer set up for `sections`, after `steps` optimizer steps on the same batches."""
    sections = {"method": FULL, **sections}
    sections["train"] = {"batch_size": 2, "max_steps": steps, **sections.get("train", {})}
    trainer = Trainer(load_recipe(write_recipe(tmp_path, model, images, tmp_path / name, **sections)))
    trainer.setup()
    batches = trainer.batches()
    losses = [trainer.step(batches, i + 1).item() for i in range(steps)]
    trainer.accelerator.end_training()
    return trainer, losses


def _max_diff(a: Trainer, b: Trainer) -> float:
    x, y = a.trainable_state(), b.trainable_state()
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_backward_step_equals_the_ordinary_step(tiny_sd, image_folder, tmp_path, name):
    optim = {"name": name, "lr": 1e-3, "max_grad_norm": None}
    plain, plain_losses = _stepped(tmp_path, tiny_sd, image_folder, "plain", optim=optim)
    fused, fused_losses = _stepped(tmp_path, tiny_sd, image_folder, "fused", optim={**optim, "fused_backward": True})
    assert isinstance(fused.step.optimizer.optimizer, ParamwiseOptimizer)
    assert fused_losses == pytest.approx(plain_losses, abs=1e-6)
    assert _max_diff(plain, fused) < 1e-6
    assert _max_diff(plain, fused) >= 0 and plain_losses[1] != plain_losses[0]  # it trained
    assert all(p.grad is None for p in fused.step.params)  # no gradient outlives its hook


def test_fused_backward_never_holds_all_gradients(tiny_sd, image_folder, tmp_path):
    """The point of it: during backward, at most a few gradients exist at once."""
    trainer = Trainer(load_recipe(write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "r", method=FULL,
                                               optim={"fused_backward": True, "max_grad_norm": 1.0})))
    trainer.setup()
    params, most = trainer.step.params, [0]

    def count(_p):
        most[0] = max(most[0], sum(q.grad is not None for q in params))

    handles = [p.register_post_accumulate_grad_hook(count) for p in params]  # after the optimizer's hooks
    trainer.step(trainer.batches(), 1)
    for h in handles:
        h.remove()
    trainer.accelerator.end_training()
    assert trainer.step.max_grad_norm is None  # clipped per tensor in the hook, not globally
    assert most[0] <= 1 < len(params)


def test_fused_backward_with_accumulation_is_refused_in_one_line(tiny_sd, image_folder, tmp_path):
    path = write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "r", method=FULL,
                        optim={"fused_backward": True}, train={"gradient_accumulation": 2})
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert "optim.fused_backward" in str(e.value) and "gradient_accumulation" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(UserError, match="weights_dtype bf16 needs mixed_precision bf16"):
        load_recipe(path, ["train.gradient_accumulation=1", "train.weights_dtype=bf16"])


def test_stochastic_rounding_keeps_small_updates_that_round_to_nearest_loses():
    """1,000 updates of +1e-4 on weights of 1.0 (bf16 spacing there: 0.0078): round-to-nearest
    keeps 1.0; stochastic rounding ends near the exact 1.1 on average."""
    n, steps, delta = 20_000, 1000, 1e-4
    nearest = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    rounded = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    sgd = torch.optim.SGD([nearest], lr=1.0)
    paramwise = ParamwiseOptimizer(torch.optim.SGD([rounded], lr=1.0), seed=0)
    for _ in range(steps):
        for p, opt in ((nearest, sgd), (rounded, paramwise)):
            p.grad = torch.full_like(p, -delta)
            opt.step()
            opt.zero_grad()
    assert rounded.dtype == torch.bfloat16
    assert nearest.float().mean().item() == 1.0
    assert rounded.float().mean().item() == pytest.approx(1.0 + steps * delta, abs=2e-3)
    # and each rounding is unbiased: mean of many roundings of one value is that value
    x = torch.full((200_000,), 1.0 + 3e-3)
    assert round_stochastically(x, torch.Generator().manual_seed(0)).float().mean().item() == pytest.approx(1.003, abs=1e-4)


@pytest.mark.parametrize("optim", [
    {"name": "adafactor", "fused_backward": True, "max_grad_norm": 1.0},
    {"name": "adamw", "fused_backward": False},
], ids=["adafactor-fused", "adamw"])
def test_bf16_weights_resume_exactly(tiny_sd, image_folder, tmp_path, optim):
    """bf16 weights (stochastic rounding) and the optimizer's fp32 state: a run resumed from its
    step-2 checkpoint ends with the same weights as the run that went on."""
    sections = dict(method=FULL, optim={"lr": 1e-3, **optim},
                    train={"batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "mixed_precision": "bf16",
                           "weights_dtype": "bf16"})
    straight = Trainer(load_recipe(write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "straight", **sections)))
    straight.fit()
    ckpt = tmp_path / "straight" / "checkpoints" / "checkpoint-0000002"
    assert ckpt.is_dir()
    resumed = Trainer(load_recipe(write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "resumed", **sections),
                                  [f"train.resume={ckpt}"]))
    resumed.fit()
    assert resumed.state.step == 4 and len(resumed.loss_history) == 2
    assert all(p.dtype == torch.bfloat16 for p in resumed.step.params)
    states = [t for s in resumed.step.optimizer.state.values() for t in s.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1]
    assert states and all(t.dtype == torch.float32 for t in states)  # loading kept the fp32 state
    assert _max_diff(straight, resumed) == 0.0
