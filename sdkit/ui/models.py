"""The models the page generates with: loaded once by sdkit.inference, kept while they fit.

Least recently used models leave first, when more than `max_loaded` are kept or their weights
together pass `max_bytes`. Each kept pipeline has a lock: a diffusers pipeline holds per-call
state (its scheduler's timesteps), so two users of one model take turns while different
models run side by side. A load that fails is not kept; its one-line error is raised again
on every try, so a column shows it and the others keep working.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LoadedModel:
    pipe: object
    refiner: Optional[object]
    info: object  # sdkit.inference.sampling.PipelineInfo
    default_schedulers: tuple  # the schedulers base and refiner came with (scheduler unset)
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelCache:
    def __init__(self, *, max_loaded: int = 2, max_bytes: Optional[int] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None):
        if max_loaded < 1:
            from sdkit.errors import UserError

            raise UserError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self.device, self.dtype = device, dtype
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards the dictionary; loads happen under it (one at a time)

    def get(self, model: str, refiner: Optional[str] = None) -> LoadedModel:
        """The loaded model (loading it when it is not kept), marked most recently used."""
        key = (model, refiner)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self._evict(keep=key)  # the caps may have changed since it loaded
                return self._models[key]
            from sdkit.inference.sampling import load_pipeline, module_bytes

            pipe, refiner_pipe, info = load_pipeline(model, refiner=refiner, device=self.device, dtype=self.dtype)
            nbytes = module_bytes(pipe) + (module_bytes(refiner_pipe) if refiner_pipe is not None else 0)
            schedulers = tuple(p.scheduler for p in (pipe, refiner_pipe) if p is not None)
            entry = LoadedModel(pipe, refiner_pipe, info, schedulers, nbytes)
            self._models[key] = entry
            self._evict(keep=key)
            return entry

    def loaded(self) -> list[tuple]:
        """Keys of the kept models, least recently used first."""
        with self._lock:
            return list(self._models)

    def _evict(self, keep: tuple) -> None:
        evicted = False
        while len(self._models) > 1 and (
            len(self._models) > self.max_loaded
            or (self.max_bytes is not None and sum(m.nbytes for m in self._models.values()) > self.max_bytes)
        ):
            oldest = next(iter(self._models))
            if oldest == keep:
                break
            with self._models[oldest].lock:  # a generation still running on it finishes first
                del self._models[oldest]
            evicted = True
        if evicted:
            from sdkit.inference.sampling import release_memory

            release_memory()
