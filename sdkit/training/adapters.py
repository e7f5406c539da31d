"""What trains: the whole denoiser (full fine-tune) or LoRA adapters (peft).

An adapter decides which parameters get gradients, how the result is saved, and what
a checkpoint must hold to resume. The training loop does not know which one it has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdkit.families.base import Family


def _lora_config(method, targets):
    from peft import LoraConfig

    return LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha or method.rank,
        lora_dropout=method.dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


class FullFineTune:
    kind = "full"
    # Checkpoints hold every weight (accelerate's default model saving).
    checkpoints_adapters_only = False

    def __init__(self, method):
        self.method = method

    def attach(self, family: Family) -> list[torch.nn.Module]:
        """Mark what trains; returns the trainable modules (denoiser first)."""
        family.denoiser.requires_grad_(True)
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            for enc in family.text_encoders:
                enc.requires_grad_(True)
                modules.append(enc)
        return modules

    def trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items()}

    def save(self, family: Family, modules: list[torch.nn.Module], out: Path) -> list[Path]:
        # The run folder itself becomes a diffusers pipeline folder.
        replace = {family.denoiser_attr: modules[0]}
        for attr, enc in zip(family.text_encoder_attrs, modules[1:]):
            replace[attr] = enc
        family.pipeline(**replace).save_pretrained(out, safe_serialization=True)
        return [out / "model_index.json"]


class LoRA:
    kind = "lora"
    # Checkpoints hold only the adapters: an SDXL LoRA checkpoint is megabytes, not the 5 GB UNet.
    checkpoints_adapters_only = True

    def __init__(self, method):
        self.method = method

    def attach(self, family: Family) -> list[torch.nn.Module]:
        targets = self.method.target_modules or family.lora_targets
        family.denoiser.add_adapter(_lora_config(self.method, targets))
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            for enc in family.text_encoders:
                enc.add_adapter(_lora_config(self.method, family.text_encoder_lora_targets))
                modules.append(enc)
        for module in modules:  # adapters train in fp32 even when the base is fp16/bf16
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        return modules

    def trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(module)

    def load_trainable_state(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA checkpoint does not match the model: unexpected keys {unexpected[:3]}")

    def save(self, family: Family, modules: list[torch.nn.Module], out: Path) -> list[Path]:
        import diffusers

        kwargs = {}
        attrs = [family.denoiser_attr, *family.text_encoder_attrs[: len(modules) - 1]]
        for attr, module in zip(attrs, modules):
            # peft's own key names, as they are: converting them to the older diffusers names
            # renames only attention projections, and a file mixing both styles loads partly.
            kwargs[f"{attr}_lora_layers"] = self.trainable_state(module)
            kwargs[f"{attr}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        pipe_cls = getattr(diffusers, family.pipeline_class)
        pipe_cls.save_lora_weights(out, safe_serialization=True, **kwargs)
        return [out / "pytorch_lora_weights.safetensors"]


def make_adapter(method):
    return {"full": FullFineTune, "lora": LoRA}[method.type](method)
