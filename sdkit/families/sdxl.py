"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings, size/crop micro-conditioning.

The UNet conditions on the penultimate hidden states of both encoders side by side, and,
through `added_cond_kwargs`, on the pooled (projected) embedding of text_encoder_2 plus six
"time ids" per image: its original size (h, w), the top-left of the crop taken from the
resized image (top, left), and the target size. Training passes each image's real values so
the model learns what a crop looks like, and sampling asks for an uncropped full-size image.
"""

from __future__ import annotations

import contextlib

from sdkit.errors import UserError
from sdkit.families.base import Family
from sdkit.families.sd import clip_token_ids, cross_attention_width

TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


def time_ids(original_size, crop_top_left, target_size):
    """[B, 6] float: (orig h, orig w, crop top, crop left, target h, target w) per image.
    target_size: [B, 2] (each image's bucket), or one int for a square target."""
    import torch

    if isinstance(target_size, int):
        target_size = torch.tensor([target_size, target_size], dtype=torch.long).expand(original_size.shape[0], 2)
    return torch.cat([original_size.long(), crop_top_left.long(), target_size.long().to(original_size.device)],
                     dim=1).float()


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    all_text_encoder_attrs = text_encoder_attrs
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    refiner_capable = True
    bucket_step = 64  # what SDXL users expect of buckets (kohya, SimpleTuner)
    embedding_keys = ("clip_l", "clip_g")  # A1111/ComfyUI embedding files

    @classmethod
    def upcasts_vae(cls, precision, vae_config):
        # The stock SDXL VAE overflows in fp16 (NaN latents): it encodes and decodes in fp32. A VAE
        # fixed for fp16 (madebyollin/sdxl-vae-fp16-fix) says force_upcast: false.
        return precision == "fp16" and bool(vae_config) and vae_config.get("force_upcast", True)

    @classmethod
    def is_refiner_only(cls, model_index):
        # The refiner is an img2img model with only text_encoder_2 and aesthetic-score time ids.
        return (model_index.get("text_encoder") or [None])[0] is None

    @classmethod
    def single_file_layout(cls, model_index, read_config):
        return "sdxl_refiner" if cls.is_refiner_only(model_index) else "sdxl"

    @classmethod
    def load(cls, model_cfg, dtype=None) -> "StableDiffusionXL":
        from sdkit.inference.loading import read_model_index
        from sdkit.single_file import config_source

        # sdkit uses the refiner for sampling (model.refiner), it does not train it.
        source = config_source(model_cfg)  # None: a single file whose configs diffusers infers
        if source and cls.is_refiner_only(read_model_index(source, model_cfg.revision)):
            raise UserError(
                f"model.pretrained: '{model_cfg.pretrained}' is an SDXL refiner (no text_encoder); "
                "train the SDXL base model and pass the refiner as model.refiner for sample images"
            )
        return super().load(model_cfg, dtype)

    # --- encoding -------------------------------------------------------------
    def encode_text(self, captions):
        import torch

        hidden, pooled = [], None
        for tokenizer_attr, encoder_attr in zip(self.tokenizer_attrs, self.text_encoder_attrs):
            encoder = self.components[encoder_attr]
            ids = clip_token_ids(self.components[tokenizer_attr], captions).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = getattr(out, "text_embeds", None)  # only text_encoder_2 has a projection
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def encode_images(self, pixels):
        with self.fp32_vae(self.vae):  # encode as the pipeline decodes
            return super().encode_images(pixels)

    @classmethod
    @contextlib.contextmanager
    def fp32_vae(cls, vae):
        """The VAE in fp32 for the block when it is fp16 and upcasts (see upcasts_vae), as the pipeline does."""
        import torch

        if not (vae.dtype == torch.float16 and cls.upcasts_vae("fp16", dict(vae.config))):
            yield
            return
        vae.to(torch.float32)
        try:
            yield
        finally:
            vae.to(torch.float16)

    # --- split serving --------------------------------------------------------------
    prompt_embedding_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                              "negative_pooled_prompt_embeds")

    @classmethod
    def unscaled_latents(cls, vae, latents):
        import torch

        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents / config.scaling_factor
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean

    @classmethod
    def decode_latents(cls, pipe, latents):
        with cls.fp32_vae(pipe.vae):  # the base decodes in the VAE's dtype
            return super().decode_latents(pipe, latents)

    # --- denoising ------------------------------------------------------------
    def conditioning(self, text, batch, resolution):
        pooled = text["pooled_prompt_embeds"]
        ids = time_ids(batch["original_size"], batch["crop_top_left"], batch.get("target_size", resolution))
        return {
            "encoder_hidden_states": text["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)},
        }

    @classmethod
    def example_text(cls, batch, denoiser_config, dtype):
        import torch

        pooled = denoiser_config["projection_class_embeddings_input_dim"] - TIME_IDS * denoiser_config["addition_time_embed_dim"]
        return {
            "prompt_embeds": torch.zeros(batch, cls.text_tokens, cross_attention_width(denoiser_config), dtype=dtype),
            "pooled_prompt_embeds": torch.zeros(batch, pooled, dtype=dtype),
        }
