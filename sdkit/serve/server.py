"""`sdkit serve MODEL`: start KServe's ModelServer (uvicorn, no Kubernetes) with sdkit's models.

Routes are KServe's own: GET /v2/health/live, /v2/health/ready, /v2/models/NAME/ready,
POST /v1/models/NAME:predict and /v2/models/NAME/infer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError, first_line, shorten


def pipeline_config(model: str, *, lora: Optional[str] = None, refiner: Optional[str] = None,
                    max_steps: int = 50, max_size: int = 1024, max_batch: int = 4, settings=None) -> dict:
    """sdkit_serve.json's fields for a hub id, folder, run folder or LoRA (absolute paths)."""
    from sdkit.export.serve_settings import ServeSettings
    from sdkit.inference.loading import local_lora_file, resolve_lora, resolve_model

    settings = (settings or ServeSettings()).check(max_steps=max_steps, max_size=max_size, refiner=bool(refiner))
    resolved = resolve_model(model)
    lora_ref = resolve_lora(lora) if lora else resolved.lora
    config = {
        "pipeline": _local_folder(resolved.base),
        "lora": local_lora_file(lora_ref) if lora_ref else None,
        "refiner": _local_folder(resolve_model(refiner, key="--refiner").base) if refiner else None,
        "limits": {"max_steps": max_steps, "max_size": max_size, "max_batch": max_batch},
        "defaults": settings.defaults(max_steps),
        **(settings.refiner_config() if refiner else {}),
    }
    return config


def _local_folder(ref: str) -> str:
    """A local diffusers folder; a hub id is fetched into the Hugging Face cache first."""
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        return str(path.resolve())
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(ref))
    except Exception as e:  # noqa: BLE001  offline, unknown id, gated model
        raise UserError(f"--model: cannot fetch '{ref}': {type(e).__name__}: {shorten(first_line(e))}") from None


def model_name(model: str, name: Optional[str]) -> str:
    from sdkit.export.run import check_name, default_name
    from sdkit.inference.loading import resolve_model

    return check_name(name or default_name(resolve_model(model)))


def build_models(model: str, *, name: Optional[str] = None, split: bool = False, compile: bool = False,
                 **kwargs) -> list:
    """The kserve.Model objects `sdkit serve` serves: the whole pipeline, and with `split` its three parts
    (NAME-text-encoder, NAME-denoiser, NAME-decoder; they share its weights). Load them in this order."""
    from sdkit.serve.model import ServedPipeline

    name = model_name(model, name)
    whole = ServedPipeline(name, pipeline_config(model, **kwargs), compile=compile)
    if not split:
        return [whole]
    from sdkit.serve.split_models import part_models

    return [whole, *part_models(name, whole)]


def serve_command(model: str, *, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
                  name: Optional[str] = None, **kwargs) -> None:
    """Load the models, then serve until stopped (Ctrl-C / SIGTERM)."""
    try:
        import kserve  # noqa: F401
    except ImportError:
        raise UserError("sdkit serve needs KServe: pip install 'sdkit-recipes[serve]'") from None
    _log_to_stderr()
    models = build_models(model, name=name, **kwargs)
    for m in models:
        m.load()
    start_server(models, host=host, port=port, workers=workers)


def _log_to_stderr() -> None:
    """sdkit's own lines (per-request timings, bad requests) beside KServe's, which configures only its loggers."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    for name in ("sdkit", "sdkit_handler"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)


def start_server(models: list, *, host: str, port: int, workers: int = 1) -> None:
    import kserve
    from kserve import model_server
    from kserve.protocol.rest.server import RESTServer

    class BoundRESTServer(RESTServer):
        # KServe 0.21 binds 0.0.0.0 unconditionally; --host (127.0.0.1 by default) must be honoured.
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.config.host = host

    model_server.RESTServer = BoundRESTServer
    kserve.ModelServer(http_port=port, workers=workers, enable_grpc=False).start(models)
