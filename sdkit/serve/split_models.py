"""The parts of a split model as `kserve.Model`s: NAME-text-encoder, NAME-denoiser, NAME-decoder beside NAME.

They share the whole model's loaded pipeline (one copy of the weights) and its parser, caps and 400s; each
request's part time and whole time (parsing and answering included) is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import kserve
from kserve.errors import InvalidInput

from sdkit.export.handler_requests import RequestError
from sdkit.serve.model import v2_body
from sdkit.serve.split import PARTS, SplitPipeline, part_model_name

logger = logging.getLogger("sdkit.serve")


class ServedPart(kserve.Model):
    def __init__(self, name: str, part: str, whole):
        super().__init__(part_model_name(name, part))
        self.part, self.whole = part, whole  # the whole model (ServedPipeline) loads the pipeline
        self.split: Optional[SplitPipeline] = None

    def load(self) -> bool:
        from sdkit.families import detect_family, family_class

        if self.whole.shared_split is None:
            family = family_class(detect_family(self.whole.config["pipeline"]))
            self.whole.shared_split = SplitPipeline(self.whole.service, family)
        self.split = self.whole.shared_split
        self.ready = True
        return self.ready

    async def predict(self, payload: Any, headers: Optional[dict] = None, response_headers: Optional[dict] = None):
        started = time.perf_counter()
        if not isinstance(payload, kserve.InferRequest):
            raise InvalidInput(f"{self.name} speaks the v2 protocol only: POST /v2/models/{self.name}/infer")
        body = v2_body(payload)
        if self.part != "text-encoder":  # tensors: KServe's decoding (JSON or its binary extension)
            body["inputs"] = list(payload.inputs)
        try:
            answer, seconds = getattr(self.split, self.part.replace("-", "_"))(body)
        except RequestError as e:
            logger.info("bad request: %s", e)
            raise InvalidInput(str(e)) from None
        logger.info("sdkit serve: %s request: %s %.3f s, whole %.3f s", self.name, self.part, seconds,
                    time.perf_counter() - started)
        return {"model_name": self.name, "id": answer.pop("id", None) or payload.id or "request", **answer}


def part_models(name: str, whole) -> list:
    return [ServedPart(name, part, whole) for part in PARTS]
