"""Answers of the TorchServe handler and of `sdkit serve`: base64 PNGs or UINT8 tensors, in the
shape of the request (plain JSON, KServe v1, Open Inference v2, or bare values for an envelope).

Shipped beside the handler in the archive as `sdkit_answers.py`; imports nothing from sdkit.
"""

from __future__ import annotations

import base64
import io
from typing import Optional

try:  # in the archive: the module shipped beside this one
    from sdkit_requests import Request
except ImportError:  # inside the sdkit package
    from sdkit.export.handler_requests import Request

def encode_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_tensor(images: list, image_format: str):
    """UINT8 pixels, [N, H, W, 3] (or [H, W, 3] for one image in "uint8-hwc"), as a numpy array."""
    import numpy as np

    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return pixels[0] if image_format == "uint8-hwc" and len(images) == 1 else pixels


def encode_images(images: list, image_format: str):
    """PIL images as the answer holds them: base64 PNG strings, or nested UINT8 lists (JSON has no arrays)."""
    if image_format == "png":
        return [encode_png(image) for image in images]
    return image_tensor(images, image_format).tolist()


def seeds_output(seeds: list) -> dict:
    """The v2 `seeds` output: one INT64 per image, so a client can reproduce any of them."""
    return {"name": "seeds", "datatype": "INT64", "shape": [len(seeds)], "data": list(seeds)}


def images_output(images: list, image_format: str) -> dict:
    if image_format == "png":
        return {"name": "images", "datatype": "BYTES", "shape": [len(images)], "data": encode_images(images, "png"),
                "parameters": {"content_type": "base64"}}  # MLServer's name for base64-encoded bytes
    pixels = image_tensor(images, image_format)
    # Nested rows, as the protocol allows: np.array(data, dtype="uint8") is the image itself.
    return {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}


def format_response(request: Request, results: list, model_name: str, model_version: Optional[str], request_id: str):
    """results: one (PIL images, seeds) pair per job."""
    if request.kind in ("text", "json"):
        images, seeds = results[0]
        return {"images": encode_images(images, request.jobs[0].image_format), "seeds": seeds}
    if request.kind == "v1":
        predictions = [{"images": encode_images(images, job.image_format), "seeds": seeds}
                       for job, (images, seeds) in zip(request.jobs, results)]
        return predictions if request.enveloped else {"predictions": predictions}
    images, seeds = results[0]
    image_format = request.jobs[0].image_format
    if request.enveloped:  # the kservev2 envelope builds one flat output tensor per returned item
        if image_format == "png":
            return [encode_images(images, "png"), seeds]
        return [image_tensor(images, image_format), seeds]  # a uint8 array: the envelope says UINT8
    response = {
        "model_name": model_name,
        "id": request.request_id or request_id,
        "outputs": [images_output(images, image_format),
                    seeds_output(seeds)],
    }
    if model_version:
        response["model_version"] = model_version
    return response


def error_body(message: str) -> dict:
    return {"code": 400, "type": "BadRequest", "message": message}
