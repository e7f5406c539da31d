"""The small interface every model family implements.

The trainer, sampler, planner and exporters talk to a `Family` only; whatever differs between
SD 1.x, SDXL and SD3 (text encoders, extra conditioning, the denoiser's call, the objective)
lives in the family modules as class attributes and a few methods.

The class attributes are the family's description and need no torch: importing a family
module imports no torch, so recipe validation and `sdkit plan` can ask a family anything.
torch is imported inside the methods that load or run models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

if TYPE_CHECKING:
    import torch

# Recipe keys that only one objective reads; a family of the other objective rejects them
# when set to anything but their default (a recipe written out by a run lists every key).
OBJECTIVE_KEYS = {
    "ddpm": ("train.prediction_type", "train.snr_gamma", "train.noise_offset"),
    "flow": ("train.timestep_sampling", "train.logit_mean", "train.logit_std", "train.mode_scale",
             "train.loss_weighting"),
}
CLIP_TOKENS = 77  # tokens per caption of every CLIP text encoder the families use


class Family:
    # --- what a family declares (torch-free)
    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers class that loads and saves the model
    denoiser_attr: ClassVar[str] = "unet"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)  # what train_text_encoder trains
    # every text encoder the pipeline may hold (SD3 adds T5, which never trains)
    all_text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_attrs: ClassVar[tuple[str, ...]] = ("tokenizer",)
    objective: ClassVar[str] = "ddpm"  # "ddpm" or "flow"
    latent_channels: ClassVar[int] = 4
    size_multiple: ClassVar[int] = 8  # image sides must be multiples of this (VAE factor x denoiser patch)
    bucket_step: ClassVar[int] = 8  # default step of aspect-ratio bucket sides (a multiple of size_multiple)
    text_tokens: ClassVar[int] = CLIP_TOKENS  # length of the denoiser's text input in training
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    extra_recipe_keys: ClassVar[tuple[str, ...]] = ()  # recipe keys only this family reads
    # Keys of an A1111/ComfyUI embedding file, one per CLIP text encoder (text_encoder_attrs order).
    embedding_keys: ClassVar[tuple[str, ...]] = ("emb_params",)
    # The diffusers pipeline expands a multi-vector embedding's token in prompts (maybe_convert_prompt).
    expands_multi_vector_prompts: ClassVar[bool] = True

    # the family can hand latents to an img2img refiner (SDXL's ensemble of experts)
    refiner_capable: ClassVar[bool] = False

    def __init__(self, components: dict[str, Any]):
        self.components = components

    # --- recipe checks (torch-free) -----------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> list[str]:
        """What in `recipe` does not fit this family, one 'key: problem' line each."""
        problems = []
        res = recipe.data.resolution
        if res % cls.size_multiple:
            problems.append(f"data.resolution: {cls.name} models need a multiple of {cls.size_multiple}, got {res}")
        for objective, keys in OBJECTIVE_KEYS.items():
            if objective == cls.objective:
                continue
            for key in keys:
                if recipe.differs_from_default(key):
                    problems.append(f"{key}: {cls.name} models train by {cls.objective}; this key is for "
                                    f"{objective} models (got {recipe.get(key)!r})")
        family_keys = {k for other in _other_families(cls) for k in other.extra_recipe_keys} - set(cls.extra_recipe_keys)
        for key in sorted(family_keys):
            if recipe.differs_from_default(key):
                problems.append(f"{key}: does not apply to {cls.name} models (got {recipe.get(key)!r})")
        if recipe.data.buckets:
            step = recipe.bucket_step(cls.bucket_step)
            if step % cls.size_multiple:
                problems.append(f"data.bucket_step: {cls.name} models need a multiple of {cls.size_multiple}, got {step}")
            elif step > res:
                problems.append(f"data.bucket_step: {step} is larger than data.resolution {res}; "
                                f"set data.bucket_step to a divisor of it")
        if recipe.method.num_vectors > 1 and not cls.expands_multi_vector_prompts:
            problems.append(f"method.num_vectors: {cls.name} pipelines do not expand a multi-vector token in "
                            f"prompts; use num_vectors=1 (got {recipe.method.num_vectors})")
        if recipe.model.refiner and not cls.refiner_capable:
            problems.append(f"model.refiner: {cls.name} models take no refiner")
        return problems

    @classmethod
    def upcasts_vae(cls, precision: str, vae_config: Optional[dict]) -> bool:
        """True when this family's VAE runs in fp32 while the rest runs in `precision`."""
        return False

    @classmethod
    def optional_components(cls) -> dict[str, str]:
        """Frozen components a recipe can leave out, with the override that does it."""
        return {}

    # --- loading ------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg, dtype: Optional["torch.dtype"] = None) -> "Family":
        """Load every component from a hub id, folder or single file (recipe `model` section)."""
        import diffusers
        import torch

        dtype = dtype or torch.float32

        from sdkit.inference.sampling import dtype_kwarg, quiet_loading

        quiet_loading()
        pipe_cls = getattr(diffusers, cls.pipeline_class)
        kwargs: dict[str, Any] = dict(cls.load_overrides(model_cfg, dtype))
        if model_cfg.vae:
            from diffusers import AutoencoderKL

            kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae, **dtype_kwarg(dtype))
        pipe = cls._load_pipeline(pipe_cls, model_cfg, {**dtype_kwarg(dtype), **kwargs})
        return cls(dict(pipe.components))

    @classmethod
    def _load_pipeline(cls, pipe_cls, model_cfg, kwargs: dict):
        import os

        from sdkit.single_file import is_single_file

        if not is_single_file(model_cfg.pretrained):
            return pipe_cls.from_pretrained(model_cfg.pretrained, revision=model_cfg.revision,
                                            variant=model_cfg.variant, **kwargs)
        # One .safetensors file in the original layout: diffusers converts each component; the
        # configs and tokenizers come from model.config (or, online, the repo it infers).
        config = model_cfg.config and os.path.expanduser(model_cfg.config)
        local = bool(config) and os.path.isdir(config)
        return pipe_cls.from_single_file(os.path.expanduser(model_cfg.pretrained), config=config,
                                         local_files_only=local, **kwargs)

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
    def denoiser(self) -> "torch.nn.Module":
        return self.components[self.denoiser_attr]

    @denoiser.setter
    def denoiser(self, module: "torch.nn.Module") -> None:
        self.components[self.denoiser_attr] = module

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def text_encoders(self) -> list["torch.nn.Module"]:
        return [self.components[a] for a in self.text_encoder_attrs if self.components.get(a) is not None]

    @property
    def tokenizers(self) -> list:
        return [self.components.get(a) for a in self.tokenizer_attrs]

    @property
    def scheduler_config(self) -> dict:
        return dict(self.components["scheduler"].config)

    def frozen_modules(self) -> list["torch.nn.Module"]:
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
        import torch

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

    # --- split serving (sdkit serve --split): the pipeline's own encode_prompt, output_type="latent", decode --
    # encode_prompt's outputs in its order; they are also the pipeline call's keywords that take them back
    prompt_embedding_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_prompt_embeds")

    @classmethod
    def encode_prompt_kwargs(cls) -> dict[str, Any]:
        """Arguments this family's `encode_prompt` needs besides prompt and negative prompt."""
        return {}

    @classmethod
    def encode_prompt(cls, pipe, prompts: list, negative_prompts: Optional[list]) -> dict[str, "torch.Tensor"]:
        """Text embeddings as the pipeline computes them, negatives always (the guidance is the denoiser's)."""
        outputs = pipe.encode_prompt(
            prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompts, **cls.encode_prompt_kwargs(),
        )
        return dict(zip(cls.prompt_embedding_names, outputs))

    @classmethod
    def unscaled_latents(cls, vae, latents: "torch.Tensor") -> "torch.Tensor":
        """The denoiser's latents back at the VAE's scale (the inverse of scale_latents)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    @classmethod
    def decode_latents(cls, pipe, latents: "torch.Tensor") -> list:
        """PIL images from `output_type="latent"` latents, as the pipeline's own call decodes them."""
        vae = pipe.vae
        image = vae.decode(cls.unscaled_latents(vae, latents.to(vae.device, vae.dtype)), return_dict=False)[0]
        return cls.postprocess(pipe, image)

    @staticmethod
    def postprocess(pipe, image) -> list:
        if getattr(pipe, "watermark", None) is not None:  # SDXL with invisible-watermark installed
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")

    # --- example inputs (sdkit plan traces the real step on these) -----------------
    @classmethod
    def example_text(cls, batch: int, denoiser_config: dict, dtype) -> dict[str, "torch.Tensor"]:
        """Zeros shaped like `encode_text`'s output for a denoiser of this config."""
        raise NotImplementedError

    @classmethod
    def example_extras(cls, batch: int, resolution) -> dict[str, "torch.Tensor"]:
        """Per-image values besides pixels and captions that `conditioning` reads from a batch:
        original (h, w), crop (top, left) and the bucket's (h, w) as the target size.
        `resolution`: a square's side, or a bucket's (width, height)."""
        import torch

        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        sizes = torch.tensor([[height, width]], dtype=torch.long).repeat(batch, 1)
        return {"original_size": sizes, "crop_top_left": torch.zeros(batch, 2, dtype=torch.long),
                "target_size": sizes.clone()}

    # --- pipelines ------------------------------------------------------------
    def pipeline(self, **replace) -> Any:
        """A diffusers pipeline over the current components (replace any of them)."""
        import diffusers

        components = {**self.components, **replace}
        return getattr(diffusers, self.pipeline_class)(**components)


def _other_families(cls) -> list:
    from sdkit.families import family_class, family_names

    return [family_class(n) for n in family_names() if n != cls.name]
