"""The TorchServe handler, run in-process on tiny pipelines: every request shape, the caps, the errors.

TorchServe itself is not started here (tests/export/test_mar_torchserve.py does that). The request
context is TorchServe's own `ts.context.Context` when TorchServe is installed, else a stand-in
with the same methods; the kserve/kservev2 envelope tests run TorchServe's envelope classes.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from sdkit.export import handler as H
from sdkit.export.mar import export_mar
from sdkit.inference.loading import resolve_model

MAX_STEPS, MAX_SIZE, MAX_BATCH = 3, 64, 4

# KServe v2 / Open Inference Protocol inference response (REST), as a JSON schema.
PARAMETERS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
V2_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": PARAMETERS,
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                          "INT64", "FP16", "FP32", "FP64", "BYTES"]},
                    "parameters": PARAMETERS,
                    "data": {"type": "array"},
                },
            },
        },
    },
}


def assert_v2_response(response: dict) -> dict:
    """Schema-valid, shapes match the data, BYTES are strings; returns the outputs by name."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(response, V2_RESPONSE_SCHEMA)
    outputs = {}
    for output in response["outputs"]:
        flat = np.array(output["data"], dtype=object).reshape(-1)
        assert math.prod(output["shape"]) == len(flat), output["name"]
        if output["datatype"] == "BYTES":
            assert all(isinstance(v, str) for v in flat)
        if output["datatype"] == "INT64":
            assert all(isinstance(v, int) for v in flat)
        outputs[output["name"]] = output
    return outputs


def pngs(encoded) -> list:
    images = []
    for item in encoded:
        image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
        assert image.format == "PNG"
        images.append(np.asarray(image.convert("RGB")))
    return images


# ------------------------------------------------------------------------ request context


class StandInContext:
    """The part of TorchServe's Context the handler uses, for environments without TorchServe."""

    def __init__(self, model_dir, headers):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"modelName": "tiny", "modelVersion": "1.0"}}
        self.model_name = "tiny"
        self.request_ids = {i: f"req-{i}" for i in range(len(headers))}
        self.request_processor = [dict(h) for h in headers]
        self._status = {i: (200, None) for i in range(len(headers))}
        self._content_type = {}

    def get_request_id(self, idx=0):
        return self.request_ids.get(idx)

    def get_request_header(self, idx, key):
        return self.request_processor[idx].get(key)

    def set_response_status(self, code=200, phrase="", idx=0):
        self._status[idx] = (code, phrase)

    def get_response_status(self, idx):
        return self._status[idx]

    def set_response_content_type(self, idx, value):
        self._content_type[idx] = value

    def get_response_content_type(self, idx):
        return self._content_type.get(idx)


def make_context(model_dir, n: int = 1, content_type: str = "application/json"):
    """A fresh per-batch context, as TorchServe builds one for every batch of n requests."""
    headers = [{"Content-Type": content_type} for _ in range(n)]
    try:
        from ts.context import Context, RequestProcessor
    except ImportError:
        return StandInContext(model_dir, headers)
    context = Context("tiny", str(model_dir), {"model": {"modelName": "tiny", "modelVersion": "1.0"}}, n, None, "0.12")
    context.request_ids = {i: f"req-{i}" for i in range(n)}
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tiny_sd, tmp_path_factory):
    """The archive's content as TorchServe unpacks it (exported unzipped, so no unzip step here)."""
    out = tmp_path_factory.mktemp("mar")
    written = export_mar(resolve_model(str(tiny_sd)), out=out, name="tiny", archive_format="no-archive",
                         max_steps=MAX_STEPS, max_size=MAX_SIZE, max_batch=MAX_BATCH)
    return written[0]


@pytest.fixture(scope="module")
def service(model_dir):
    service = H.DiffusionService()
    assert service.handle(None, make_context(model_dir)) is None  # TorchServe's start-up call
    return service


def call(service, model_dir, body, content_type="application/json"):
    """One raw request through the handler: (HTTP status, answer)."""
    context = make_context(model_dir, 1, content_type)
    [answer] = service.handle([{"body": body}], context)
    return context.get_response_status(0)[0], answer


# ------------------------------------------------------------------------ start-up


def test_start_up_reads_the_exported_limits_and_defaults(service):
    assert service.initialized
    assert service.limits == H.Limits(max_steps=MAX_STEPS, max_size=MAX_SIZE, max_batch=MAX_BATCH, size_multiple=8)
    # Native size of the tiny model (16 latent px x VAE factor 2), default steps capped at max_steps.
    assert service.defaults == H.Defaults(steps=MAX_STEPS, width=32, height=32, guidance=None)
    assert str(service.dtype) == "torch.float32" and service.device == "cpu"


def test_module_entry_point_is_what_torchserve_calls(model_dir, monkeypatch):
    monkeypatch.setattr(H, "_service", H.DiffusionService())
    assert H.handle(None, make_context(model_dir)) is None
    [answer] = H.handle([{"body": "a red circle"}], make_context(model_dir, content_type="text/plain"))
    assert len(pngs(answer["images"])) == 1


# ------------------------------------------------------------------------ request shapes


def test_plain_text_prompt(service, model_dir):
    status, answer = call(service, model_dir, "a red circle", "text/plain")
    assert status == 200
    [image] = pngs(answer["images"])
    assert image.shape == (32, 32, 3)
    assert len(answer["seeds"]) == 1


def test_plain_text_as_bytes(service, model_dir):
    status, answer = call(service, model_dir, bytearray("a blue square".encode()), "application/octet-stream")
    assert status == 200 and len(pngs(answer["images"])) == 1


def test_prompts_that_look_like_json_stay_prompts(service, model_dir):
    for prompt in ("[masterpiece] a cat", '"quoted" prompt'):
        status, answer = call(service, model_dir, prompt, "text/plain")
        assert status == 200 and len(answer["images"]) == 1, prompt


def test_json_fields_and_seeds(service, model_dir):
    body = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "guidance": 5.0, "seed": 7,
            "width": 48, "height": 32, "num_images": 2}
    status, answer = call(service, model_dir, body)
    assert status == 200
    images = pngs(answer["images"])
    assert [im.shape for im in images] == [(32, 48, 3)] * 2
    assert answer["seeds"] == [7, 8]
    # Each image's seed reproduces it alone.
    _, again = call(service, model_dir, {**body, "seed": 8, "num_images": 1})
    np.testing.assert_allclose(pngs(again["images"])[0].astype(int), images[1].astype(int), atol=2)
    _, same = call(service, model_dir, body)
    assert same["images"] == answer["images"]


def test_json_body_as_text_and_diffusers_aliases(service, model_dir):
    body = json.dumps({"prompt": "a dog", "num_inference_steps": 1, "guidance_scale": 2, "num_images_per_prompt": 2})
    status, answer = call(service, model_dir, body.encode(), "application/octet-stream")
    assert status == 200 and len(pngs(answer["images"])) == 2


def test_form_fields(service, model_dir):
    context = make_context(model_dir, 1, "application/x-www-form-urlencoded")
    [answer] = service.handle([{"prompt": bytearray(b"a cat"), "steps": bytearray(b"1")}], context)
    assert context.get_response_status(0)[0] == 200 and len(pngs(answer["images"])) == 1


def test_kserve_v1_instances(service, model_dir):
    status, answer = call(service, model_dir, {"instances": ["a", {"prompt": "b", "seed": 1, "steps": 1}]})
    assert status == 200
    first, second = answer["predictions"]
    assert len(pngs(first["images"])) == 1 and second["seeds"] == [1]


def test_kserve_v2_request(service, model_dir):
    body = {
        "id": "request-42",
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a cat", "a dog"]}],
        "parameters": {"steps": 2, "seed": 11, "negative_prompt": "blurry"},
    }
    status, answer = call(service, model_dir, body)
    assert status == 200
    outputs = assert_v2_response(answer)
    assert answer["model_name"] == "tiny" and answer["id"] == "request-42" and answer["model_version"] == "1.0"
    assert outputs["images"]["datatype"] == "BYTES" and outputs["images"]["shape"] == [2]
    assert len(pngs(outputs["images"]["data"])) == 2
    assert outputs["seeds"]["data"] == [11, 12]


def test_kserve_v2_settings_as_tensors_and_a_generic_input_name(service, model_dir):
    body = {"inputs": [
        {"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
        {"name": "steps", "datatype": "INT32", "shape": [1], "data": [1]},
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]},
    ]}
    status, answer = call(service, model_dir, body)
    assert status == 200
    outputs = assert_v2_response(answer)
    assert answer["id"] == "req-0"  # no id in the request: TorchServe's request id
    assert outputs["seeds"]["data"] == [5]


def test_kservev2_envelope(service, model_dir):
    """As KServe runs it (TS_SERVICE_ENVELOPE=kservev2): TorchServe's envelope parses and formats."""
    kservev2 = pytest.importorskip("ts.torch_handler.request_envelope.kservev2")
    envelope = kservev2.KServev2Envelope(service.handle)
    body = {"id": "abc", "inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
        {"name": "num_images", "datatype": "INT64", "shape": [1], "data": [2]},
    ]}
    [answer] = envelope.handle([{"body": json.dumps(body).encode()}], make_context(model_dir))
    answer = json.loads(json.dumps(answer))  # as it goes over the wire (tuples become lists)
    outputs = assert_v2_response(answer)
    assert answer["id"] == "abc" and answer["model_name"] == "tiny"
    assert outputs["images"]["datatype"] == "BYTES" and len(pngs(outputs["images"]["data"])) == 2
    assert outputs["seeds"] == {"name": "seeds", "datatype": "INT64", "data": [3, 4], "shape": [2]}


def test_kserve_v1_envelope(service, model_dir):
    kserve = pytest.importorskip("ts.torch_handler.request_envelope.kserve")
    envelope = kserve.KServeEnvelope(service.handle)
    body = {"instances": [{"prompt": "a cat", "steps": 1}, "a dog"]}
    [answer] = envelope.handle([{"body": json.dumps(body).encode()}], make_context(model_dir))
    assert [len(pngs(p["images"])) for p in answer["predictions"]] == [1, 1]


def test_envelope_errors_become_http_400(service, model_dir):
    kservev2 = pytest.importorskip("ts.torch_handler.request_envelope.kservev2")
    from ts.utils.util import PredictionException

    envelope = kservev2.KServev2Envelope(service.handle)
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                       {"name": "steps", "datatype": "INT64", "shape": [1], "data": [99]}]}
    with pytest.raises(PredictionException) as caught:
        envelope.handle([{"body": json.dumps(body).encode()}], make_context(model_dir))
    assert caught.value.error_code == 400 and "'steps' must be between 1 and 3" in caught.value.message


# ------------------------------------------------------------------------ caps and malformed requests


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "a", "steps": 4}, "'steps' must be between 1 and 3 (this model's limit), got 4"),
        ({"prompt": "a", "steps": 0}, "'steps' must be between 1 and 3"),
        ({"prompt": "a", "width": 72}, "'width' must be a multiple of 8 between 8 and 64 (this model's limit), got 72"),
        ({"prompt": "a", "height": 30}, "'height' must be a multiple of 8"),
        ({"prompt": "a", "num_images": 5}, "asks for 5 images (prompts x num_images); the limit is 4 per request"),
        ({"prompt": "a", "num_images": 0}, "'num_images' must be at least 1"),
        ({"instances": ["a", "b", "c", {"prompt": "d", "num_images": 2}]}, "asks for 5 images"),
        ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}],
          "parameters": {"num_images": 2}}, "asks for 6 images"),
        ({"prompt": "a", "guidance": 1000}, "'guidance' must be between 0 and 100"),
        ({"prompt": "a", "seed": -1}, "'seed' must be between 0 and"),
    ],
)
def test_caps(service, model_dir, body, message):
    status, answer = call(service, model_dir, body)
    assert status == 400
    assert answer["code"] == 400 and message in answer["message"]


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        ("", "text/plain", "request body is empty"),
        (bytearray(b"   "), "application/octet-stream", "request body is empty"),
        (bytearray(b'{"prompt": '), "application/json", "request body is not valid JSON"),
        (bytearray(b"\xff\xfe"), "application/octet-stream", "not UTF-8"),
        ([1, 2], "application/json", "JSON body must be an object, got list"),
        ({"promt": "a cat"}, "application/json", "unknown field \"promt\" in JSON request; known fields: prompt,"),
        ({"steps": 2}, "application/json", "JSON request has no 'prompt'"),
        ({"prompt": ["a", "b"]}, "application/json", "'prompt' in JSON request must be a string"),
        ({"prompt": "   "}, "application/json", "'prompt' is empty"),
        ({"prompt": "a", "steps": "many"}, "application/json", "'steps' must be an integer, got \"many\""),
        ({"prompt": "a", "steps": True}, "application/json", "'steps' must be an integer, got true"),
        ({"prompt": "a", "guidance": "high"}, "application/json", "'guidance' must be a number"),
        ({"prompt": "a", "negative_prompt": 3}, "application/json", "'negative_prompt' must be a string"),
        ({"instances": []}, "application/json", "'instances' must be a non-empty list"),
        ({"instances": [5]}, "application/json", "instances[0] must be a prompt string or an object"),
        ({"inputs": []}, "application/json", "v2 request: 'inputs' must be a non-empty list of tensors"),
        ({"inputs": [{"name": "prompt"}]}, "application/json", "inputs[0] must be an object with 'name'"),
        ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "application/json",
         'input "prompt" has shape [2] but 1 values'),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "application/json",
         "no input named 'prompt'"),
        ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "parameters": [1]},
         "application/json", "'parameters' must be an object"),
        ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
          "parameters": {"stepz": 2}}, "application/json", 'unknown field "stepz" in v2 parameters'),
        ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
                     {"name": "negative_prompt", "datatype": "BYTES", "shape": [3], "data": ["x", "y", "z"]}]},
         "application/json", "3 negative prompts for 2 prompts"),
    ],
)
def test_malformed_requests_get_a_400_naming_the_problem(service, model_dir, body, content_type, message):
    status, answer = call(service, model_dir, body, content_type)
    assert status == 400
    assert answer["type"] == "BadRequest" and message in answer["message"], answer["message"]


@pytest.mark.parametrize("row", [{}, {"a photo of a cat": bytearray()}])
def test_curl_default_form_encoding_is_explained(service, model_dir, row):
    """`curl -d 'a photo of a cat'` posts a form; TorchServe hands over no field or one empty one."""
    context = make_context(model_dir, 1, "application/x-www-form-urlencoded")
    [answer] = service.handle([row], context)
    assert context.get_response_status(0)[0] == 400
    assert "form-encoded" in answer["message"] and "Content-Type: text/plain" in answer["message"]


def test_a_bad_request_in_a_batch_does_not_fail_the_others(service, model_dir):
    context = make_context(model_dir, 3)
    bad, good, text = service.handle(
        [{"body": {"prompt": "a", "steps": 50}}, {"body": {"prompt": "a cat", "steps": 1}}, {"body": "a dog"}], context
    )
    assert [context.get_response_status(i)[0] for i in range(3)] == [400, 200, 200]
    assert "'steps'" in bad["message"]
    assert len(pngs(good["images"])) == 1 and len(pngs(text["images"])) == 1
    # ... and the worker keeps serving.
    assert call(service, model_dir, "next", "text/plain")[0] == 200


# ------------------------------------------------------------------------ other families


def test_sdxl_with_refiner(tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    [archive, _] = export_mar(resolve_model(str(tiny_sdxl)), out=tmp_path, name="xl", refiner=str(tiny_sdxl_refiner),
                              archive_format="no-archive", max_steps=3, max_size=64)
    service = H.DiffusionService()
    service.handle(None, make_context(archive))
    assert service.refiner is not None and service.refiner.vae is service.pipe.vae  # shared, loaded once
    status, answer = call(service, archive, {"prompt": "a cat", "steps": 3, "num_images": 2, "seed": 1})
    assert status == 200 and len(pngs(answer["images"])) == 2


def test_sd3_sizes_follow_the_transformer_patch(tiny_sd3, tmp_path):
    service = H.DiffusionService()
    service.handle(None, make_context(tiny_sd3))  # a bare diffusers folder: default limits
    pipe = service.pipe
    expected = max(8, pipe.vae_scale_factor * pipe.transformer.config.patch_size)
    assert service.limits.size_multiple == expected
    status, answer = call(service, tiny_sd3, {"prompt": "a cat", "steps": 1})
    assert status == 200 and len(pngs(answer["images"])) == 1


# ------------------------------------------------------------------------ hostile values (issue 12, items 2 and 3)

HOSTILE = [
    ({"prompt": "a", "steps": "--5"}, "'steps' must be an integer"),
    ({"prompt": "a", "steps": "\u00b2"}, "'steps' must be an integer"),
    ({"prompt": "a", "seed": "9" * 5000}, "'seed' must be an integer"),
    ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"prompt": "a", "guidance": ' + "9" * 401 + "}", "'guidance' must be a number"),
    ({"prompt": "a", "guidance": "9" * 401}, "'guidance' must be a number"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"prompt": "\\ud800"}', "lone surrogate"),
    ({"prompt": "\ud800 cat"}, "lone surrogate"),
    ({"prompt": "a", "x" * 5_000_000: 1}, "unknown field"),
    ("a" * 20_000, "'prompt' is 20000 characters long; the limit is 10000"),
    ('"' + "a" * 20_000 + '"', "'prompt' is 20000 characters long"),
    ("a" * 2_000_000, "request body is 2000000 bytes long; the limit is"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1, -1], "data": ["a"]}]}, "at most one dimension"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "id": "i" * 1000}, "'id' must be"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [{"a": 1}]}]}, "'prompt' must be a string"),
    ({"prompt": "a", "image_format": "jpeg"}, "'image_format' must be one of png, uint8, uint8-hwc"),
]


@pytest.mark.parametrize("body, message", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_get_a_short_400(service, model_dir, body, message, caplog):
    content_type = "text/plain" if isinstance(body, str) and not body.startswith("{") else "application/json"
    with caplog.at_level("INFO"):
        status, answer = call(service, model_dir, body.encode() if isinstance(body, str) else body, content_type)
    assert status == 400 and message in answer["message"], answer["message"][:300]
    assert len(answer["message"]) < 600  # values are cut short in the answer ...
    assert all(len(record.getMessage()) < 800 for record in caplog.records)  # ... and in the log


def test_a_batch_of_hostile_rows_answers_400_for_those_rows_only(service, model_dir):
    rows = [{"prompt": "good", "steps": 1}] + [b for b, _ in HOSTILE[:9]] + [{"prompt": "also good", "steps": 1}]
    context = make_context(model_dir, len(rows))
    answers = service.handle([{"body": b.encode() if isinstance(b, str) else b} for b in rows], context)
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [200] + [400] * 9 + [200]
    assert len(pngs(answers[0]["images"])) == 1 and len(pngs(answers[-1]["images"])) == 1


# ------------------------------------------------------------------------ the seeds' own bodies and client

SEED_BODY = {"id": "42", "inputs": [{"name": "input0", "datatype": "BYTES", "shape": [-1], "data": ["Photo of a dog"]}]}


def seed_client_image(answer: dict) -> np.ndarray:
    """The seeds' notebook line, verbatim apart from the variable names."""
    outputs = answer["outputs"]
    return np.asarray(Image.fromarray(np.array(outputs[0]["data"], dtype="uint8")))


def test_the_seeds_body_and_client_line(service, model_dir):
    status, answer = call(service, model_dir, SEED_BODY)  # dynamic shape, a lone BYTES input named input0
    assert status == 200 and answer["id"] == "42"
    [png] = pngs(assert_v2_response(answer)["images"]["data"])

    body = {**SEED_BODY, "parameters": {"image_format": "uint8-hwc", "seed": answer["outputs"][1]["data"][0]}}
    status, tensor = call(service, model_dir, body)
    outputs = assert_v2_response(tensor)
    assert status == 200 and outputs["images"]["datatype"] == "UINT8" and outputs["images"]["shape"] == [32, 32, 3]
    np.testing.assert_array_equal(seed_client_image(tensor), png)  # the same pixels as the PNG

    status, batch = call(service, model_dir, {**body, "parameters": {"image_format": "uint8", "seed": 1, "num_images": 2}})
    outputs = assert_v2_response(batch)
    assert outputs["images"]["shape"] == [2, 32, 32, 3] and np.array(outputs["images"]["data"]).shape == (2, 32, 32, 3)


def test_uint8_answers_behind_the_kservev2_envelope(service, model_dir):
    kservev2 = pytest.importorskip("ts.torch_handler.request_envelope.kservev2")
    envelope = kservev2.KServev2Envelope(service.handle)
    body = {**SEED_BODY, "inputs": SEED_BODY["inputs"] + [
        {"name": "image_format", "datatype": "BYTES", "shape": [1], "data": ["uint8"]},
        {"name": "seed", "datatype": "INT64", "shape": [-1], "data": [6]}]}
    [answer] = envelope.handle([{"body": json.dumps(body).encode()}], make_context(model_dir))
    answer = json.loads(json.dumps(answer))
    images = assert_v2_response(answer)["images"]
    assert images["datatype"] == "UINT8" and images["shape"] == [32 * 32 * 3]  # the envelope sends it flat
    _, png = call(service, model_dir, {"prompt": "Photo of a dog", "seed": 6})
    np.testing.assert_array_equal(np.array(images["data"], dtype="uint8").reshape(32, 32, 3), pngs(png["images"])[0])
