"""A small client for `sdkit serve` (and the `.mar` behind KServe): images from the v2 protocol, and a
`bench` that sends N sequential and K concurrent requests and reports p50/p95 latency.

    from sdkit.serve.client import bench, generate, generate_split
    images, seeds = generate("http://127.0.0.1:8080", "tiny", "a red circle", seed=3, steps=25)
    print(bench("http://127.0.0.1:8080", "tiny", "a red circle", n=20, concurrency=4, steps=25))
    # the parts of `sdkit serve --split`: any part at a URL, the others in this process from `model`
    images, seeds = generate_split({"denoiser": "http://127.0.0.1:8080/v2/models/tiny"}, "a red circle",
                                   model="tiny-folder", seed=3, steps=25)
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from sdkit.serve.split import DENOISER_SETTINGS, PARTS as SPLIT_PARTS  # no torch at import


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def prompt_tensor(prompt, name: str = "prompt") -> dict:
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return {"name": name, "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}


def post_v2(infer_url: str, body: dict, *, timeout: float = 600.0) -> dict:
    """POST a v2 body to a model's .../infer URL; the answer as JSON, or ServerError."""
    request = urllib.request.Request(infer_url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise ServerError(e.code, e.read()[:500].decode(errors="replace")) from None


def infer(url: str, model: str, prompt: str, *, timeout: float = 600.0, **parameters) -> dict:
    """One v2 request; the answer as JSON. Parameters: steps, guidance, seed, width, height, num_images, ..."""
    body = {"inputs": [prompt_tensor(prompt)], "parameters": parameters}
    return post_v2(f"{url.rstrip('/')}/v2/models/{model}/infer", body, timeout=timeout)


def decode_images(images: dict) -> list:
    """PIL images from a v2 `images` output, whether it holds PNGs or a UINT8 tensor."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    if images["datatype"] == "BYTES":
        return [Image.open(io.BytesIO(base64.b64decode(item))) for item in images["data"]]
    pixels = np.array(images["data"], dtype="uint8").reshape(images["shape"])
    return [Image.fromarray(p) for p in (pixels if pixels.ndim == 4 else pixels[None])]


def generate(url: str, model: str, prompt: str, **parameters) -> tuple[list, list]:
    """(PIL images, seeds) from the whole model's v2 answer."""
    outputs = {o["name"]: o for o in infer(url, model, prompt, **parameters)["outputs"]}
    return decode_images(outputs["images"]), outputs["seeds"]["data"]


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency_summary(seconds: list) -> dict:
    return {"p50": statistics.median(seconds), "p95": percentile(seconds, 95)}


def timed(function, *args) -> float:
    """Seconds `function(*args)` took."""
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def bench(url: str, model: str, prompt: str, *, n: int = 10, concurrency: int = 1, **parameters) -> dict:
    """n sequential requests, then n more from `concurrency` threads; p50/p95 whole latency in seconds."""
    def one(i: int) -> float:
        return timed(lambda: infer(url, model, prompt, seed=i, **parameters))

    sequential = [one(i) for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        concurrent = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return {
        "sequential": latency_summary(sequential),
        f"concurrency {concurrency}": {**latency_summary(concurrent), "requests/s": n / wall},
    }


# ---------------------------------------------------------------------------- split models
# A chain of the parts of `sdkit serve --split`: each part at a URL, or in this process (from `model`).
# A part's URL is the model's: http://HOST:PORT/v2/models/NAME (the parts are NAME-text-encoder ...), or the
# part's own http://HOST:PORT/v2/models/NAME-denoiser.



def part_infer_url(url: str, part: str) -> str:
    """The .../infer URL of `part` from a model URL (whole model's or the part's own)."""
    base, marker, name = url.rstrip("/").removesuffix("/infer").partition("/v2/models/")
    if not marker or not name or "/" in name or not base.startswith(("http://", "https://")):
        raise ValueError(f"'{url}' is not a model URL: http://HOST:PORT/v2/models/NAME")
    return f"{base}/v2/models/{name if name.endswith('-' + part) else f'{name}-{part}'}/infer"


def split_endpoints(values: list) -> dict:
    """`--endpoint` values: one URL for every part, or PART=URL each (parts not named run in this process)."""
    if len(values) == 1 and "=" not in values[0].split("://")[0]:
        return {part: part_infer_url(values[0], part) for part in SPLIT_PARTS}
    endpoints = {}
    for value in values:
        part, sep, url = value.partition("=")
        if not sep or part not in SPLIT_PARTS:
            raise ValueError(f"'{value}': give one URL for all parts, or PART=URL with PART one of {', '.join(SPLIT_PARTS)}")
        if part in endpoints:
            raise ValueError(f"'{part}' given twice")
        endpoints[part] = part_infer_url(url, part)
    return endpoints


class SplitChain:
    """text encoder -> denoiser -> decoder; `endpoints` maps a part to its URL (a model URL or .../infer),
    the other parts run in this process from `model` (or `local`, an sdkit.serve.split.SplitPipeline)."""

    def __init__(self, endpoints: dict, model=None, *, local=None, timeout: float = 600.0):
        self.endpoints = {part: url if url.endswith("/infer") else part_infer_url(url, part)
                          for part, url in endpoints.items()}
        unknown = set(self.endpoints) - set(SPLIT_PARTS)
        if unknown:
            raise ValueError(f"unknown part {sorted(unknown)[0]!r}; parts: {', '.join(SPLIT_PARTS)}")
        self.timeout = timeout
        self.local = local
        if self.local is None and len(self.endpoints) < len(SPLIT_PARTS):
            if model is None:
                raise ValueError("a part without a URL runs in this process: give the model")
            from sdkit.serve.split import load_split

            self.local = load_split(model)

    def call(self, part: str, body: dict) -> dict:
        if part in self.endpoints:
            return post_v2(self.endpoints[part], body, timeout=self.timeout)
        from sdkit.export.handler_requests import RequestError

        try:
            return getattr(self.local, part.replace("-", "_"))(body)[0]
        except RequestError as e:  # the answer a server would give
            raise ServerError(400, str(e)) from None

    def run(self, prompt, *, negative_prompt=None, **settings) -> tuple[list, list, dict]:
        """(PIL images, seeds, seconds per part); settings: steps, guidance, seed, width, height, num_images."""
        unknown = set(settings) - set(DENOISER_SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting {sorted(unknown)[0]!r}; settings: {', '.join(DENOISER_SETTINGS)}")
        seconds = {}
        inputs = [prompt_tensor(prompt)]
        if negative_prompt is not None:
            inputs.append(prompt_tensor(negative_prompt, "negative_prompt"))
        embeddings = self._timed(seconds, "text-encoder", {"inputs": inputs})
        denoised = self._timed(seconds, "denoiser", {"inputs": embeddings["outputs"],
                                                    "parameters": {k: v for k, v in settings.items() if v is not None}})
        # Raw pixels from a local decoder; PNG (lossless, smaller) over the network.
        image_format = "png" if "decoder" in self.endpoints else "uint8"
        decoded = self._timed(seconds, "decoder", {"inputs": denoised["outputs"],
                                                  "parameters": {"image_format": image_format}})
        outputs = {o["name"]: o for o in decoded["outputs"]}
        return decode_images(outputs["images"]), outputs["seeds"]["data"], seconds

    def _timed(self, seconds: dict, part: str, body: dict) -> dict:
        started = time.perf_counter()
        answer = self.call(part, body)
        seconds[part] = time.perf_counter() - started
        return answer


def generate_split(endpoints: dict, prompt, *, model=None, negative_prompt=None, **settings) -> tuple[list, list]:
    """(PIL images, seeds) through the parts: `endpoints` {"text-encoder": URL, "denoiser": URL, "decoder": URL},
    any of them left out runs in this process from `model` (a folder or hub id)."""
    images, seeds, _ = SplitChain(endpoints, model).run(prompt, negative_prompt=negative_prompt, **settings)
    return images, seeds
