"""TorchServe handler for a diffusers text-to-image pipeline; `sdkit export --format mar` ships it.

Self-contained on purpose: TorchServe may run it where only torch, diffusers (and peft, for a
LoRA) are installed, so it imports nothing from sdkit, and nothing from `ts` at module level
(it imports and unit-tests with TorchServe absent).

TorchServe calls the module-level `handle(data, context)`: once with `data=None` when the
worker starts (the pipeline loads then, once) and then once per batch of requests.

Requests (answered with base64-encoded PNGs, or UINT8 pixel tensors with image_format uint8/uint8-hwc):
- plain text: the body is the prompt;
- form fields (prompt=...&steps=...), the same fields as JSON;
- JSON: {"prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "num_images"}
  -> {"images": [...], "seeds": [...]};
- KServe v1: {"instances": [<prompt> or {<JSON fields>}, ...]} -> {"predictions": [{"images", "seeds"}, ...]};
- KServe v2 / Open Inference: {"id", "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [n],
  "data": [...]}, ...], "parameters": {<JSON fields>}} -> {"model_name", "id", "outputs": [images
  (BYTES), seeds (INT64)]}. Other fields may also come as one-element input tensors named after them.
Behind TorchServe's `kserve`/`kservev2` envelopes (KServe sets TS_SERVICE_ENVELOPE) the envelope
parses and formats the body; the handler gets the instances / input tensors and returns bare values.

Each image's seed is returned: generating that seed alone (num_images 1) gives the same image.
Steps, size and images per request are capped by the limits written at export, bodies of every
form by size, so one request cannot take the server down; a malformed request gets a 400 naming
what is wrong (values cut short) for its own row only, and the worker keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

logger = logging.getLogger(__name__)

try:  # in the archive: the modules shipped beside this one
    from sdkit_answers import error_body, format_response
    from sdkit_requests import (  # noqa: F401  (Limits, Defaults: part of this module's interface)
        DEFAULT_LIMITS, DEFAULT_STEPS, Defaults, Job, Limits, MAX_SEED, Request, RequestError, SERVE_CONFIG,
        is_form_row, is_raw_row, is_v2_tensor, parse_body, parse_form, parse_safely, parse_v1, parse_v2, show,
    )
except ImportError:  # inside the sdkit package (sdkit itself, the tests)
    from sdkit.export.handler_answers import error_body, format_response
    from sdkit.export.handler_requests import (  # noqa: F401
        DEFAULT_LIMITS, DEFAULT_STEPS, Defaults, Job, Limits, MAX_SEED, Request, RequestError, SERVE_CONFIG,
        is_form_row, is_raw_row, is_v2_tensor, parse_body, parse_form, parse_safely, parse_v1, parse_v2, show,
    )

# ------------------------------------------------------------------------ the service


def read_serve_config(model_dir: str) -> dict:
    """The exporter's config; a bare diffusers folder (no config) is served with default limits."""
    path = os.path.join(model_dir, SERVE_CONFIG)
    if not os.path.isfile(path):
        return {"pipeline": ".", "limits": dict(DEFAULT_LIMITS)}
    with open(path) as f:
        return json.load(f)


class DiffusionService:
    """Loads the pipeline once, then turns request batches into images."""

    def __init__(self):
        self.pipe = None
        self.refiner = None
        self.initialized = False

    # -------------------------------------------------------------- loading
    def initialize(self, context) -> None:
        props = getattr(context, "system_properties", None) or {}
        model_dir = props.get("model_dir") or os.getcwd()
        self.load(model_dir, read_serve_config(model_dir), props.get("gpu_id"))

    def load(self, model_dir: str, config: dict, gpu_id=None, prepare=None) -> None:
        """Load what `config` (sdkit_serve.json's fields; paths relative to model_dir) names; `sdkit serve` calls this.
        `prepare(pipe)`, if given, runs before the warm-up (sdkit serve --compile compiles the denoiser there)."""
        import torch
        from diffusers import DiffusionPipeline

        started = time.perf_counter()
        if torch.cuda.is_available():
            self.device = f"cuda:{gpu_id if gpu_id is not None else 0}"
            self.dtype = torch.float16
        else:
            self.device, self.dtype = "cpu", torch.float32

        pipeline_dir = os.path.join(model_dir, config.get("pipeline", "."))
        pipe = _load_pipeline(DiffusionPipeline, pipeline_dir, self.dtype)
        if config.get("lora"):
            # Fused once at load: requests then run at the base model's speed.
            lora_path = os.path.join(model_dir, config["lora"])
            pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=os.path.basename(lora_path))
            pipe.fuse_lora(lora_scale=float(config.get("lora_scale", 1.0)))
            pipe.unload_lora_weights()
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

        if config.get("refiner"):
            self.refiner = self._load_refiner(pipe, model_dir, config["refiner"], config.get("refiner_device"))
        self.refiner_start = float(config.get("refiner_start") or 0.8)
        self.refiner_steps = config.get("refiner_steps")  # None: the request's steps

        multiple = self._set_limits(pipe, config)
        if prepare is not None:
            prepare(pipe)
        if config.get("warmup", True):
            # One small generation now, so the first request does not pay one-time set-up costs
            # and TorchServe reports the worker READY only once it can really answer.
            side = min(self.defaults.width, self.defaults.height, 256) // multiple * multiple or multiple
            self.generate(Job(["warm-up"], None, min(2, self.limits.max_steps), None, 0, side, side, 1))
        self.load_seconds = time.perf_counter() - started
        self.initialized = True
        logger.info(
            "sdkit handler: %s loaded on %s (%s) in %.1f s; limits %s; defaults %s",
            type(pipe).__name__, self.device, str(self.dtype).replace("torch.", ""), self.load_seconds,
            self.limits, self.defaults,
        )

    def _load_refiner(self, pipe, model_dir: str, folder: str, device=None):
        import torch
        from diffusers import DiffusionPipeline

        device = device or self.device
        dtype = torch.float32 if device == "cpu" else self.dtype
        shared = {}  # SDXL's refiner reuses the base's second text encoder and VAE: load them once
        with open(os.path.join(model_dir, folder, "model_index.json")) as f:
            refiner_index = json.load(f)
        for name in ("text_encoder_2", "vae"):
            if refiner_index.get(name) and getattr(pipe, name, None) is not None and device == self.device:
                shared[name] = getattr(pipe, name)  # a refiner kept on the CPU gets its own copies
        refiner = _load_pipeline(DiffusionPipeline, os.path.join(model_dir, folder), dtype, **shared)
        refiner.to(device)
        refiner.set_progress_bar_config(disable=True)
        return refiner

    def _set_limits(self, pipe, config: dict) -> int:
        """Caps and defaults from the export's config; returns the size multiple of this model."""
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        patch = int(getattr(denoiser.config, "patch_size", None) or 1) if denoiser is not None else 1
        multiple = max(8, scale * patch)
        limits = {**DEFAULT_LIMITS, **config.get("limits", {})}
        max_size = int(limits["max_size"]) // multiple * multiple
        self.limits = Limits(int(limits["max_steps"]), max_size, int(limits["max_batch"]), multiple)
        sample = getattr(pipe, "default_sample_size", None) or getattr(denoiser.config, "sample_size", 64)
        native = min(int(sample) * scale, max_size)
        defaults = config.get("defaults", {})
        self.defaults = Defaults(
            steps=min(int(defaults.get("steps") or DEFAULT_STEPS), self.limits.max_steps),
            width=int(defaults.get("width") or native),
            height=int(defaults.get("height") or native),
            guidance=defaults.get("guidance"),
            negative_prompt=defaults.get("negative_prompt"),
            image_format=defaults.get("image_format") or "png",
        )
        return multiple

    # -------------------------------------------------------------- generation
    def generate(self, job: Job) -> tuple:
        """PIL images and their seeds; image i comes from its own generator seeded seeds[i]."""
        import torch

        generators, seeds = seeded_generators(job)
        kwargs = dict(
            prompt=job.prompts, num_inference_steps=job.steps, width=job.width, height=job.height,
            num_images_per_prompt=job.num_images, generator=generators,
        )
        if job.negative_prompts is not None:
            kwargs["negative_prompt"] = job.negative_prompts
        if job.guidance is not None:
            kwargs["guidance_scale"] = job.guidance
        with torch.inference_mode():
            if self.refiner is None:
                images = self.pipe(**kwargs).images
            else:
                latents = self.pipe(**kwargs, denoising_end=self.refiner_start, output_type="latent").images
                refine = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
                if self.refiner_steps:
                    refine["num_inference_steps"] = self.refiner_steps
                latents = latents.to(self.refiner.device, self.refiner.dtype)  # the refiner may live on the CPU
                images = self.refiner(**refine, image=latents, denoising_start=self.refiner_start).images
        return images, seeds

    def run(self, request: Request, context, idx: int):
        started = time.perf_counter()
        results = [self.generate(job) for job in request.jobs]
        logger.info(
            "sdkit handler: %s request, %d image(s) in %.2f s", request.kind,
            sum(job.image_count for job in request.jobs), time.perf_counter() - started,
        )
        manifest_model = (getattr(context, "manifest", None) or {}).get("model", {})
        model_name = manifest_model.get("modelName") or getattr(context, "model_name", None) or "model"
        request_id = _request_id(context, idx)
        return format_response(request, results, model_name, manifest_model.get("modelVersion"), request_id)

    # -------------------------------------------------------------- TorchServe entry
    def handle(self, data, context):
        if data is None:
            if not self.initialized:
                self.initialize(context)
                return None
            # An envelope found nothing to pass on (e.g. a v1 body without "instances").
            raise _prediction_error('request holds no input: expected "instances" (v1) or "inputs" (v2)')
        if not self.initialized:
            self.initialize(context)
        if not isinstance(data, list) or not data:
            raise _prediction_error("request holds no input")
        if all(is_raw_row(row, context, idx) for idx, row in enumerate(data)):
            return [self._handle_raw(row, context, idx) for idx, row in enumerate(data)]
        # Values a TorchServe envelope unpacked: kservev2 gives the input tensors, kserve the instances.
        try:
            if all(is_v2_tensor(item) for item in data):
                request = parse_safely(parse_v2, {"inputs": data}, self.limits, self.defaults, enveloped=True)
            else:
                request = parse_safely(parse_v1, data, self.limits, self.defaults, enveloped=True)
        except RequestError as e:
            logger.info("bad request: %s", e)
            raise _prediction_error(str(e)) from None
        result = self.run(request, context, 0)
        if request.kind == "v2":
            # The kservev2 envelope names output tensors after the inputs it stored on the
            # context; name them after what they hold instead.
            context.input_names = ["images", "seeds"]
        return result

    def _handle_raw(self, row: dict, context, idx: int):
        try:
            if is_form_row(row, context, idx):
                request = parse_safely(parse_form, row, self.limits, self.defaults)
            else:
                body = row.get("body") if row.get("body") is not None else row.get("data")
                request = parse_safely(parse_body, body, self.limits, self.defaults)
        except RequestError as e:
            logger.info("bad request: %s", e)
            _set_status(context, idx, 400, "Bad Request")
            return error_body(str(e))
        _set_content_type(context, idx, "application/json")
        try:
            return self.run(request, context, idx)
        except Exception as e:  # noqa: BLE001  one failed generation must not fail the batch's other rows
            logger.exception("generation failed")
            _set_status(context, idx, 500, "Internal Server Error")
            return {"code": 500, "type": "InternalServerError", "message": show(f"{type(e).__name__}: {e}")}


def seeded_generators(job: Job) -> tuple:
    """One generator per image and its seed: image i of a job starts from seed + i (`sdkit serve --split` too)."""
    import torch

    first = job.seed if job.seed is not None else random.randrange(0, 2**31)
    seeds = [(first + i) % (MAX_SEED + 1) for i in range(job.image_count)]
    # CPU generators: the same seed gives the same starting noise on CPU and GPU.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


def _load_pipeline(pipeline_class, folder: str, dtype, **components):
    import warnings

    with warnings.catch_warnings():
        # Newer diffusers rename torch_dtype to dtype (with a FutureWarning); the old name works in all.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return pipeline_class.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **components)


def _request_id(context, idx: int) -> str:
    getter = getattr(context, "get_request_id", None)
    request_id = getter(idx) if callable(getter) else None
    return str(request_id) if request_id else f"request-{idx}"


def _set_status(context, idx: int, code: int, phrase: str) -> None:
    setter = getattr(context, "set_response_status", None)
    if callable(setter):
        setter(code, phrase, idx)
    _set_content_type(context, idx, "application/json")


def _set_content_type(context, idx: int, value: str) -> None:
    setter = getattr(context, "set_response_content_type", None)
    if callable(setter) and getattr(context, "request_processor", None):
        setter(idx, value)


def _prediction_error(message: str) -> Exception:
    """TorchServe turns a PredictionException into that HTTP code and message; elsewhere a RequestError."""
    try:
        from ts.utils.util import PredictionException
    except ImportError:
        return RequestError(message)
    return PredictionException(message, 400)


_service = DiffusionService()


def handle(data, context):
    """TorchServe's function entry point (the handler module is named in the archive's manifest)."""
    return _service.handle(data, context)
