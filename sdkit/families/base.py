"""The small interface every model family implements.

The trainer, sampler and exporters talk to a `Family` only; whatever differs between SD 1.x,
SDXL and SD3 (text encoders, extra conditioning, the denoiser's call, the objective) lives
in the family modules as class attributes and a few methods.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch


class Family:
    # --- what a family declares
    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers class that loads and saves the model
    denoiser_attr: ClassVar[str] = "unet"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_attrs: ClassVar[tuple[str, ...]] = ("tokenizer",)
    objective: ClassVar[str] = "ddpm"  # "ddpm" or "flow"
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")

    # the family can hand latents to an img2img refiner (SDXL's ensemble of experts)
    refiner_capable: ClassVar[bool] = False

    def __init__(self, components: dict[str, Any]):
        self.components = components

    # --- loading ------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg, dtype: torch.dtype = torch.float32) -> "Family":
        """Load every component from a hub id or folder (recipe `model` section)."""
        import diffusers

        from sdkit.inference.sampling import dtype_kwarg, quiet_loading

        quiet_loading()
        pipe_cls = getattr(diffusers, cls.pipeline_class)
        kwargs: dict[str, Any] = dict(cls.load_overrides(model_cfg, dtype))
        if model_cfg.vae:
            from diffusers import AutoencoderKL

            kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae, **dtype_kwarg(dtype))
        pipe = pipe_cls.from_pretrained(
            model_cfg.pretrained,
            revision=model_cfg.revision,
            variant=model_cfg.variant,
            **dtype_kwarg(dtype),
            **kwargs,
        )
        return cls(dict(pipe.components))

    @classmethod
    def load_overrides(cls, model_cfg, dtype) -> dict[str, Any]:
        """Extra from_pretrained kwargs a family needs for training (e.g. leave SD3's T5 out)."""
        return cls.pipeline_load_kwargs()

    @classmethod
    def pipeline_load_kwargs(cls) -> dict[str, Any]:
        """Extra from_pretrained kwargs whenever a pipeline of this family is loaded."""
        return {}

    @classmethod
    def is_refiner_only(cls, model_index: dict) -> bool:
        """True for a folder that can only refine (img2img), never start from text."""
        return False

    @classmethod
    def single_file_layout(cls, model_index: dict, read_config) -> Optional[str]:
        """The original (A1111/ComfyUI) checkpoint layout of this model, or None if it has none.
        read_config(component) returns that component's config.json as a dict."""
        return None

    # --- components -----------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_attr]

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        self.components[self.denoiser_attr] = module

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.components[a] for a in self.text_encoder_attrs if self.components.get(a) is not None]

    @property
    def tokenizers(self) -> list:
        return [self.components.get(a) for a in self.tokenizer_attrs]

    @property
    def scheduler_config(self) -> dict:
        return dict(self.components["scheduler"].config)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]

    # --- encoding -------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning per caption (batch first); what the latent cache stores."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean and log-variance, unscaled); cached as is."""
        vae = self.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters

    def sample_latents(self, moments: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Draw latents from cached posterior parameters and bring them to the denoiser's scale."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        latents = mean + std * noise.to(mean.device)
        return self.scale_latents(latents)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    # --- denoising ------------------------------------------------------------
    def conditioning(self, text: dict[str, torch.Tensor], batch: dict, resolution: int) -> dict[str, Any]:
        """Keyword arguments for the denoiser besides latents and timesteps."""
        raise NotImplementedError

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy, timesteps, **cond, return_dict=False)[0]

    # --- pipelines ------------------------------------------------------------
    def pipeline(self, **replace) -> Any:
        """A diffusers pipeline over the current components (replace any of them)."""
        import diffusers

        components = {**self.components, **replace}
        return getattr(diffusers, self.pipeline_class)(**components)
