"""One column of the Generate tab: a model's images for the page's settings.

Everything that makes pixels is sdkit.inference's (load_pipeline through the ModelCache,
make_images, png_text/save_png), so an image here equals `sdkit generate` with the same
settings, and `command()` writes that `sdkit generate` line.
"""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from sdkit.errors import UserError


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative_prompt: Optional[str] = None
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    width: Optional[int] = None
    height: Optional[int] = None
    num_images: int = 1
    scheduler: Optional[str] = None  # None: the model's own
    lora_scale: float = 1.0
    refiner: Optional[str] = None


class Stopped(Exception):
    """Raised from the pipeline's step callback when the user pressed Stop: the denoising
    loop ends at that step instead of running to the end."""


class StopFlags:
    """One flag per browser session: Stop stops that user's generation, not everyone's."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            flag = self._flags[session] = threading.Event()
            return flag

    def stop(self, session: str) -> None:
        with self._lock:
            if session in self._flags:
                self._flags[session].set()


def check_settings(s: Settings) -> None:
    """What `sdkit generate` checks before loading, with its messages."""
    from sdkit.inference.generate import check_size
    from sdkit.inference.sampling import check_scheduler_name

    if not s.prompt.strip():
        raise UserError("prompt: type a prompt")
    check_size(s.width, s.height)
    check_scheduler_name(s.scheduler)


def generate_column(cache, model: str, s: Settings, out: Path, *, on_step: Callable[[], None],
                    stop: threading.Event) -> tuple[list[Path], object]:
    """The images of `model` (seeds seed..seed+num_images-1) saved as sdkit's PNGs under `out`,
    and the PipelineInfo they were made with. `on_step` runs after every denoising step."""
    import torch

    from sdkit.inference.generate import REFINER_FRACTION, png_text, save_png
    from sdkit.inference.sampling import check_scheduler_name, make_images, make_scheduler, set_lora_scale

    loaded = cache.get(model, s.refiner)
    info = loaded.info
    check_scheduler_name(s.scheduler, info.family)
    width, height = info.image_size(s.width, s.height)

    def step_end(pipe, step, timestep, tensors):
        if stop.is_set():
            raise Stopped()
        on_step()
        return tensors

    with loaded.lock:
        pipes = [p for p in (loaded.pipe, loaded.refiner) if p is not None]
        for p, own in zip(pipes, loaded.default_schedulers):  # the scheduler and LoRA strength asked for now
            p.scheduler = make_scheduler(s.scheduler, own.config) if s.scheduler else own
        set_lora_scale(loaded.pipe, len(info.loras), s.lora_scale)
        info = replace(info, scheduler=s.scheduler or info.scheduler, lora_scale=s.lora_scale)
        with torch.inference_mode():
            images = make_images(
                loaded.pipe, s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, guidance=s.guidance,
                seed=s.seed, num_images=s.num_images, width=width, height=height, refiner=loaded.refiner,
                refiner_fraction=REFINER_FRACTION, callback_on_step_end=step_end,
            )
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, image in enumerate(images):
        text = png_text(info, prompt=s.prompt, negative_prompt=s.negative_prompt, seed=s.seed + k, steps=s.steps,
                        guidance=s.guidance, width=width, height=height)
        files.append(save_png(image, out, s.prompt, s.seed + k, text))
    return files, info


def command(model: str, s: Settings, width: int, height: int, lora_scale_applies: bool) -> str:
    """The `sdkit generate` line that makes the same images."""
    parts = ["sdkit", "generate", s.prompt, "--model", model, "--seed", str(s.seed), "--steps", str(s.steps),
             "--guidance", f"{s.guidance:g}", "--width", str(width), "--height", str(height)]
    if s.num_images != 1:
        parts += ["--num-images", str(s.num_images)]
    if s.negative_prompt:
        parts += ["--negative-prompt", s.negative_prompt]
    if s.scheduler:
        parts += ["--scheduler", s.scheduler]
    if lora_scale_applies and s.lora_scale != 1.0:
        parts += ["--lora-scale", f"{s.lora_scale:g}"]
    if s.refiner:
        parts += ["--refiner", s.refiner]
    return shlex.join(parts)
