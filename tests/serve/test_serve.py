"""`sdkit serve` on KServe's own model server, started for real on 127.0.0.1 (one server for tests/serve).

The same request parser as the TorchServe handler: the same caps and messages, 400 for bad values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("kserve")
sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from test_handler import HOSTILE, SEED_BODY, assert_v2_response, pngs, seed_client_image  # noqa: E402

from serve_helpers import get, post, without_nulls  # noqa: E402  (the `server` fixture: tests/serve/conftest.py)

pytestmark = pytest.mark.slow  # a server start is ~10 s on an idle machine


def test_health_and_every_protocol(server):
    url, log = server
    assert get(f"{url}/v2/health/live") == 200 and get(f"{url}/v2/health/ready") == 200
    assert get(f"{url}/v1/models/tiny") == 200

    status, answer = post(f"{url}/v1/models/tiny:predict", {"instances": ["a cat", {"prompt": "a dog", "seed": 3}]})
    assert status == 200, answer
    assert [len(pngs(p["images"])) for p in answer["predictions"]] == [1, 1] and answer["predictions"][1]["seeds"] == [3]

    status, answer = post(f"{url}/v1/models/tiny:predict", b"a red circle", "text/plain")
    assert status == 200, answer
    assert len(pngs(answer["images"])) == 1

    status, answer = post(f"{url}/v2/models/tiny/infer", SEED_BODY)  # the seeds' body
    assert status == 200, answer
    # KServe's own response model writes absent optional fields as null; the protocol omits them.
    outputs = assert_v2_response(without_nulls(answer))
    assert answer["id"] == "42" and answer["model_name"] == "tiny"
    [png] = pngs(outputs["images"]["data"])
    seed = outputs["seeds"]["data"][0]

    status, answer = post(f"{url}/v2/models/tiny/infer",
                          {**SEED_BODY, "parameters": {"image_format": "uint8-hwc", "seed": seed}})
    assert status == 200, answer
    np.testing.assert_array_equal(seed_client_image(answer), png)  # the seeds' client line, same pixels
    timings = [line for line in log.read_text().splitlines() if "sdkit serve: tiny " in line]
    assert timings and all(part in timings[-1] for part in ("text encoding", "denoising", "VAE decoding", "whole"))


def test_bad_values_get_the_handlers_400(server):
    url, _ = server
    for body, message in HOSTILE:
        if len(body if isinstance(body, str) else json.dumps(body)) > 1024 * 1024:
            continue
        if isinstance(body, dict) and "inputs" in body:
            status, answer = post(f"{url}/v2/models/tiny/infer", body)
        elif isinstance(body, str) and not body.startswith("{"):
            status, answer = post(f"{url}/v1/models/tiny:predict", body.encode(), "text/plain")
        else:
            status, answer = post(f"{url}/v1/models/tiny:predict", body.encode() if isinstance(body, str) else body)
        assert status == 400, (body if len(str(body)) < 200 else str(body)[:200], answer)
        assert len(json.dumps(answer)) < 1000
    status, answer = post(f"{url}/v1/models/tiny:predict", {"prompt": "a", "steps": 9})
    assert status == 400 and "'steps' must be between 1 and 3 (this model's limit), got 9" in answer["error"]


def test_client_generate_and_bench(server):
    from sdkit.serve.client import ServerError, bench, generate

    url, _ = server
    [image], seeds = generate(url, "tiny", "a red circle", seed=5, steps=2)
    [tensor_image], _ = generate(url, "tiny", "a red circle", seed=5, steps=2, image_format="uint8")
    assert seeds == [5] and image.size == (32, 32)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(tensor_image))
    with pytest.raises(ServerError, match="'steps' must be between 1 and 3"):
        generate(url, "tiny", "a", steps=9)
    report = bench(url, "tiny", "a red circle", n=2, concurrency=2, steps=1)
    assert 0 < report["sequential"]["p50"] <= report["sequential"]["p95"]
    assert report["concurrency 2"]["requests/s"] > 0
