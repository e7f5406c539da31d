"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, DDPM noise.

SD 2.x v-prediction needs no branch: the objective reads `prediction_type` from the
scheduler config the model ships.
"""

from __future__ import annotations

from sdkit.families.base import Family


def expand_multi_vector(tokenizer, caption: str) -> str:
    """A textual-inversion token with several vectors (added tokens `tok`, `tok_1`, ...) becomes
    `tok tok_1 ...`, as diffusers' pipelines expand prompts (training then sees what sampling sees)."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin._maybe_convert_prompt(None, caption, tokenizer)


def clip_token_ids(tokenizer, captions: list[str]):
    if any(token.endswith("_1") for token in getattr(tokenizer, "added_tokens_encoder", ())):
        captions = [expand_multi_vector(tokenizer, c) for c in captions]
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    @classmethod
    def pipeline_load_kwargs(cls):
        # sdkit never runs the NSFW checker; leaving it out saves ~1.2 GB.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @classmethod
    def single_file_layout(cls, model_index, read_config):
        # OpenAI CLIP (SD 1.x) uses quick_gelu; OpenCLIP ViT-H (SD 2.x) uses gelu.
        act = read_config("text_encoder").get("hidden_act", "quick_gelu")
        return "sd1" if act == "quick_gelu" else "sd2"

    def pipeline(self, **replace):
        # The checker is left out on purpose (see load_overrides); say so to diffusers.
        return super().pipeline(requires_safety_checker=False, **replace)

    def encode_text(self, captions):
        encoder = self.components["text_encoder"]
        ids = clip_token_ids(self.components["tokenizer"], captions).to(encoder.device)
        return {"prompt_embeds": encoder(ids, return_dict=False)[0]}

    def conditioning(self, text, batch, resolution):
        return {"encoder_hidden_states": text["prompt_embeds"]}

    @classmethod
    def example_text(cls, batch, denoiser_config, dtype):
        import torch

        width = cross_attention_width(denoiser_config)
        return {"prompt_embeds": torch.zeros(batch, cls.text_tokens, width, dtype=dtype)}


def cross_attention_width(denoiser_config: dict) -> int:
    width = denoiser_config["cross_attention_dim"]
    return width[0] if isinstance(width, (list, tuple)) else width
