"""Diffusers weights -> one original-layout (CompVis / SGM) checkpoint, as A1111 and ComfyUI load it.

The original layout names UNet layers by position (`input_blocks.N.M`), so the mapping is
computed from the UNet config (block types, layers per block) rather than hardcoded for
SD 1.5: the same code serves SD 1.x, 2.x and SDXL, and any tiny test model with their shape.

Layouts written:
- SD 1.x: UNet `model.diffusion_model.*`, VAE `first_stage_model.*`, CLIP ViT-L
  `cond_stage_model.transformer.text_model.*` (transformers 5 saves CLIP without the
  `text_model.` prefix; the loaders need it, so it is put back).
- SD 2.x: text encoder in OpenCLIP layout `cond_stage_model.model.*` (fused in_proj q/k/v).
- SDXL: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
  `conditioner.embedders.1.model.*` (OpenCLIP bigG, with `text_projection`); an SDXL
  refiner has only the OpenCLIP encoder, as `conditioner.embedders.0.model.*`.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


class UnmappedKeyError(ValueError):
    """A weight the original layout has no place for (a model sdkit cannot convert)."""


def _rename_first(rest: str, names: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if head not in names:
        raise UnmappedKeyError(rest)
    return names[head] + ("." + tail if tail else "")


# ----------------------------------------------------------------------------- UNet


class UNetLayout:
    """Where each diffusers UNet block sits in the original `input_blocks`/`output_blocks` lists."""

    def __init__(self, config: Mapping):
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        layers = config["layers_per_block"]
        layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
        self.down_layers = layers
        self.up_layers = list(reversed(layers))
        self.up_has_attention = ["CrossAttn" in t for t in up_types]
        # input_blocks[0] is conv_in; each down level has its resnets, then its downsampler.
        self.down_start, index = [], 1
        for n in self.down_layers:
            self.down_start.append(index)
            index += n + 1
        # Each up level has n+1 resnets; the upsampler sits inside the level's last output block.
        self.up_start, index = [], 0
        for n in self.up_layers:
            self.up_start.append(index)
            index += n + 1

    def original_name(self, name: str) -> str:
        """Diffusers parameter or module name -> original name (without `model.diffusion_model.`)."""
        if m := re.fullmatch(r"(?:time_embedding)\.linear_([12])(.*)", name):
            return f"time_embed.{0 if m[1] == '1' else 2}{m[2]}"
        if m := re.fullmatch(r"(?:add_embedding|class_embedding)\.linear_([12])(.*)", name):
            return f"label_emb.0.{0 if m[1] == '1' else 2}{m[2]}"
        if m := re.fullmatch(r"conv_in(\..*)?", name):
            return f"input_blocks.0.0{m[1] or ''}"
        if m := re.fullmatch(r"conv_norm_out(\..*)?", name):
            return f"out.0{m[1] or ''}"
        if m := re.fullmatch(r"conv_out(\..*)?", name):
            return f"out.2{m[1] or ''}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            i, j = int(m[1]), int(m[2])
            return f"input_blocks.{self.down_start[i] + j}.0.{_rename_first(m[3], _RESNET_NAMES)}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
            i, j = int(m[1]), int(m[2])
            return f"input_blocks.{self.down_start[i] + j}.1.{m[3]}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..*)?", name):
            i = int(m[1])
            return f"input_blocks.{self.down_start[i] + self.down_layers[i]}.0.op{m[2] or ''}"
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", name):
            return f"middle_block.{0 if m[1] == '0' else 2}.{_rename_first(m[2], _RESNET_NAMES)}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            i, j = int(m[1]), int(m[2])
            return f"output_blocks.{self.up_start[i] + j}.0.{_rename_first(m[3], _RESNET_NAMES)}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
            i, j = int(m[1]), int(m[2])
            return f"output_blocks.{self.up_start[i] + j}.1.{m[3]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..*)?", name):
            i = int(m[1])
            slot = 2 if self.up_has_attention[i] else 1
            return f"output_blocks.{self.up_start[i] + self.up_layers[i]}.{slot}.conv{m[2] or ''}"
        raise UnmappedKeyError(name)


def unet_to_original(state_dict: Mapping, config: Mapping, prefix: str = UNET_PREFIX) -> dict:
    layout = UNetLayout(config)
    return {prefix + layout.original_name(k): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- VAE

_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_name(name: str, n_levels: int) -> str:
    fixed = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(.+)", name):
        return name
    coder, _, rest = name.partition(".")
    if coder not in ("encoder", "decoder"):
        raise UnmappedKeyError(name)
    if m := re.fullmatch(r"(conv_norm_out|conv_in|conv_out)\.(.+)", rest):
        return f"{coder}.{fixed[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{coder}.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{coder}.down.{m[1]}.downsample.conv.{m[2]}"
    # The original decoder counts its levels from the lowest resolution up: reversed.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{coder}.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{coder}.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
        return f"{coder}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(to_out\.0|[a-z_]+)\.(.+)", rest):
        return f"{coder}.mid.attn_1.{_VAE_ATTENTION_NAMES[m[1].split('.')[0]]}.{m[2]}"
    raise UnmappedKeyError(name)


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_original(state_dict: Mapping, config: Mapping, prefix: str = VAE_PREFIX) -> dict:
    n_levels = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        name = _vae_name(key, n_levels)
        # The original VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + name] = value
    return out


# ----------------------------------------------------------------------------- text encoders


def _without_text_model(state_dict: Mapping) -> dict:
    """transformers 5 saves CLIPTextModel without `text_model.`, WithProjection with it: one form."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def clip_to_original(state_dict: Mapping, prefix: str) -> dict:
    """Hugging Face CLIP text encoder as the original checkpoints hold it (same names under a prefix)."""
    return {
        prefix + k: v for k, v in _without_text_model(state_dict).items()
        if k != "text_projection.weight" and not k.endswith("position_ids")
    }


_OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_to_openclip(state_dict: Mapping, prefix: str) -> dict:
    """Hugging Face CLIP text encoder -> OpenCLIP layout (SD 2.x, SDXL's second encoder)."""
    sd = _without_text_model(state_dict)
    out: dict = {}
    qkv: dict[tuple[str, str], dict[str, object]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".", 1)[1]] = value
        elif key == "text_projection.weight":
            # OpenCLIP multiplies x @ text_projection; a Linear computes x @ weight.T.
            out[prefix + "text_projection"] = value.t().contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _OPENCLIP_LAYER_NAMES:
                raise UnmappedKeyError(key)
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER_NAMES[m[2]]}.{m[3]}"] = value
        else:
            raise UnmappedKeyError(key)
    import torch

    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UnmappedKeyError(f"encoder.layers.{layer}.self_attn: q/k/v {kind} incomplete")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


# ----------------------------------------------------------------------------- whole pipelines


# layout -> (component, writer, prefix) for each text encoder of the checkpoint
TEXT_ENCODERS: dict[str, list[tuple[str, Callable[[Mapping, str], dict], str]]] = {
    "sd1": [("text_encoder", clip_to_original, SD1_TEXT_PREFIX)],
    "sd2": [("text_encoder", clip_to_openclip, SD2_TEXT_PREFIX)],
    "sdxl": [
        ("text_encoder", clip_to_original, SDXL_TEXT_PREFIXES[0]),
        ("text_encoder_2", clip_to_openclip, SDXL_TEXT_PREFIXES[1]),
    ],
    "sdxl_refiner": [("text_encoder_2", clip_to_openclip, SDXL_REFINER_TEXT_PREFIX)],
}
# The layouts sdkit writes; a family names its own (Family.single_file_layout). Their modelspec
# architecture ids are in sdkit.export.safetensors, their kohya LoRA names in sdkit.export.kohya.
LAYOUTS = tuple(TEXT_ENCODERS)


def original_state_dict(components: Mapping, layout: str) -> dict:
    """All weights of a pipeline (its `components`) under the original keys of `layout`
    (one of LAYOUTS: what the model's family says, Family.single_file_layout)."""
    unet, vae = components["unet"], components["vae"]
    out = unet_to_original(unet.state_dict(), unet.config)
    out.update(vae_to_original(vae.state_dict(), vae.config))
    for name, writer, prefix in TEXT_ENCODERS[layout]:
        out.update(writer(components[name].state_dict(), prefix))
    return out
