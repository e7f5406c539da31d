"""What a served model does when a request does not say: generation defaults, the SDXL refiner's
split, steps and device, timeouts, the weights' dtype and the Python packages the server needs.

Shared by `sdkit export --format mar` (written into the archive's sdkit_serve.json,
config.properties and requirements.txt) and `sdkit serve` / `--format kserve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from sdkit.errors import UserError

IMAGE_FORMATS = ("png", "uint8", "uint8-hwc")  # must match handler_requests.IMAGE_FORMATS
REFINER_DEVICES = ("same", "cpu")
DTYPES = ("fp16", "bf16", "fp32")
# What the handler imports beyond torch (which the stock KServe TorchServe image ships).
SERVING_PACKAGES = ("diffusers", "transformers", "safetensors", "accelerate", "tokenizers")


@dataclass
class ServeSettings:
    steps: Optional[int] = None  # None: 30, capped at the export's max steps
    width: Optional[int] = None  # None: the model's native size
    height: Optional[int] = None
    guidance: Optional[float] = None  # None: the pipeline's own default
    negative_prompt: Optional[str] = None
    image_format: str = "png"
    refiner_start: float = 0.8  # the share of the steps the base model runs before the refiner takes over
    refiner_steps: Optional[int] = None  # None: the request's steps
    refiner_device: str = "same"  # "cpu" keeps the refiner off the GPU, as large SDXL set-ups do
    startup_timeout: int = 1200  # s: loading SDXL from a network volume takes minutes
    response_timeout: int = 600  # s: a 50-step 1024 px batch on a small GPU
    dtype: Optional[str] = None  # None: local safetensors as stored, anything re-saved in fp16
    requirements: bool = True  # ship requirements.txt and let TorchServe install it per model

    def check(self, *, max_steps: int, max_size: int, refiner: bool) -> "ServeSettings":
        """Every problem a one-line UserError naming the flag, before any weights load."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype: '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.image_format not in IMAGE_FORMATS:
            raise UserError(f"--image-format: '{self.image_format}' is not one of {', '.join(IMAGE_FORMATS)}")
        if self.steps is not None and not 1 <= self.steps <= max_steps:
            raise UserError(f"--steps: must be between 1 and --max-steps ({max_steps}), got {self.steps}")
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and (value % 8 or not 8 <= value <= max_size):
                raise UserError(f"{flag}: must be a multiple of 8 between 8 and --max-size ({max_size}), got {value}")
        if self.guidance is not None and not 0 <= self.guidance <= 100:
            raise UserError(f"--guidance: must be between 0 and 100, got {self.guidance}")
        if self.negative_prompt is not None and len(self.negative_prompt) > 10_000:
            raise UserError("--negative-prompt: at most 10,000 characters")
        for flag, value in (("--startup-timeout", self.startup_timeout), ("--response-timeout", self.response_timeout)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag}: must be a positive number of seconds, got {value}")
        refiner_flags = (self.refiner_start != 0.8, self.refiner_steps is not None, self.refiner_device != "same")
        if any(refiner_flags) and not refiner:
            raise UserError("--refiner-start/--refiner-steps/--refiner-device: only used with --refiner")
        if not 0 < self.refiner_start < 1:
            raise UserError(f"--refiner-start: must be between 0 and 1 (the base's share of the steps), got {self.refiner_start}")
        if self.refiner_steps is not None and not 1 <= self.refiner_steps <= max_steps:
            raise UserError(f"--refiner-steps: must be between 1 and --max-steps ({max_steps}), got {self.refiner_steps}")
        if self.refiner_device not in REFINER_DEVICES:
            raise UserError(f"--refiner-device: '{self.refiner_device}' is not one of {', '.join(REFINER_DEVICES)}")
        return self

    def defaults(self, max_steps: int) -> dict:
        """The handler's `defaults` (sdkit_serve.json)."""
        return {
            "steps": min(self.steps or 30, max_steps), "width": self.width, "height": self.height,
            "guidance": self.guidance, "negative_prompt": self.negative_prompt, "image_format": self.image_format,
        }

    def refiner_config(self) -> dict:
        return {"refiner_start": self.refiner_start, "refiner_steps": self.refiner_steps,
                "refiner_device": "cpu" if self.refiner_device == "cpu" else None}


def requirements_text(*, peft: bool) -> str:
    """requirements.txt: the versions this export was made and tested with (torch: the image's own)."""
    names = SERVING_PACKAGES + (("peft",) if peft else ())
    lines = ["# Installed by TorchServe when install_py_dep_per_model=true (written by sdkit export).",
             "# torch is left out on purpose: the serving image's build matches its GPU driver."]
    for name in names:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(name)
    return "\n".join(lines) + "\n"
