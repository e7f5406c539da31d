"""TorchServe handler for a diffusers text-to-image pipeline; `sdkit export --format mar` ships it.

Self-contained on purpose: TorchServe may run it where only torch, diffusers (and peft, for a
LoRA) are installed, so it imports nothing from sdkit, and nothing from `ts` at module level
(it imports and unit-tests with TorchServe absent).

TorchServe calls the module-level `handle(data, context)`: once with `data=None` when the
worker starts (the pipeline loads then, once) and then once per batch of requests.

Requests (answered with base64-encoded PNGs):
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
Steps, size and images per request are capped by the limits written at export, so one request
cannot take the server down; a malformed request gets a 400 naming what is wrong and the worker
keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

SERVE_CONFIG = "sdkit_serve.json"  # written by sdkit's exporter next to this file in the archive
DEFAULT_LIMITS = {"max_steps": 50, "max_size": 1024, "max_batch": 4}
DEFAULT_STEPS = 30
FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "num_images")
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images_per_prompt": "num_images"}
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000


class RequestError(ValueError):
    """A malformed request; the message names the field and is sent back with HTTP 400."""


@dataclass(frozen=True)
class Limits:
    max_steps: int
    max_size: int
    max_batch: int
    size_multiple: int = 8


@dataclass(frozen=True)
class Defaults:
    steps: int
    width: int
    height: int
    guidance: Optional[float] = None  # None: the pipeline's own default


@dataclass
class Job:
    """One pipeline call: n prompts x num_images images, all with the same settings."""

    prompts: list
    negative_prompts: Optional[list]
    steps: int
    guidance: Optional[float]
    seed: Optional[int]
    width: int
    height: int
    num_images: int

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.num_images


@dataclass
class Request:
    kind: str  # "text" | "json" | "v1" | "v2"
    jobs: list
    request_id: Optional[str] = None
    enveloped: bool = False  # parsed by a TorchServe envelope: answer bare values


# ------------------------------------------------------------------------ request parsing


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise RequestError(f"'{name}' must be an integer, got {json.dumps(value, default=str)}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value, default=str)}") from None
    if not math.isfinite(number):
        raise RequestError(f"'{name}' must be a finite number, got {value}")
    return number


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"'{name}' is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string, got {json.dumps(value, default=str)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"'{name}' is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return value


def _prompt_list(value: Any, name: str) -> list:
    values = value if isinstance(value, list) else [value]
    prompts = [_text(v, name) for v in values]
    if not prompts:
        raise RequestError(f"'{name}' is empty")
    if any(not p.strip() for p in prompts) and name == "prompt":
        raise RequestError("'prompt' is empty")
    return prompts


def _field_name(key: str, where: str) -> str:
    name = ALIASES.get(key, key)
    if name not in FIELDS:
        raise RequestError(f"unknown field '{key}' in {where}; known fields: {', '.join(FIELDS)}")
    return name


def _canonical_fields(fields: dict, where: str) -> dict:
    """Map aliases to field names; reject unknown keys (a typo would otherwise be ignored silently)."""
    out = {}
    for key, value in fields.items():
        name = _field_name(key, where)
        if name in out:
            raise RequestError(f"'{name}' given twice in {where} (as '{key}')")
        out[name] = value
    return out


def make_job(prompts: list, fields: dict, limits: Limits, defaults: Defaults) -> Job:
    """Validate every field of one generation against the export's limits."""
    steps = _integer(fields.get("steps", defaults.steps), "steps")
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(f"'steps' must be between 1 and {limits.max_steps} (this model's limit), got {steps}")
    sizes = {}
    for name, default in (("width", defaults.width), ("height", defaults.height)):
        size = _integer(fields.get(name, default), name)
        m = limits.size_multiple
        if size % m or not m <= size <= limits.max_size:
            raise RequestError(
                f"'{name}' must be a multiple of {m} between {m} and {limits.max_size} (this model's limit), got {size}"
            )
        sizes[name] = size
    num_images = _integer(fields.get("num_images", 1), "num_images")
    if num_images < 1:
        raise RequestError(f"'num_images' must be at least 1, got {num_images}")
    guidance = fields.get("guidance", defaults.guidance)
    if guidance is not None:
        guidance = _number(guidance, "guidance")
        if not 0 <= guidance <= 100:
            raise RequestError(f"'guidance' must be between 0 and 100, got {guidance}")
    seed = fields.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"'seed' must be between 0 and {MAX_SEED}, got {seed}")
    negative = fields.get("negative_prompt")
    if negative is not None:
        negative = _prompt_list(negative, "negative_prompt")
        if len(negative) == 1:
            negative = negative * len(prompts)
        elif len(negative) != len(prompts):
            raise RequestError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
    return Job(
        prompts=prompts, negative_prompts=negative, steps=steps, guidance=guidance, seed=seed,
        width=sizes["width"], height=sizes["height"], num_images=num_images,
    )


def _check_batch(jobs: list, limits: Limits) -> None:
    total = sum(job.image_count for job in jobs)
    if total > limits.max_batch:
        raise RequestError(
            f"this request asks for {total} images (prompts x num_images); the limit is {limits.max_batch} per request"
        )


def _job_from_object(obj: Any, where: str, limits: Limits, defaults: Defaults) -> Job:
    """A JSON object of fields (or a bare string: the prompt)."""
    if isinstance(obj, str):
        return make_job(_prompt_list(obj, "prompt"), {}, limits, defaults)
    if not isinstance(obj, dict):
        raise RequestError(f"{where} must be a prompt string or an object with 'prompt', got {type(obj).__name__}")
    fields = _canonical_fields(obj, where)
    if "prompt" not in fields:
        raise RequestError(f"{where} has no 'prompt'")
    prompt = fields["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' in {where} must be a string, got {json.dumps(prompt, default=str)}")
    return make_job(_prompt_list(prompt, "prompt"), fields, limits, defaults)


def _flatten(values: Any) -> list:
    if not isinstance(values, list):
        return [values]
    flat = []
    for v in values:
        flat.extend(_flatten(v))
    return flat


def parse_v2(body: dict, limits: Limits, defaults: Defaults, *, enveloped: bool = False) -> Request:
    """KServe v2 / Open Inference request: prompts in a BYTES tensor, settings as parameters or tensors."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("v2 request: 'inputs' must be a non-empty list of tensors")
    tensors = {}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or "data" not in tensor:
            raise RequestError(f"v2 request: inputs[{i}] must be an object with 'name', 'datatype', 'shape' and 'data'")
        values = _flatten(tensor["data"])
        shape = tensor.get("shape")
        # The kservev2 envelope keeps only the first element of BYTES data, so the shape no longer matches.
        if not enveloped and isinstance(shape, list) and all(isinstance(s, int) for s in shape):
            if math.prod(shape) != len(values):
                raise RequestError(
                    f"v2 request: input '{tensor['name']}' has shape {shape} but {len(values)} values"
                )
        tensors[tensor["name"]] = (tensor.get("datatype"), values)
    if "prompt" in tensors:
        prompt_name = "prompt"
    else:
        text_inputs = [name for name, (datatype, _) in tensors.items() if datatype == "BYTES"]
        if len(text_inputs) != 1:
            raise RequestError("v2 request: no input named 'prompt' (datatype BYTES, shape [n], data [prompt, ...])")
        prompt_name = text_inputs[0]  # a generic client's "input-0"
    prompts = _prompt_list(tensors.pop(prompt_name)[1], "prompt")

    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("v2 request: 'parameters' must be an object")
    fields = _canonical_fields(parameters, "v2 parameters")
    if "prompt" in fields:
        raise RequestError("v2 request: send the prompt as an input tensor named 'prompt', not as a parameter")
    for name, (_, values) in tensors.items():
        key = _field_name(name, "v2 inputs")
        if key == "prompt":
            raise RequestError("v2 request: two prompt inputs")
        if key == "negative_prompt":
            fields[key] = values
        elif len(values) != 1:
            raise RequestError(f"v2 request: input '{name}' must hold one value, got {len(values)}")
        else:
            fields[key] = values[0]
    job = make_job(prompts, fields, limits, defaults)
    _check_batch([job], limits)
    request_id = body.get("id")
    return Request(kind="v2", jobs=[job], request_id=str(request_id) if request_id is not None else None, enveloped=enveloped)


def parse_body(body: Any, limits: Limits, defaults: Defaults) -> Request:
    """A raw request body as TorchServe hands it over: dict/list (JSON), str (text/*) or bytes."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request body is not UTF-8 text or JSON") from None
    if isinstance(body, str):
        text = body.strip()
        if not text:
            raise RequestError('request body is empty: send a prompt as text, or JSON {"prompt": "..."}')
        try:
            body = json.loads(text) if text[0] in "{[\"" else None
        except json.JSONDecodeError as e:
            if text[0] == "{":  # a broken JSON object; a prompt may well start with "[" though
                raise RequestError(f"request body is not valid JSON: {e}") from None
            body = None
        if body is None:
            job = make_job([text], {}, limits, defaults)
            _check_batch([job], limits)
            return Request(kind="text", jobs=[job])
    if isinstance(body, str):  # a JSON string: the prompt
        return parse_body(body, limits, defaults)
    if not isinstance(body, dict):
        raise RequestError(f"JSON body must be an object, got {type(body).__name__}")
    if "inputs" in body:
        return parse_v2(body, limits, defaults)
    if "instances" in body:
        return parse_v1(body["instances"], limits, defaults)
    job = _job_from_object(body, "JSON request", limits, defaults)
    _check_batch([job], limits)
    return Request(kind="json", jobs=[job])


def parse_v1(instances: Any, limits: Limits, defaults: Defaults, *, enveloped: bool = False) -> Request:
    if not isinstance(instances, list) or not instances:
        raise RequestError("v1 request: 'instances' must be a non-empty list of prompts or objects with 'prompt'")
    jobs = [_job_from_object(inst, f"instances[{i}]", limits, defaults) for i, inst in enumerate(instances)]
    _check_batch(jobs, limits)
    return Request(kind="v1", jobs=jobs, enveloped=enveloped)


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _content_type(context, idx: int) -> str:
    getter = getattr(context, "get_request_header", None)
    try:
        value = getter(idx, "Content-Type") if callable(getter) else None
    except (AttributeError, IndexError, KeyError, TypeError):
        value = None
    return (value or "").lower()


def _is_form_row(item: Any, context, idx: int) -> bool:
    """Form fields arrive as a dict of field -> bytes (`curl -d prompt=... -d steps=20`, `curl -F ...`)."""
    if not isinstance(item, dict) or "body" in item:
        return False
    if _content_type(context, idx).startswith(FORM_TYPES):
        return True  # even empty: TorchServe drops a form body it cannot split into fields
    return bool(item) and all(isinstance(v, (bytes, bytearray)) for v in item.values())


def _is_raw_row(item: Any, context, idx: int) -> bool:
    """TorchServe's own request rows ({"body": ...}, form fields) vs values an envelope already unpacked."""
    if isinstance(item, dict) and ("body" in item or "data" in item) and "datatype" not in item:
        return True
    return _is_form_row(item, context, idx)


def parse_form(fields: dict, limits: Limits, defaults: Defaults) -> Request:
    if not fields or (len(fields) == 1 and not next(iter(fields.values()))):
        # `curl -d 'a cat'` sends the prompt as a form: TorchServe finds no field, or one empty field.
        raise RequestError(
            "the body arrived form-encoded (curl -d's default Content-Type): send a prompt with "
            "'Content-Type: text/plain', JSON with 'Content-Type: application/json', or form fields prompt=...&steps=..."
        )
    decoded = {key: _text(value, key) if isinstance(value, (bytes, bytearray)) else value for key, value in fields.items()}
    job = _job_from_object(decoded, "form request", limits, defaults)
    _check_batch([job], limits)
    return Request(kind="json", jobs=[job])


def _is_v2_tensor(item: Any) -> bool:
    return isinstance(item, dict) and "name" in item and "datatype" in item


# ------------------------------------------------------------------------ responses


def encode_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def format_response(request: Request, results: list, model_name: str, model_version: Optional[str], request_id: str):
    """results: one (images_b64, seeds) pair per job."""
    if request.kind in ("text", "json"):
        images, seeds = results[0]
        return {"images": images, "seeds": seeds}
    if request.kind == "v1":
        predictions = [{"images": images, "seeds": seeds} for images, seeds in results]
        return predictions if request.enveloped else {"predictions": predictions}
    images, seeds = results[0]
    if request.enveloped:  # the kservev2 envelope builds one output tensor per returned item
        return [images, seeds]
    response = {
        "model_name": model_name,
        "id": request.request_id or request_id,
        "outputs": [
            {"name": "images", "datatype": "BYTES", "shape": [len(images)], "data": images,
             "parameters": {"content_type": "base64"}},  # MLServer's name for base64-encoded bytes
            {"name": "seeds", "datatype": "INT64", "shape": [len(seeds)], "data": seeds},
        ],
    }
    if model_version:
        response["model_version"] = model_version
    return response


def error_body(message: str) -> dict:
    return {"code": 400, "type": "BadRequest", "message": message}


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
        import torch
        from diffusers import DiffusionPipeline

        started = time.perf_counter()
        props = getattr(context, "system_properties", None) or {}
        model_dir = props.get("model_dir") or os.getcwd()
        config = read_serve_config(model_dir)
        if torch.cuda.is_available():
            gpu_id = props.get("gpu_id")
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
            shared = {}  # SDXL's refiner reuses the base's second text encoder and VAE: load them once
            with open(os.path.join(model_dir, config["refiner"], "model_index.json")) as f:
                refiner_index = json.load(f)
            for name in ("text_encoder_2", "vae"):
                if refiner_index.get(name) and getattr(pipe, name, None) is not None:
                    shared[name] = getattr(pipe, name)
            refiner = _load_pipeline(DiffusionPipeline, os.path.join(model_dir, config["refiner"]), self.dtype, **shared)
            refiner.to(self.device)
            refiner.set_progress_bar_config(disable=True)
            self.refiner = refiner
        self.refiner_start = float(config.get("refiner_start", 0.8))

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
        )
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

    # -------------------------------------------------------------- generation
    def generate(self, job: Job) -> tuple:
        """Images (base64 PNG) and their seeds; image i comes from its own generator seeded seeds[i]."""
        import torch

        first = job.seed if job.seed is not None else random.randrange(0, 2**31)
        seeds = [(first + i) % (MAX_SEED + 1) for i in range(job.image_count)]
        # CPU generators: the same seed gives the same starting noise on CPU and GPU.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
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
                images = self.refiner(**refine, image=latents, denoising_start=self.refiner_start).images
        return [encode_png(image) for image in images], seeds

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
        if all(_is_raw_row(row, context, idx) for idx, row in enumerate(data)):
            return [self._handle_raw(row, context, idx) for idx, row in enumerate(data)]
        # Values a TorchServe envelope unpacked: kservev2 gives the input tensors, kserve the instances.
        try:
            if all(_is_v2_tensor(item) for item in data):
                request = parse_v2({"inputs": data}, self.limits, self.defaults, enveloped=True)
            else:
                request = parse_v1(data, self.limits, self.defaults, enveloped=True)
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
            if _is_form_row(row, context, idx):
                request = parse_form(row, self.limits, self.defaults)
            else:
                body = row.get("body") if row.get("body") is not None else row.get("data")
                request = parse_body(body, self.limits, self.defaults)
        except RequestError as e:
            logger.info("bad request: %s", e)
            _set_status(context, idx, 400, "Bad Request")
            return error_body(str(e))
        _set_content_type(context, idx, "application/json")
        return self.run(request, context, idx)


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
