"""Adapters trained through peft: LoRA (DoRA with method.use_dora), LoHa and LoKr.

They share how they attach (peft's add_adapter on the denoiser and, when asked, the text
encoders; adapter weights in fp32), what a checkpoint holds (peft's adapter state dict) and
how they resume. They differ in their peft config, the recipe keys that shape a run, and the
result file: LoRA/DoRA in the diffusers/peft layout `load_lora_weights` reads, LoHa/LoKr in the
LyCORIS/kohya layout that A1111, ComfyUI and the lycoris package read.
"""

from __future__ import annotations

from pathlib import Path

from sdkit.training.adapters.full import freeze

RESULT_FILE = "pytorch_lora_weights.safetensors"  # sdkit.inference.loading.LORA_FILE


class PeftAdapter:
    kind: str
    title: str
    # Checkpoints hold only the adapters: an SDXL LoRA checkpoint is megabytes, not the 5 GB UNet.
    checkpoints_adapters_only = True
    usage = """```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{run}")
image = pipe("{prompt}").images[0]
```"""

    def __init__(self, method):
        self.method = method

    # -- what each method says
    def peft_config(self, targets):
        raise NotImplementedError

    def variant_shape(self) -> dict:
        """Recipe values of this variant that a resumed run must keep."""
        return {}

    def check_family(self, family) -> None:
        """Raise a UserError when the result cannot be written for this family (before training)."""

    def prepare_trace(self, modules: list) -> None:
        """Make the training-mode modules traceable on fake tensors (`sdkit plan`); most need nothing."""

    # -- shared
    def targets(self, family) -> list[str]:
        return list(self.method.target_modules or family.lora_targets)

    def attach(self, family, dtype=None) -> list:
        import torch

        self.check_family(family)
        freeze(family)
        family.denoiser.add_adapter(self.peft_config(self.targets(family)))
        modules = [family.denoiser]
        if self.method.train_text_encoder:
            for enc in family.text_encoders:
                enc.add_adapter(self.peft_config(family.text_encoder_lora_targets))
                modules.append(enc)
        if self.method.init_from:
            from sdkit.training.adapters.init_from import load_initial_weights

            load_initial_weights(self, family, modules, self.method.init_from)
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
                "method.target_modules": self.targets(family), "method.train_text_encoder": m.train_text_encoder,
                **self.variant_shape()}

    def caption_problem(self, captions: list[str]):
        """What the captions lack for this method (one line), or None."""
        return None

    @property
    def label(self) -> str:  # how `sdkit plan` names the method
        return f"{self.title} rank {self.method.rank}"

    def card_lines(self) -> list[str]:
        return [f"- {self.label}, alpha {self.method.lora_alpha}"]

    def trainable_state(self, module) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(module)

    def load_trainable_state(self, module, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{self.title} checkpoint does not match the model: unexpected keys {unexpected[:3]}")

    def component_attrs(self, family, modules: list) -> list[str]:
        return [family.denoiser_attr, *family.text_encoder_attrs[: len(modules) - 1]]


class LoRA(PeftAdapter):
    kind = "lora"

    @property
    def title(self) -> str:
        return "DoRA" if self.method.use_dora else "LoRA"

    def peft_config(self, targets):
        from peft import LoraConfig

        m = self.method
        return LoraConfig(r=m.rank, lora_alpha=m.lora_alpha, lora_dropout=m.dropout, init_lora_weights="gaussian",
                          use_dora=m.use_dora, target_modules=list(targets))

    def variant_shape(self) -> dict:
        return {"method.use_dora": self.method.use_dora}

    def save(self, family, modules: list, out: Path) -> list[Path]:
        import diffusers

        kwargs = {}
        for attr, module in zip(self.component_attrs(family, modules), modules):
            # peft's own key names, as they are: converting them to the older diffusers names
            # renames only attention projections, and a file mixing both styles loads partly.
            kwargs[f"{attr}_lora_layers"] = self.trainable_state(module)
            kwargs[f"{attr}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        pipe_cls = getattr(diffusers, family.pipeline_class)
        pipe_cls.save_lora_weights(out, safe_serialization=True, **kwargs)
        return [out / RESULT_FILE]


class LycorisAdapter(PeftAdapter):
    """LoHa and LoKr: trained through peft, saved as LyCORIS (kohya key layout) files."""

    network_args: dict = {}
    usage = """```python
# A1111 / ComfyUI: put the file in models/Lora. With the lycoris package:
from lycoris.kohya import create_network_from_weights
network, weights = create_network_from_weights(1.0, "{run}/pytorch_lora_weights.safetensors", None, None, pipe.unet)
network.apply_to(); network.load_state_dict(weights)
# Or: sdkit generate "{prompt}" --model {run}
```"""

    def check_family(self, family) -> None:
        from sdkit.training.adapters.lycoris import kohya_layout

        kohya_layout(family, key="method.type")

    def prepare_trace(self, modules: list) -> None:
        """peft's LoHa/LoKr layers draw their module dropout in training mode with
        `torch.rand(1) > p`, a comparison fake tensors have no value for. Traced in eval mode (only
        these layers: checkpointing and the rest stay in training mode) the adapter branch always
        runs: what training does at dropout 0, and the upper bound above it."""
        from peft.tuners.lycoris_utils import LycorisLayer

        for module in modules:
            for layer in module.modules():
                if isinstance(layer, LycorisLayer):
                    layer.training = False

    def save(self, family, modules: list, out: Path) -> list[Path]:
        from sdkit.training.adapters import lycoris

        path = out / RESULT_FILE
        components = dict(zip(self.component_attrs(family, modules), modules))
        lycoris.save_lycoris(path, family, components, algo=self.kind, rank=self.method.rank,
                             alpha=self.method.lora_alpha, network_args=self.network_args)
        return [path]


class LoHa(LycorisAdapter):
    kind = "loha"
    title = "LoHa"

    def peft_config(self, targets):
        from peft import LoHaConfig

        m = self.method
        return LoHaConfig(r=m.rank, alpha=m.lora_alpha, module_dropout=m.dropout, target_modules=list(targets))


class LoKr(LycorisAdapter):
    kind = "lokr"
    title = "LoKr"

    @property
    def network_args(self) -> dict:
        return {"factor": self.method.lokr_factor, "decompose_both": self.method.decompose_both}

    def peft_config(self, targets):
        from peft import LoKrConfig

        m = self.method
        return LoKrConfig(r=m.rank, alpha=m.lora_alpha, module_dropout=m.dropout, target_modules=list(targets),
                          decompose_factor=m.lokr_factor, decompose_both=m.decompose_both)

    def variant_shape(self) -> dict:
        return {"method.lokr_factor": self.method.lokr_factor, "method.decompose_both": self.method.decompose_both}
