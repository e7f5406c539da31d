"""Requests of the TorchServe handler (sdkit/export/handler.py) and of `sdkit serve`: every accepted
request shape parsed into jobs under the export's caps, one 400 per bad row (answers: handler_answers.py).

Shipped beside the handler in the archive as `sdkit_requests.py`; like the handler it imports
nothing from sdkit or TorchServe, so the archive runs where only torch and diffusers are installed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

SERVE_CONFIG = "sdkit_serve.json"  # written by sdkit's exporter next to this file in the archive
DEFAULT_LIMITS = {"max_steps": 50, "max_size": 1024, "max_batch": 4}
DEFAULT_STEPS = 30
FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "num_images", "image_format")
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images_per_prompt": "num_images"}
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000
# A whole request body, any form: a few prompts of MAX_PROMPT_CHARS and their settings fit many times over.
MAX_BODY_BYTES = 1024 * 1024
MAX_ECHO_CHARS = 200  # values quoted back in errors and log lines are cut to this
# Answers: base64 PNG strings, or a UINT8 tensor [N, H, W, 3]; "uint8-hwc" gives one image as [H, W, 3]
# (what `Image.fromarray(np.array(outputs[0]["data"], dtype="uint8"))` clients decode).
IMAGE_FORMATS = ("png", "uint8", "uint8-hwc")
_INTEGER = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only: int() also takes "²"-like digits and "1_000"


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
    negative_prompt: Optional[str] = None
    image_format: str = "png"


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
    image_format: str = "png"

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


def show(value: Any) -> str:
    """A value as JSON for an error or a log line, cut short: requests may hold megabytes or odd text."""
    try:
        text = value if isinstance(value, str) and len(value) > MAX_ECHO_CHARS * 4 else None
        text = json.dumps(text[: MAX_ECHO_CHARS * 4] if text else value, ensure_ascii=True, default=str)
    except (ValueError, TypeError, RecursionError):  # ints over 4,300 digits, nesting too deep
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + f"... ({_size(value)})"


def _size(value: Any) -> str:
    try:
        return f"{len(value)} long" if isinstance(value, (str, bytes, bytearray, list, dict)) else "cut"
    except TypeError:
        return "cut"


def _integer(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise RequestError(f"'{name}' must be an integer, got {show(value)}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (isinstance(value, str) and len(value) > 40):
        raise RequestError(f"'{name}' must be a number, got {show(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int of hundreds of digits
        raise RequestError(f"'{name}' must be a number, got {show(value)}") from None
    if not math.isfinite(number):
        raise RequestError(f"'{name}' must be a finite number, got {show(value)}")
    return number


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"'{name}' is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string, got {show(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"'{name}' is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer or log takes it
        raise RequestError(f"'{name}' is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _prompt_list(value: Any, name: str) -> list:
    values = value if isinstance(value, list) else [value]
    prompts = [_text(v, name) for v in values]
    if not prompts:
        raise RequestError(f"'{name}' is empty")
    if any(not p.strip() for p in prompts) and name == "prompt":
        raise RequestError("'prompt' is empty")
    return prompts


def _field_name(key: Any, where: str) -> str:
    name = ALIASES.get(key, key) if isinstance(key, str) else None
    if name not in FIELDS:
        raise RequestError(f"unknown field {show(key)} in {where}; known fields: {', '.join(FIELDS)}")
    return name


def canonical_fields(fields: dict, where: str) -> dict:
    """Map aliases to field names; reject unknown keys (a typo would otherwise be ignored silently)."""
    out = {}
    for key, value in fields.items():
        name = _field_name(key, where)
        if name in out:
            raise RequestError(f"'{name}' given twice in {where} (as {show(key)})")
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
    image_format = fields.get("image_format", defaults.image_format)
    if image_format not in IMAGE_FORMATS:
        raise RequestError(f"'image_format' must be one of {', '.join(IMAGE_FORMATS)}, got {show(image_format)}")
    negative = fields.get("negative_prompt", defaults.negative_prompt)
    if negative is not None:
        negative = _prompt_list(negative, "negative_prompt")
        if len(negative) == 1:
            negative = negative * len(prompts)
        elif len(negative) != len(prompts):
            raise RequestError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
    return Job(
        prompts=prompts, negative_prompts=negative, steps=steps, guidance=guidance, seed=seed,
        width=sizes["width"], height=sizes["height"], num_images=num_images, image_format=image_format,
    )


def check_batch(jobs: list, limits: Limits) -> None:
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
    fields = canonical_fields(obj, where)
    if "prompt" not in fields:
        raise RequestError(f"{where} has no 'prompt'")
    prompt = fields["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' in {where} must be a string, got {show(prompt)}")
    return make_job(_prompt_list(prompt, "prompt"), fields, limits, defaults)


def _flatten(values: Any) -> list:
    if not isinstance(values, list):
        return [values]
    flat = []
    for v in values:
        flat.extend(_flatten(v))
    return flat


def _check_shape(shape: Any, count: int, name: str) -> None:
    """The protocol's shape, where one dimension may be -1 (dynamic): `[-1]` fits any count."""
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        return  # some clients send no shape; the data is what counts
    known = [s for s in shape if s != -1]
    dynamic = len(shape) - len(known)
    if dynamic > 1 or any(s < 0 for s in known) or len(shape) > 8:
        raise RequestError(f"v2 request: input {show(name)} has shape {show(shape)}; at most one dimension may be -1")
    size = math.prod(known)
    if (count != size) if not dynamic else (size == 0 or count % size):
        raise RequestError(f"v2 request: input {show(name)} has shape {show(shape)} but {count} values")


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
        # The kservev2 envelope keeps only the first element of BYTES data, so the shape no longer matches.
        if not enveloped:
            _check_shape(tensor.get("shape"), len(values), tensor["name"])
        tensors[tensor["name"]] = (tensor.get("datatype"), values)
    if "prompt" in tensors:
        prompt_name = "prompt"
    else:
        text_inputs = [name for name, (datatype, _) in tensors.items()
                       if datatype == "BYTES" and ALIASES.get(name, name) not in FIELDS]
        if len(text_inputs) != 1:
            raise RequestError("v2 request: no input named 'prompt' (datatype BYTES, shape [n], data [prompt, ...])")
        prompt_name = text_inputs[0]  # a generic client's "input-0" / "input0"
    prompts = _prompt_list(tensors.pop(prompt_name)[1], "prompt")

    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("v2 request: 'parameters' must be an object")
    fields = canonical_fields(parameters, "v2 parameters")
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
    check_batch([job], limits)
    request_id = body.get("id")
    if request_id is not None and (not isinstance(request_id, (str, int)) or len(str(request_id)) > 256):
        raise RequestError(f"v2 request: 'id' must be a string of at most 256 characters, got {show(request_id)}")
    return Request(kind="v2", jobs=[job], request_id=str(request_id) if request_id is not None else None, enveloped=enveloped)


def parse_body(body: Any, limits: Limits, defaults: Defaults) -> Request:
    """A raw request body as TorchServe hands it over: dict/list (JSON), str (text/*) or bytes."""
    if isinstance(body, (bytes, bytearray, str)) and len(body) > MAX_BODY_BYTES:
        # Checked before anything reads it: a 16 MB prompt would hold a worker for minutes.
        raise RequestError(f"request body is {len(body)} bytes long; the limit is {MAX_BODY_BYTES}")
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
        except RecursionError:
            raise RequestError("request body is not valid JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4,300 digits
            raise RequestError(f"request body is not valid JSON: {show(str(e))}") from None
        if body is None:
            job = make_job([_text(text, "prompt")], {}, limits, defaults)
            check_batch([job], limits)
            return Request(kind="text", jobs=[job])
    if isinstance(body, str):  # a JSON string: the prompt
        job = make_job(_prompt_list(body, "prompt"), {}, limits, defaults)
        check_batch([job], limits)
        return Request(kind="text", jobs=[job])
    if not isinstance(body, dict):
        raise RequestError(f"JSON body must be an object, got {type(body).__name__}")
    if "inputs" in body:
        return parse_v2(body, limits, defaults)
    if "instances" in body:
        return parse_v1(body["instances"], limits, defaults)
    job = _job_from_object(body, "JSON request", limits, defaults)
    check_batch([job], limits)
    return Request(kind="json", jobs=[job])


def parse_v1(instances: Any, limits: Limits, defaults: Defaults, *, enveloped: bool = False) -> Request:
    if not isinstance(instances, list) or not instances:
        raise RequestError("v1 request: 'instances' must be a non-empty list of prompts or objects with 'prompt'")
    jobs = [_job_from_object(inst, f"instances[{i}]", limits, defaults) for i, inst in enumerate(instances)]
    check_batch(jobs, limits)
    return Request(kind="v1", jobs=jobs, enveloped=enveloped)


def parse_safely(parse, *args, **kwargs) -> Request:
    """Any request a parser chokes on is the client's error (a 400 for its row), never the worker's."""
    try:
        return parse(*args, **kwargs)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("request is nested too deeply") from None
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError) as e:
        raise RequestError(f"malformed request: {show(f'{type(e).__name__}: {e}')}") from None


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
    check_batch([job], limits)
    return Request(kind="json", jobs=[job])


def is_v2_tensor(item: Any) -> bool:
    return isinstance(item, dict) and "name" in item and "datatype" in item
