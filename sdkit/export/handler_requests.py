"""Requests and answers of the TorchServe handler (sdkit/export/handler.py): every accepted
request shape parsed into jobs under the export's caps, one 400 per bad row, and the responses.

Shipped beside the handler in the archive as `sdkit_requests.py`; like the handler it imports
nothing from sdkit or TorchServe, so the archive runs where only torch and diffusers are installed.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

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


def is_form_row(item: Any, context, idx: int) -> bool:
    """Form fields arrive as a dict of field -> bytes (`curl -d prompt=... -d steps=20`, `curl -F ...`)."""
    if not isinstance(item, dict) or "body" in item:
        return False
    if _content_type(context, idx).startswith(FORM_TYPES):
        return True  # even empty: TorchServe drops a form body it cannot split into fields
    return bool(item) and all(isinstance(v, (bytes, bytearray)) for v in item.values())


def is_raw_row(item: Any, context, idx: int) -> bool:
    """TorchServe's own request rows ({"body": ...}, form fields) vs values an envelope already unpacked."""
    if isinstance(item, dict) and ("body" in item or "data" in item) and "datatype" not in item:
        return True
    return is_form_row(item, context, idx)


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


def is_v2_tensor(item: Any) -> bool:
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
