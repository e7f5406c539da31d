"""A small client for `sdkit serve` (and the `.mar` behind KServe): images from the v2 protocol, and a
`bench` that sends N sequential and K concurrent requests and reports p50/p95 latency.

    from sdkit.serve.client import generate, bench
    images, seeds = generate("http://127.0.0.1:8080", "tiny", "a red circle", seed=3, steps=25)
    print(bench("http://127.0.0.1:8080", "tiny", "a red circle", n=20, concurrency=4, steps=25))
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def infer(url: str, model: str, prompt: str, *, timeout: float = 600.0, **parameters) -> dict:
    """One v2 request; the answer as JSON. Parameters: steps, guidance, seed, width, height, num_images, ..."""
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
            "parameters": parameters}
    request = urllib.request.Request(f"{url.rstrip('/')}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise ServerError(e.code, e.read()[:500].decode(errors="replace")) from None


def generate(url: str, model: str, prompt: str, **parameters) -> tuple[list, list]:
    """(PIL images, seeds) from a v2 answer, whether it holds PNGs or a UINT8 tensor."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    outputs = {o["name"]: o for o in infer(url, model, prompt, **parameters)["outputs"]}
    images = outputs["images"]
    if images["datatype"] == "BYTES":
        decoded = [Image.open(io.BytesIO(base64.b64decode(item))) for item in images["data"]]
    else:
        pixels = np.array(images["data"], dtype="uint8").reshape(images["shape"])
        decoded = [Image.fromarray(p) for p in (pixels if pixels.ndim == 4 else pixels[None])]
    return decoded, outputs["seeds"]["data"]


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def bench(url: str, model: str, prompt: str, *, n: int = 10, concurrency: int = 1, **parameters) -> dict:
    """n sequential requests, then n more from `concurrency` threads; p50/p95 whole latency in seconds."""
    def one(i: int) -> float:
        started = time.perf_counter()
        infer(url, model, prompt, seed=i, **parameters)
        return time.perf_counter() - started

    sequential = [one(i) for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        concurrent = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return {
        "sequential": {"p50": statistics.median(sequential), "p95": percentile(sequential, 95)},
        f"concurrency {concurrency}": {"p50": statistics.median(concurrent), "p95": percentile(concurrent, 95),
                                        "requests/s": n / wall},
    }
