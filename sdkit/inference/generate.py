"""`sdkit generate`: images from a model (+ LoRA, + SDXL refiner), with their settings inside.

Every PNG carries what made it (prompt, seed, steps, model, LoRA ...) as PNG text chunks,
plus an AUTOMATIC1111-style `parameters` chunk that image viewers and other SD tools show.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError

REFINER_FRACTION = 0.8  # share of the steps the SDXL base runs before the refiner takes over


def generate_command(
    *,
    prompts: list[str],
    model: str,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
    refiner: Optional[str] = None,
    negative_prompt: Optional[str] = None,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    width: Optional[int] = None,
    height: Optional[int] = None,
    num_images: int = 1,
    batch_size: int = 1,
    scheduler: Optional[str] = None,
    out: Path = Path("outputs"),
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    profile: bool = False,
    compile: bool = False,
    embeddings: tuple = (),
) -> list[Path]:
    """Generate `num_images` images per prompt (seeds seed..seed+num_images-1); returns the files."""
    from sdkit.inference.sampling import check_scheduler_name, load_pipeline, make_images

    check_scheduler_name(scheduler)  # before any weights load
    if refiner and batch_size > 1:
        raise UserError("--batch-size: with --refiner images are made one at a time; drop one of the two")
    started = time.perf_counter()
    pipe, refiner_pipe, info = load_pipeline(
        model, lora=lora, lora_scale=lora_scale, refiner=refiner, scheduler=scheduler, device=device, dtype=dtype,
        compile=compile, embeddings=embeddings,
    )
    load_seconds = time.perf_counter() - started
    width, height = info.image_size(width, height)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer.attached(info, pipe, refiner_pipe) if profile else None
    import torch

    written: list[Path] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            images = make_images(
                pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                num_images=num_images, width=width, height=height, refiner=refiner_pipe,
                refiner_fraction=REFINER_FRACTION, batch_size=batch_size,
            )
            for k, image in enumerate(images):
                text = png_text(
                    info, prompt=prompt, negative_prompt=negative_prompt, seed=seed + k, steps=steps,
                    guidance=guidance, width=width, height=height,
                )
                path = save_png(image, out, prompt, seed + k, text)
                written.append(path)
                print(f"wrote {path}", flush=True)
    if timer:
        print(timer.finish(started, load_seconds, len(written), info, steps, width, height))
    return written


def check_size(width: Optional[int], height: Optional[int]) -> None:
    """--width/--height, before any model loads (the model's own multiple is checked once it
    has loaded: PipelineInfo.image_size). `sdkit ui` asks the same, so the messages match."""
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"{name} must be a positive multiple of 8, got {value}")


# ---------------------------------------------------------------------------- files


def slugify(prompt: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def png_info(text: dict[str, str]):
    """PNG text chunks: tEXt, or iTXt (UTF-8) when the text is not Latin-1."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def save_png(image, out: Path, prompt: str, seed: int, text: dict[str, str]) -> Path:
    """`<slug>-<seed>.png`, or `<slug>-<seed>-2.png` ... when that name is taken: never overwrites."""
    info = png_info(text)
    stem = f"{slugify(prompt)}-{seed}"
    n = 1
    while True:
        path = out / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
        try:
            with open(path, "xb") as f:  # exclusive create: a parallel run cannot clobber it either
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            n += 1


def png_text(info, *, prompt, negative_prompt, seed, steps, guidance, width, height) -> dict[str, str]:
    """Text chunks for one image: one key per setting, plus A1111's `parameters`."""
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "model": info.model,
        "base_model": info.base if info.base != info.model else "",
        "lora": ", ".join(info.loras),
        "lora_scale": info.lora_scale if info.loras else "",
        "embeddings": ", ".join(info.embeddings),
        "refiner": info.refiner or "",
        "refiner_fraction": REFINER_FRACTION if info.refiner else "",
        "scheduler": info.scheduler,
        "width": width,
        "height": height,
        "dtype": info.dtype,
        "sdkit_version": sdkit_version(),
    }
    text = {key: str(value) for key, value in fields.items()}
    text["parameters"] = a1111_parameters(info, fields)
    return text


def sdkit_version() -> str:
    try:
        from sdkit import __version__
    except ImportError:  # an editable install that maps `sdkit` as a namespace package
        from importlib.metadata import version

        return version("sdkit")
    return __version__


def a1111_parameters(info, fields: dict) -> str:
    """The `parameters` text AUTOMATIC1111 writes: prompt, negative prompt, then `Key: value, ...`."""
    from sdkit.inference.sampling import A1111_SAMPLER_NAMES

    pairs = [
        ("Steps", fields["steps"]),
        ("Sampler", A1111_SAMPLER_NAMES.get(info.scheduler, info.scheduler)),
        ("CFG scale", fields["guidance"]),
        ("Seed", fields["seed"]),
        ("Size", f"{fields['width']}x{fields['height']}"),
        ("Model", info.model),
    ]
    if info.loras:
        pairs += [("Lora", ", ".join(info.loras)), ("Lora scale", info.lora_scale)]
    if info.refiner:
        pairs += [("Refiner", info.refiner), ("Refiner switch at", REFINER_FRACTION)]
    pairs.append(("Version", f"sdkit {fields['sdkit_version']}"))
    lines = [fields["prompt"]]
    if fields["negative_prompt"]:
        lines.append(f"Negative prompt: {fields['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in pairs))
    return "\n".join(lines)


def _a1111_quote(value) -> str:
    # A1111 splits on ", " and ": ": values holding those characters are quoted (JSON style).
    text = str(value)
    if any(ch in text for ch in ",:\n\""):
        import json

        return json.dumps(text)
    return text


# ---------------------------------------------------------------------------- --profile

PHASES = ("text encoding", "denoising", "VAE decoding")


class PhaseTimer:
    """Wall time spent in the text encoders, the denoising loop and the VAE decoder.

    Hooks on the pipeline's own modules (and the VAE's `decode`) mark where each phase
    starts and ends; on a GPU each mark synchronizes first, so queued kernels are counted
    in the phase that launched them. Denoising is the span from a denoiser call's start to
    the last call's end, so the scheduler steps between calls count too. With model
    offload, moving a model onto the GPU counts in the phase that needed it.
    """

    def __init__(self, device: str):
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._handles: list = []
        self._hooked: list = []
        self._patched: list = []
        self._loop_end: Optional[float] = None  # end of the previous denoiser call of this loop
        self._starts: dict[int, float] = {}

    @classmethod
    def attached(cls, info, pipe, refiner_pipe=None) -> "PhaseTimer":
        """A timer on load_pipeline's pipelines (its PipelineInfo names their families), peak memory reset."""
        from sdkit.families import family_class

        timer = cls(info.device)
        timer.attach(pipe, family_class(info.family))
        if refiner_pipe is not None:
            timer.attach(refiner_pipe, family_class(info.refiner_family))
        timer.reset_peak()
        return timer

    # -- wiring
    def attach(self, pipe, family) -> None:
        """Time `pipe`'s parts; `family` (a Family class) says which components they are."""
        for name in family.all_text_encoder_attrs:
            module = getattr(pipe, name, None)
            if module is not None:  # SD3 without T5, an SDXL refiner without the first CLIP
                self._hook(module, "text encoding")
        self._hook(getattr(pipe, family.denoiser_attr), "denoising")
        self._wrap_decode(pipe.vae)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for vae in self._patched:
            del vae.decode  # the instance attribute; the class method shows through again
        self._handles, self._hooked, self._patched = [], [], []

    def _hook(self, module, phase: str) -> None:
        if any(hooked is module for hooked in self._hooked):
            return  # a module two pipelines share (the SDXL refiner's text_encoder_2): timed once
        self._hooked.append(module)

        def before(mod, args):
            self._begin(id(mod), phase)

        def after(mod, args, output):
            self._end(id(mod), phase)

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after))

    def _wrap_decode(self, vae) -> None:
        if vae is None or vae in self._patched:
            return
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            self._begin(id(vae), "VAE decoding")
            try:
                return decode(*args, **kwargs)
            finally:
                self._end(id(vae), "VAE decoding")

        vae.decode = timed_decode
        self._patched.append(vae)

    # -- measuring
    def reset(self) -> None:
        """Start counting afresh (`sdkit serve` times each request)."""
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._loop_end, self._starts = None, {}

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            torch.mps.synchronize()

    def _begin(self, key: int, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        if phase == "denoising":
            if self._loop_end is not None:  # the scheduler step between two denoiser calls
                self.totals["denoising"] += now - self._loop_end
        else:
            self._loop_end = None  # another phase ran: the next denoiser call starts a new loop
        self._starts[key] = now

    def _end(self, key: int, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] += now - self._starts.pop(key)
        if phase == "denoising":
            self._loop_end = now

    # -- memory
    def reset_peak(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> str:
        import torch

        from sdkit.units import format_bytes, peak_rss_bytes

        if self.device.startswith("cuda"):
            return f"{format_bytes(torch.cuda.max_memory_allocated(self.device))} (CUDA max allocated while generating)"
        return f"{format_bytes(peak_rss_bytes())} (process peak RSS, loading included)"

    def finish(self, started: float, load: float, n_images: int, info, steps: int, width: int, height: int) -> str:
        """Wait for queued work, unhook, and report the time since `started` (perf_counter)."""
        self.sync()
        total = time.perf_counter() - started
        self.detach()
        return self.report(total, load, n_images, info, steps, width, height)

    def report(self, total: float, load: float, n_images: int, info, steps: int, width: int, height: int) -> str:
        n = max(n_images, 1)
        lines = [
            f"profile: {n_images} image(s), {steps} steps, {width}x{height}, {info.device} {info.dtype}"
            f" ({info.placement})",
            f"  {'load':<14} {load:9.3f} s   (imports and weights, once per run)",
        ]
        for phase in PHASES:
            lines.append(f"  {phase:<14} {self.totals[phase]:9.3f} s   {self.totals[phase] / n:8.3f} s/image")
        other = max(total - sum(self.totals.values()), 0.0)
        lines.append(f"  {'other':<14} {other:9.3f} s   (noise, scheduler set-up, image conversion, saving)")
        lines.append(f"  {'total':<14} {total:9.3f} s   {total / n:8.3f} s/image")
        lines.append(f"  {'peak memory':<14} {self.peak_memory()}")
        return "\n".join(lines)
