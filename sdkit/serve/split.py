"""A pipeline split into its three parts, each answering a v2 body with a v2 body (`sdkit serve --split`):

- NAME-text-encoder: input `prompt` (BYTES [n]), optional `negative_prompt` -> the family's embedding tensors
  (prompt_embeds, negative_prompt_embeds; SDXL/SD3 add pooled_prompt_embeds, negative_pooled_prompt_embeds);
- NAME-denoiser: those tensors + parameters steps, guidance, seed, width, height, num_images -> `latents`
  ([n x num_images, C, H/8, W/8]) and `seeds`;
- NAME-decoder: `latents` (+ optional `seeds`, echoed) and parameter image_format -> `images`, as the whole model
  answers them.

Each part runs the diffusers pipeline's own code (the family's `encode_prompt`, the pipeline call with
`prompt_embeds=...` and `output_type="latent"`, the family's `decode_latents`), so a chain of the three gives the
whole pipeline's images for the same seed. Requests go through the whole model's parser and caps
(sdkit.export.handler_requests); tensors through sdkit.serve.tensors. The same object serves the parts in
`sdkit serve` and runs them in-process for a client that keeps some parts local.
"""

from __future__ import annotations

import time

from sdkit.export.handler_answers import images_output, seeds_output
from sdkit.export.handler_requests import (
    RequestError, canonical_fields, check_batch, make_job, parse_safely, parse_v2, show,
)
from sdkit.serve.tensors import check_shape, from_v2, tensor_field as _get, to_v2

PARTS = ("text-encoder", "denoiser", "decoder")
DENOISER_SETTINGS = ("steps", "guidance", "seed", "width", "height", "num_images")


def part_model_name(name: str, part: str) -> str:
    return f"{name}-{part}"


class SplitPipeline:
    """The parts of one loaded pipeline (a handler DiffusionService: its pipeline, caps and defaults)."""

    def __init__(self, service, family):
        import torch

        self.service, self.family, self.pipe = service, family, service.pipe
        with torch.inference_mode():  # the shapes the denoiser takes, from the pipeline itself
            reference = family.encode_prompt(self.pipe, [""], None)
        self.embedding_shapes = {name: tuple(t.shape[1:]) for name, t in reference.items()}
        self.vae_factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        self.latent_channels = int(self.pipe.vae.config.latent_channels)

    @property
    def limits(self):
        return self.service.limits

    # ---------------------------------------------------------------- the parts: v2 body -> (v2 body, seconds)
    def text_encoder(self, body: dict) -> tuple[dict, float]:
        import torch

        [job] = parse_safely(parse_v2, body, self.limits, self.service.defaults).jobs
        started = time.perf_counter()
        with torch.inference_mode():
            embeddings = self.family.encode_prompt(self.pipe, job.prompts, job.negative_prompts)
        seconds = time.perf_counter() - started
        return self._answer(body, [to_v2(name, t) for name, t in embeddings.items()]), seconds

    def denoiser(self, body: dict) -> tuple[dict, float]:
        import torch

        from sdkit.export.handler import seeded_generators

        embeddings, job = self._denoiser_request(body)
        started = time.perf_counter()
        generators, seeds = seeded_generators(job)
        device, dtype = self.pipe.device, self.service.dtype
        # One row per image (as num_images_per_prompt orders them), so every family's call takes them alike.
        kwargs = {name: t.to(device, dtype).repeat_interleave(job.num_images, dim=0) for name, t in embeddings.items()}
        if job.guidance is not None:
            kwargs["guidance_scale"] = job.guidance
        with torch.inference_mode():
            latents = self.pipe(**kwargs, num_inference_steps=job.steps, width=job.width, height=job.height,
                                generator=generators, output_type="latent").images
        seconds = time.perf_counter() - started
        outputs = [to_v2("latents", latents), seeds_output(seeds)]
        return self._answer(body, outputs), seconds

    def decoder(self, body: dict) -> tuple[dict, float]:
        import torch

        latents, job, seeds = self._decoder_request(body)
        started = time.perf_counter()
        with torch.inference_mode():
            images = self.family.decode_latents(self.pipe, latents)
        seconds = time.perf_counter() - started
        outputs = [images_output(images, job.image_format)] + ([seeds_output(seeds)] if seeds is not None else [])
        return self._answer(body, outputs), seconds

    # ---------------------------------------------------------------- requests (the whole model's caps)
    def _denoiser_request(self, body: dict):
        inputs = _inputs(body)
        unknown = [_get(t, "name") for t in inputs if _get(t, "name") not in self.embedding_shapes]
        if unknown:
            raise RequestError(f"denoiser: unknown input {show(unknown[0])}; it takes the text encoder's outputs "
                               f"{', '.join(self.embedding_shapes)} and settings as parameters")
        embeddings = {_get(t, "name"): from_v2(t) for t in inputs}
        missing = [name for name in self.embedding_shapes if name not in embeddings]
        if missing:
            raise RequestError(f"denoiser: input '{missing[0]}' is missing (send every output of the text encoder)")
        for name, tensor in embeddings.items():
            check_shape(name, tensor, self.embedding_shapes[name], self.limits.max_batch)
        batches = {t.shape[0] for t in embeddings.values()}
        if len(batches) != 1:
            raise RequestError(f"denoiser: the embedding tensors hold different numbers of prompts ({sorted(batches)})")
        fields = _settings(body, DENOISER_SETTINGS, "denoiser")
        job = make_job(["<prompt_embeds>"] * batches.pop(), fields, self.limits, self.service.defaults)
        check_batch([job], self.limits)
        return embeddings, job

    def _decoder_request(self, body: dict):
        inputs = {_get(t, "name"): t for t in _inputs(body)}
        if "latents" not in inputs or set(inputs) - {"latents", "seeds"}:
            raise RequestError("decoder: send the input 'latents' (FP32 [N, C, H/8, W/8]) and optionally 'seeds'")
        latents = from_v2(inputs["latents"])
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            f = self.vae_factor
            check_shape("latents", latents, (self.latent_channels, f"H/{f}", f"W/{f}"), self.limits.max_batch)
        # Sizes, batch and image_format checked as the whole model checks them.
        fields = {**_settings(body, ("image_format",), "decoder"),
                  "width": latents.shape[3] * self.vae_factor, "height": latents.shape[2] * self.vae_factor}
        try:
            job = make_job(["<latents>"] * latents.shape[0], fields, self.limits, self.service.defaults)
            check_batch([job], self.limits)
        except RequestError as e:
            raise RequestError(f"decoder: latents {list(latents.shape)} decode to {fields['width']}x"
                               f"{fields['height']} pixels: {e}") from None
        seeds = None
        if "seeds" in inputs:
            seeds = _get(inputs["seeds"], "data")
            if not isinstance(seeds, list) or len(seeds) != latents.shape[0] or \
                    not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise RequestError(f"decoder: 'seeds' must hold one integer per latent, got {show(seeds)}")
        return latents, job, seeds

    def _answer(self, body: dict, outputs: list) -> dict:
        answer = {"outputs": outputs}
        if body.get("id") is not None:
            answer["id"] = str(body["id"])
        return answer


def _inputs(body: dict) -> list:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("v2 request: 'inputs' must be a non-empty list of tensors")
    for i, tensor in enumerate(inputs):
        if not isinstance(_get(tensor, "name"), str):
            raise RequestError(f"v2 request: inputs[{i}] must be a tensor with a 'name'")
    return inputs


def _settings(body: dict, allowed: tuple, part: str) -> dict:
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("v2 request: 'parameters' must be an object")
    fields = canonical_fields(parameters, "v2 parameters")
    extra = [name for name in fields if name not in allowed]
    if extra:
        raise RequestError(f"{part}: parameter '{extra[0]}' is not one of its settings ({', '.join(allowed)})")
    return fields


def load_split(model: str) -> SplitPipeline:
    """The parts of `model` in this process (a client keeping some parts local), with sdkit serve's default caps."""
    from sdkit.export.handler import DiffusionService
    from sdkit.families import detect_family, family_class
    from sdkit.serve.server import pipeline_config

    config = pipeline_config(model)
    service = DiffusionService()
    service.load("/", {**config, "warmup": False})
    return SplitPipeline(service, family_class(detect_family(config["pipeline"])))
