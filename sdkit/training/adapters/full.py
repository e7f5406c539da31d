"""Full fine-tune: every weight of the denoiser (and of the text encoders when asked) trains."""

from __future__ import annotations

from pathlib import Path


def freeze(family) -> None:
    for module in [family.denoiser, *family.frozen_modules()]:
        module.requires_grad_(False)


class FullFineTune:
    kind = "full"
    title = "Full fine-tune"
    label = "full fine-tune"  # how `sdkit plan` names the method
    # Checkpoints hold every weight.
    checkpoints_adapters_only = False
    usage = """```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{run}")
image = pipe("{prompt}").images[0]
```"""

    def __init__(self, method):
        self.method = method

    def attach(self, family, dtype=None) -> list:
        """Mark what trains, in fp32 master weights (or `dtype`: train.weights_dtype); returns
        the trainable modules (denoiser first)."""
        import torch

        freeze(family)
        self.dtype = dtype or torch.float32
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            modules += family.text_encoders
        for module in modules:  # trainable weights stay fp32 under mixed precision
            module.to(self.dtype)
            module.requires_grad_(True)
        return modules

    def prepare_trace(self, modules: list) -> None:
        """Nothing to prepare for `sdkit plan`'s fake-tensor trace."""

    def compute_dtype(self, weight_dtype):
        """The denoiser's inputs match its trained weights (autocast lowers the matmuls)."""
        import torch

        return getattr(self, "dtype", torch.float32)

    def shape(self, family) -> dict:
        return {"method.type": self.kind, "method.train_text_encoder": self.method.train_text_encoder}

    def caption_problem(self, captions: list[str]):
        """What the captions lack for this method (one line), or None."""
        return None

    def card_lines(self) -> list[str]:
        return []

    def trainable_state(self, module) -> dict:
        return dict(module.state_dict())

    def load_trainable_state(self, module, state: dict) -> None:
        module.load_state_dict(state, strict=True)

    def save(self, family, modules: list, out: Path) -> list[Path]:
        # The run folder itself becomes a diffusers pipeline folder.
        replace = {family.denoiser_attr: modules[0]}
        for attr, enc in zip(family.text_encoder_attrs, modules[1:]):
            replace[attr] = enc
        family.pipeline(**replace).save_pretrained(out, safe_serialization=True)
        return [out / "model_index.json"]
