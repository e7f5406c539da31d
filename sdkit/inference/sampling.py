"""Building a pipeline from a model reference, and making images with it.

Shared by `sdkit generate`, `sdkit eval` and the trainer's validation images. torch and
diffusers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sdkit.errors import UserError
from sdkit.units import GIB

# --scheduler name -> (diffusers class, config overrides), by the objective a family trains with
# (its `objective`): DDPM-trained families take the first group, flow-matching ones the second.
DDPM_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
FLOW_SCHEDULERS = {
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
SCHEDULERS = {**DDPM_SCHEDULERS, **FLOW_SCHEDULERS}
SCHEDULERS_BY_OBJECTIVE = {"ddpm": DDPM_SCHEDULERS, "flow": FLOW_SCHEDULERS}

# Sampler names AUTOMATIC1111 / ComfyUI users read in the `parameters` text chunk.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler-a": "Euler a",
    "heun": "Heun", "dpm++": "DPM++ 2M", "dpm++-karras": "DPM++ 2M Karras", "unipc": "UniPC",
    "flow-euler": "Euler", "flow-heun": "Heun",
}

# Room left on the GPU for activations and the VAE decode (SDXL at 1024 px peaks at a few
# GiB in the decoder) when deciding whether base and refiner can both stay resident.
ACTIVATION_RESERVE_BYTES = 4 * GIB

DTYPE_NAMES = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


@dataclass
class PipelineInfo:
    """What was loaded and how; written into image metadata and reports."""

    model: str  # as the user typed it
    base: str  # the diffusers model it resolved to
    family: str
    loras: list[str] = field(default_factory=list)
    lora_scale: float = 1.0
    embeddings: list[str] = field(default_factory=list)  # textual-inversion files (sdkit.inference.embeddings)
    refiner: Optional[str] = None
    refiner_family: Optional[str] = None
    scheduler: str = ""  # sdkit name (or diffusers class name when it has none)
    device: str = "cpu"
    dtype: str = "float32"
    width: int = 512  # the model's native size, used when none is asked for
    height: int = 512
    size_multiple: int = 8  # width/height must be multiples of this
    placement: str = "cpu"  # "cuda", "model offload", "cpu", "mps"

    def image_size(self, width: Optional[int], height: Optional[int], model: str = "this model") -> tuple[int, int]:
        """The size to generate at: the native size unless asked for; each side a multiple the model takes."""
        width, height = width or self.width, height or self.height
        for name, value in (("--width", width), ("--height", height)):
            if value % self.size_multiple:
                raise UserError(f"{name} must be a multiple of {self.size_multiple} for {model}, got {value}")
        return width, height


# ---------------------------------------------------------------------------- choices


def check_scheduler_name(name: Optional[str], family: Optional[str] = None) -> None:
    """Fail before loading anything when --scheduler is unknown or wrong for the family."""
    if name is None:
        return
    if family is None:
        valid = SCHEDULERS
    else:
        from sdkit.families import family_class

        valid = SCHEDULERS_BY_OBJECTIVE[family_class(family).objective]
    if name not in valid:
        if name in SCHEDULERS:
            what = f"'{name}' does not work with {family} models"
        else:
            what = f"unknown scheduler '{name}'"
        raise UserError(f"--scheduler: {what} (choose from: {', '.join(valid)})")


def pick_device(forced: Optional[str] = None) -> str:
    """cuda > mps > cpu, unless forced (then checked to exist)."""
    import torch

    if forced:
        kind = forced.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {forced}: CUDA is not available on this machine")
        if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"--device {forced}: MPS is not available on this machine")
        if kind not in ("cuda", "mps", "cpu"):
            raise UserError(f"--device: unknown device '{forced}' (cuda, cuda:N, mps or cpu)")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, forced: Optional[str] = None):
    """CUDA: bf16 where the GPU supports it, else fp16; elsewhere fp32. `forced` wins."""
    import torch

    if forced:
        if forced.lower() not in DTYPE_NAMES:
            raise UserError(f"--dtype: unknown dtype '{forced}' (fp16, bf16 or fp32)")
        return torch_dtype(forced)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def torch_dtype(name: str):
    """torch.float16 from 'fp16', 'half', 'float16' ... (any key of DTYPE_NAMES)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name.lower()])


# ---------------------------------------------------------------------------- loading


def load_pipeline(
    model_ref: str,
    *,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
    refiner: Optional[str] = None,
    scheduler: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    offload: Optional[bool] = None,
    compile: bool = False,
    embeddings: tuple = (),
):
    """(pipe, refiner_pipe or None, PipelineInfo) ready to generate on the chosen device.
    `compile`: torch.compile the denoiser(s) (the first image then waits for the compile).

    `model_ref` is a hub id, a diffusers folder or a training run folder (a LoRA run loads
    its base model plus its LoRA). `offload=None` decides by free GPU memory whether base
    and refiner both stay on the GPU or move there only while they run.
    """
    refs = _check_refs(model_ref, lora, refiner, scheduler)
    from sdkit.families import family_class
    from sdkit.inference.embeddings import add_embedding, read_embedding

    family_cls = family_class(refs.family)
    found = [read_embedding(ref, family_cls) for ref in embeddings]  # before any weights load
    device_name = pick_device(device)
    weights_dtype = pick_dtype(device_name, dtype)
    quiet_loading()

    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    from sdkit.inference.loading import load_lora

    extra = family_cls.pipeline_load_kwargs()
    pipe = AutoPipelineForText2Image.from_pretrained(refs.base, **dtype_kwarg(weights_dtype), **extra)
    for i, path in enumerate(refs.loras):
        load_lora(pipe, path, adapter_name=f"lora{i}")
    set_lora_scale(pipe, len(refs.loras), lora_scale)
    for embedding in found:
        add_embedding(pipe, family_cls, embedding)
    refiner_pipe = None
    if refiner:
        refiner_pipe = AutoPipelineForImage2Image.from_pretrained(refs.refiner_base, **dtype_kwarg(weights_dtype))
    if scheduler:
        for p in (pipe, refiner_pipe):
            if p is not None:
                p.scheduler = make_scheduler(scheduler, p.scheduler.config)

    placement = _place(pipe, refiner_pipe, device_name, offload)
    if compile:
        from sdkit.training.compiled import compile_for_inference

        for p, fam in ((pipe, refs.family), (refiner_pipe, refs.refiner_family)):
            if p is not None:  # in place: weights and keys unchanged
                compile_for_inference(getattr(p, family_class(fam).denoiser_attr))
    width, height, multiple = native_size(pipe, family_cls.denoiser_attr)
    info = PipelineInfo(
        model=model_ref, base=refs.base, family=refs.family, loras=refs.loras, lora_scale=lora_scale,
        embeddings=[e.source for e in found], refiner=refiner, refiner_family=refs.refiner_family, scheduler=scheduler or scheduler_name(pipe.scheduler),
        device=device_name, dtype=str(weights_dtype).replace("torch.", ""), width=width, height=height,
        size_multiple=multiple, placement=placement,
    )
    return pipe, refiner_pipe, info


@dataclass
class _Refs:
    base: str
    family: str
    loras: list[str]
    refiner_base: Optional[str] = None
    refiner_family: Optional[str] = None


def _check_refs(model_ref: str, lora: Optional[str], refiner: Optional[str], scheduler: Optional[str]) -> _Refs:
    """Resolve and check what load_pipeline was given, before any weights load."""
    from sdkit.families import detect_family, family_class
    from sdkit.inference.loading import read_model_index, resolve_lora, resolve_model

    check_scheduler_name(scheduler)
    resolved = resolve_model(model_ref, "--model")
    family = detect_family(resolved.base, key="--model")
    family_cls = family_class(family)
    check_scheduler_name(scheduler, family)
    if family_cls.is_refiner_only(read_model_index(resolved.base)):
        raise UserError(f"--model: '{model_ref}' is an SDXL refiner (image-to-image only); pass it as --refiner")
    refs = _Refs(resolved.base, family, [resolved.lora] if resolved.lora else [])
    if lora:
        refs.loras.append(resolve_lora(lora, "--lora"))
    if refiner:
        resolved_refiner = resolve_model(refiner, "--refiner")
        if resolved_refiner.lora:
            raise UserError(f"--refiner: '{refiner}' is a LoRA run; a refiner must be a full SDXL refiner model")
        refs.refiner_base = resolved_refiner.base
        refs.refiner_family = detect_family(resolved_refiner.base, key="--refiner")
        if not (family_cls.refiner_capable and family_class(refs.refiner_family).refiner_capable):
            raise UserError("--refiner: a refiner works with SDXL base models and SDXL refiners only")
    return refs


def quiet_loading() -> None:
    """No loading bars: on every run they drown the lines that say what was written."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def dtype_kwarg(torch_dtype) -> dict:
    """diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype`; older ones know only the first."""
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"
    return {name: torch_dtype}


def make_scheduler(name: str, config):
    """The scheduler sdkit calls `name`, built from a pipeline's scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def set_lora_scale(pipe, n_loras: int, scale: float) -> None:
    """The strength of the LoRAs load_pipeline loaded (adapters lora0, lora1 ...)."""
    if n_loras:
        pipe.set_adapters([f"lora{i}" for i in range(n_loras)], adapter_weights=[scale] * n_loras)


def scheduler_name(scheduler) -> str:
    """The sdkit name of a scheduler instance, or its class name when sdkit has none."""
    cls = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, (class_name, overrides) in SCHEDULERS.items():
        if class_name == cls and bool(overrides.get("use_karras_sigmas", False)) == karras:
            return name
    return cls


def native_size(pipe, denoiser_attr: str) -> tuple[int, int, int]:
    """(width, height, multiple): the size the model was trained at, and the size step it needs.
    `denoiser_attr` is the family's (unet or transformer)."""
    denoiser = getattr(pipe, denoiser_attr)
    sample = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    patch = int(getattr(denoiser.config, "patch_size", None) or 1)  # SD3 packs latents into 2x2 patches
    return int(sample) * factor, int(sample) * factor, factor * patch


def module_bytes(pipe) -> int:
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
            total += sum(b.numel() * b.element_size() for b in component.buffers())
    return total


def _place(pipe, refiner_pipe, device: str, offload: Optional[bool]) -> str:
    """Put the pipelines on the device; offload whatever does not fit with room to run."""
    import torch

    pipes = [p for p in (pipe, refiner_pipe) if p is not None]
    if not device.startswith("cuda"):
        for p in pipes:
            p.to(device)
        return device
    if offload is None:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        offload = sum(module_bytes(p) for p in pipes) + ACTIVATION_RESERVE_BYTES > free
    if not offload:
        for p in pipes:
            p.to(device)
        return "cuda"
    # Each model moves to the GPU only while it runs, so the idle pipeline (base during
    # refining, refiner during the base's steps) stays in CPU memory.
    for p in pipes:
        p.enable_model_cpu_offload(device=device)
    return "model offload"


# ---------------------------------------------------------------------------- images


def make_images(
    pipe,
    prompt: str,
    *,
    negative_prompt: Optional[str] = None,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    num_images: int = 1,
    width: Optional[int] = None,
    height: Optional[int] = None,
    refiner=None,
    refiner_fraction: float = 0.8,
    batch_size: int = 1,
    **extra,
) -> list:
    """PIL images; image k uses seed + k, so any single image can be reproduced alone.

    `batch_size` images go through the pipeline together (each still starts from its own
    seed's noise): several times faster for small models, more memory for large ones.
    """
    import torch

    pipe.set_progress_bar_config(disable=True)
    if refiner is None and batch_size > 1:
        return _batched_images(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                               seed=seed, num_images=num_images, width=width, height=height,
                               batch_size=batch_size, **extra)
    images = []
    for k in range(num_images):
        # A CPU generator gives the same starting noise on every device.
        generator = torch.Generator("cpu").manual_seed(seed + k)
        kwargs = dict(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
            guidance_scale=guidance, generator=generator, width=width, height=height, **extra,
        )
        if refiner is None:
            images.append(pipe(**kwargs).images[0])
            continue
        # Ensemble of experts: the base denoises the first part, the refiner finishes.
        latents = pipe(**kwargs, denoising_end=refiner_fraction, output_type="latent").images
        refiner.set_progress_bar_config(disable=True)
        images.append(
            refiner(
                prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance, generator=generator, denoising_start=refiner_fraction, image=latents,
            ).images[0]
        )
    return images


def _batched_images(pipe, prompt, *, negative_prompt, steps, guidance, seed, num_images, batch_size, **extra) -> list:
    """make_images, `batch_size` at a time: one generator per image, so image k still starts
    from seed + k's noise."""
    import torch

    images = []
    for start in range(0, num_images, batch_size):
        ks = range(start, min(start + batch_size, num_images))
        images += pipe(
            prompt=[prompt] * len(ks),
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(ks),
            generator=[torch.Generator("cpu").manual_seed(seed + k) for k in ks],
            num_inference_steps=steps, guidance_scale=guidance, **extra,
        ).images
    return images


def release_memory() -> None:
    """Give GPU memory back after the caller dropped its pipelines (before loading the next model)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
