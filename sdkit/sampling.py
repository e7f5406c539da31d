"""Making images with a diffusers pipeline: shared by generate, validation and eval."""

from __future__ import annotations

from typing import Optional

import torch


def make_images(
    pipe,
    prompt: str,
    *,
    negative_prompt: Optional[str] = None,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    num_images: int = 1,
    width: Optional[int] = None,
    height: Optional[int] = None,
    refiner=None,
    refiner_fraction: float = 0.8,
    **extra,
) -> list:
    """PIL images; image k uses seed + k, so any single image can be reproduced alone."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for k in range(num_images):
        generator = torch.Generator("cpu").manual_seed(seed + k)
        kwargs = dict(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
            guidance_scale=guidance, generator=generator, width=width, height=height, **extra,
        )
        if refiner is None:
            images.append(pipe(**kwargs).images[0])
            continue
        # Ensemble of experts: the base denoises the first part, the refiner finishes.
        latents = pipe(**kwargs, denoising_end=refiner_fraction, output_type="latent").images
        refiner.set_progress_bar_config(disable=True)
        images.append(
            refiner(
                prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance, generator=generator, denoising_start=refiner_fraction, image=latents,
            ).images[0]
        )
    return images
