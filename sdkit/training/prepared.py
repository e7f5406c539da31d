"""What accelerate prepares: ONE module that the step calls through.

When only the denoiser trains, that module is the denoiser. When text encoders train too, it
is `TrainedModules`, a container of the denoiser and those text encoders whose forward runs
them all (text encoding, conditioning, the denoiser's prediction). accelerate then prepares one
model: DDP averages every trainable gradient, the text encoders' too (a text encoder called
outside its DDP wrapper never has its gradients all-reduced, and the ranks' copies drift
apart: tests/training/test_prepared.py), and DeepSpeed gets the one model it accepts.

The container holds the family's own module objects (DDP and DeepSpeed wrap around them and
ZeRO-3 partitions them in place), so the family, which reads its components, runs the trained
modules. The parts (denoiser first, as the adapter returned them) are what checkpoints, EMA,
saving and validation work on: `parts(accelerator, prepared)`.
"""

from __future__ import annotations

import torch


def predict(family, denoiser, noisy, timesteps, text: dict, batch: dict, resolution: int, dtype):
    """The denoiser's prediction for `noisy` at `timesteps`, conditioned on `text` and the batch."""
    cond = family.conditioning({k: v.to(dtype) for k, v in text.items()}, batch, resolution)
    return family.predict(denoiser, noisy, timesteps, cond)


class TrainedModules(torch.nn.Module):
    """The denoiser and the text encoders that train, as one module: its forward encodes the
    captions with gradients and predicts with the denoiser."""

    def __init__(self, family, parts: list, resolution: int, dtype):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        # Plain attributes, not submodules: the frozen VAE (and any frozen encoder) stays out
        # of what DDP/DeepSpeed wrap.
        self.family, self.resolution, self.dtype_in = family, resolution, dtype

    def forward(self, noisy, timesteps, batch: dict):
        family = self.family
        # The family encodes with its components: hand it this container's parts, the same module
        # objects under DDP and DeepSpeed, a text encoder's own wrapper where FSDP wrapped one.
        attrs = [a for a in family.text_encoder_attrs if family.components.get(a) is not None][: len(self.parts) - 1]
        held = {a: family.components[a] for a in attrs}
        family.components.update(zip(attrs, self.parts[1:]))
        try:
            text = family.encode_text(batch["caption"])
        finally:
            family.components.update(held)
        return predict(family, self.parts[0], noisy, timesteps, text, batch, self.resolution, self.dtype_in)


def one_module(family, modules: list, resolution: int, dtype):
    """The module to prepare for the trainable `modules` (denoiser first)."""
    return modules[0] if len(modules) == 1 else TrainedModules(family, modules, resolution, dtype)


def parts_of(module) -> list:
    """The trained modules (denoiser first) of an unwrapped prepared module."""
    return list(module.parts) if isinstance(module, TrainedModules) else [module]


def parts(accelerator, prepared) -> list:
    """The trained modules (denoiser first) of what accelerate prepared, unwrapped."""
    return parts_of(accelerator.unwrap_model(prepared))


def split_state(prepared_state: dict, count: int) -> list[dict]:
    """The state dict of the prepared module, one per part (a container's keys are 'parts.I.')."""
    if count == 1:
        return [prepared_state]
    states: list[dict] = [{} for _ in range(count)]
    for key, value in prepared_state.items():
        _, index, rest = key.split(".", 2)  # parts.I.NAME
        states[int(index)][rest] = value
    return states
