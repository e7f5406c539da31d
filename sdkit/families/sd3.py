"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching, three text encoders.

Text conditioning, as the SD3 pipeline builds it:
  - prompt_embeds: the penultimate hidden states of CLIP-L and CLIP-G side by side, zero-padded
    to T5's width, followed (along the sequence) by T5's last hidden states;
  - pooled_prompt_embeds: the projected (pooled) embeddings of both CLIPs side by side.
With `model.load_t5: false` T5 is never loaded and its part of the sequence is zeros, which is
what the pipeline itself feeds the transformer when text_encoder_3 is absent.
"""

from __future__ import annotations

from sdkit.families.base import CLIP_TOKENS, Family
from sdkit.families.sd import clip_token_ids


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    # The CLIPs are what train_text_encoder trains (and what SD3 LoRA files can hold); T5 stays frozen.
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    all_text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    objective = "flow"
    latent_channels = 16
    size_multiple = 16  # VAE factor 8 x the transformer's 2x2 patches
    bucket_step = 16
    extra_recipe_keys = ("model.load_t5",)
    embedding_keys = ("clip_l", "clip_g")  # A1111/ComfyUI embedding files
    # Textual inversion trains the two CLIPs' embeddings; T5 reads the placeholder as ordinary text.
    # StableDiffusion3Pipeline has no maybe_convert_prompt: one vector per token only.
    expands_multi_vector_prompts = False
    # Joint attention: image stream (to_*) and text stream (add_*/to_add_out) projections.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    # T5 tokens per caption in training (diffusers' SD3 training scripts use 77 too; the
    # transformer's joint attention takes any text length, the pipeline defaults to 256).
    t5_max_length = 77
    text_tokens = CLIP_TOKENS + t5_max_length  # CLIP-L/G side by side, then T5 (or zeros)

    @classmethod
    def optional_components(cls):
        return {"text_encoder_3": "model.load_t5=false"}  # T5-XXL: ~9.5 GB in fp16

    @classmethod
    def load_overrides(cls, model_cfg, dtype):
        if model_cfg.load_t5:
            return {}
        return {"text_encoder_3": None, "tokenizer_3": None}  # saves ~9.5 GB in fp16 on SD3

    prompt_embedding_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                              "negative_pooled_prompt_embeds")

    @classmethod
    def encode_prompt_kwargs(cls):
        return {"prompt_2": None, "prompt_3": None}  # required by SD3's encode_prompt; None: the same prompt

    @property
    def t5(self):
        return self.components.get("text_encoder_3")

    def frozen_modules(self):
        return [*super().frozen_modules(), *([self.t5] if self.t5 is not None else [])]

    # --- encoding -------------------------------------------------------------
    def encode_text(self, captions):
        import torch
        import torch.nn.functional as F

        clip_hidden, pooled = [], []
        for tokenizer_attr, encoder_attr in zip(self.tokenizer_attrs, self.text_encoder_attrs):
            encoder = self.components[encoder_attr]
            ids = clip_token_ids(self.components[tokenizer_attr], captions).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(clip_hidden, dim=-1)
        t5 = self._t5_embeds(captions, like=clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_embeds(self, captions, like):
        if self.t5 is None:
            width = self.denoiser.config.joint_attention_dim
            return like.new_zeros((len(captions), self.t5_max_length, width))
        ids = self.components["tokenizer_3"](
            captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        return self.t5(ids.to(self.t5.device))[0]

    # --- denoising ------------------------------------------------------------
    def conditioning(self, text, batch, resolution):
        return {"encoder_hidden_states": text["prompt_embeds"], "pooled_projections": text["pooled_prompt_embeds"]}

    def predict(self, denoiser, noisy, timesteps, cond):
        # The flow objective's timesteps are sigma * 1000, the scale the SD3 scheduler feeds in.
        return denoiser(hidden_states=noisy, timestep=timesteps, **cond, return_dict=False)[0]

    @classmethod
    def example_text(cls, batch, denoiser_config, dtype):
        import torch

        return {
            "prompt_embeds": torch.zeros(batch, cls.text_tokens, denoiser_config["joint_attention_dim"], dtype=dtype),
            "pooled_prompt_embeds": torch.zeros(batch, denoiser_config["pooled_projection_dim"], dtype=dtype),
        }
