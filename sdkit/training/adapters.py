"""What trains: the whole denoiser (full fine-tune) or LoRA adapters (peft).

An adapter answers every method question, so the trainer, `sdkit plan` and `sdkit bench` ask it
and never the method's name: which parameters train and in which dtype, the dtype of the
denoiser's inputs, what a checkpoint holds, how the result is saved, and which recipe values
a resumed run must share (its part of the run's shape).
"""

from __future__ import annotations

from pathlib import Path


def _lora_config(method, targets):
    from peft import LoraConfig

    return LoraConfig(
        r=method.rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def _freeze(family) -> None:
    for module in [family.denoiser, *family.frozen_modules()]:
        module.requires_grad_(False)


class FullFineTune:
    kind = "full"
    # Checkpoints hold every weight (accelerate's default model saving).
    checkpoints_adapters_only = False

    def __init__(self, method):
        self.method = method

    def attach(self, family, dtype=None) -> list:
        """Mark what trains, in fp32 master weights (or `dtype`: train.weights_dtype); returns
        the trainable modules (denoiser first)."""
        import torch

        _freeze(family)
        self.dtype = dtype or torch.float32
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            modules += family.text_encoders
        for module in modules:  # trainable weights stay fp32 under mixed precision
            module.to(self.dtype)
            module.requires_grad_(True)
        return modules

    def compute_dtype(self, weight_dtype):
        """The denoiser's inputs match its trained weights (autocast lowers the matmuls)."""
        import torch

        return getattr(self, "dtype", torch.float32)

    def shape(self, family) -> dict:
        return {"method.type": self.kind, "method.train_text_encoder": self.method.train_text_encoder}

    def trainable_state(self, module) -> dict:
        return dict(module.state_dict())

    def save(self, family, modules: list, out: Path) -> list[Path]:
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

    def targets(self, family) -> list[str]:
        return list(self.method.target_modules or family.lora_targets)

    def attach(self, family, dtype=None) -> list:
        import torch

        _freeze(family)
        family.denoiser.add_adapter(_lora_config(self.method, self.targets(family)))
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            for enc in family.text_encoders:
                enc.add_adapter(_lora_config(self.method, family.text_encoder_lora_targets))
                modules.append(enc)
        for module in modules:  # adapters train in fp32 (or `dtype`) even when the base is fp16/bf16
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.to(dtype or torch.float32)
        return modules

    def compute_dtype(self, weight_dtype):
        """The frozen base runs in the weight dtype; its inputs match it."""
        return weight_dtype

    def shape(self, family) -> dict:
        m = self.method
        return {"method.type": self.kind, "method.rank": m.rank, "method.alpha": m.lora_alpha,
                "method.target_modules": self.targets(family), "method.train_text_encoder": m.train_text_encoder}

    def trainable_state(self, module) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(module)

    def load_trainable_state(self, module, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA checkpoint does not match the model: unexpected keys {unexpected[:3]}")

    def save(self, family, modules: list, out: Path) -> list[Path]:
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


ADAPTERS = {"full": FullFineTune, "lora": LoRA}


def make_adapter(method):
    return ADAPTERS[method.type](method)
