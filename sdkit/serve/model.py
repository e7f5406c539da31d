"""The whole pipeline as a `kserve.Model`: the TorchServe handler's service behind KServe's routes.

Requests go through the handler's own parser (sdkit.export.handler_requests) and answers through
its formatter (handler_answers): one parser for `.mar` and `sdkit serve`, so caps and errors match.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import kserve
from kserve.errors import InvalidInput

from sdkit.export.handler import DiffusionService
from sdkit.export.handler_answers import format_response
from sdkit.export.handler_requests import RequestError, parse_body, parse_safely, parse_v2, show

logger = logging.getLogger("sdkit.serve")


def v2_body(request) -> dict:
    """KServe's parsed InferRequest back into the v2 JSON body the shared parser reads."""
    return {
        "id": request.id,
        "inputs": [{"name": i.name, "datatype": i.datatype, "shape": list(i.shape), "data": i.data}
                   for i in request.inputs],
        "parameters": dict(request.parameters or {}),
    }


class ServedPipeline(kserve.Model):
    """One text-to-image pipeline; `config` holds sdkit_serve.json's fields with absolute paths."""

    def __init__(self, name: str, config: dict, compile: bool = False):
        super().__init__(name)
        self.config = config
        self.compile = compile  # torch.compile the denoiser(s) before the warm-up (sdkit serve --compile)
        self.service = DiffusionService()
        self.shared_split = None  # the parts of `sdkit serve --split` (sdkit.serve.split_models) share this pipeline

    def load(self) -> bool:
        from sdkit.families import detect_family, family_class
        from sdkit.inference.generate import PhaseTimer

        self.service.load("/", self.config, prepare=self._compile if self.compile else None)
        self.service.initialized = True
        # Per-part times of each request, logged: the pipeline's own modules are hooked (generate --profile's timer).
        self.timer = PhaseTimer(self.service.device)
        self.timer.attach(self.service.pipe, family_class(detect_family(self.config["pipeline"])))
        if self.service.refiner is not None:
            self.timer.attach(self.service.refiner, family_class(detect_family(self.config["refiner"])))
        self.ready = True
        return self.ready

    def _compile(self, pipe) -> None:
        from sdkit.families import detect_family, family_class
        from sdkit.training.compiled import compile_for_inference

        parts = [(pipe, self.config["pipeline"]), (self.service.refiner, self.config.get("refiner"))]
        for part, folder in parts:
            if part is not None:
                compile_for_inference(getattr(part, family_class(detect_family(folder)).denoiser_attr))

    async def predict(self, payload: Any, headers: Optional[dict] = None, response_headers: Optional[dict] = None):
        started = time.perf_counter()
        try:
            if isinstance(payload, kserve.InferRequest):
                request = parse_safely(parse_v2, v2_body(payload), self.service.limits, self.service.defaults)
            else:  # v1 JSON (a dict) or a plain-text body (bytes)
                request = parse_safely(parse_body, payload, self.service.limits, self.service.defaults)
        except RequestError as e:
            logger.info("bad request: %s", e)
            raise InvalidInput(str(e)) from None  # KServe answers 400 {"error": message}
        self.timer.reset()  # requests run one at a time: generation holds the event loop
        results = [self.service.generate(job) for job in request.jobs]
        self.timer.sync()
        parts = ", ".join(f"{phase} {seconds:.3f} s" for phase, seconds in self.timer.totals.items())
        logger.info("sdkit serve: %s %s request, %d image(s): %s, whole %.3f s", self.name, request.kind,
                    sum(job.image_count for job in request.jobs), parts, time.perf_counter() - started)
        request_id = request.request_id or (headers or {}).get("x-request-id") or "request"
        return format_response(request, results, self.name, None, show(request_id).strip('"'))
