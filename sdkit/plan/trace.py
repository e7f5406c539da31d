"""Peak memory of the trainer's own training step, traced on fake tensors from configs.

The modules are built from their configs on the meta device (no memory, a fraction of a
second) as `sdkit train` would load them (frozen weights in the weight dtype), then handed to
the trainer's own builders: `prepare_modules` (the adapter decides what trains and in which
dtype, gradient checkpointing) and `build_step` (optimizer, schedule, objective, EMA, the one
`TrainStep`). Every parameter and buffer is then re-created as a FakeTensor
(`torch._subclasses.fake_tensor`): shapes, dtypes, strides, no storage, so a 2.6 B-parameter
SDXL UNet takes a forward, backward and optimizer step in tens of seconds of CPU. The step
runs once, in steady state (optimizer state allocated; with gradient accumulation, gradients
already held), under `StepMemTracker`, which records each phase's peak by category.

What stands in for the GPU (sdkit.plan.tracker says why): the `PlanAccelerator` below for
accelerate (plain backward, CPU autocast with CUDA's policy), bf16 for fp16 (same bytes),
the flash SDPA kernel (what CUDA's fused kernels save: no L x L score matrix), and, for
`optim.name=adamw8bit`, an optimizer with bitsandbytes' state tensors (wrapped like the real one
for bf16 weights or a fused backward, whose per-parameter updates then run inside the traced
backward, as they do in training). Frozen text encoders
are not run: the batch carries their output (as the latent cache would), and sdkit.plan adds
their weights. Validation sampling (the denoiser on the CFG batch, the VAE decode of one
image) is traced after the step when the recipe has prompts.

The same code runs on real tensors (`fake=False`): the tests check the traced figure against
the bytes the CPU allocator handed out.
"""

from __future__ import annotations

import contextlib
import gc
import time
from array import array
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
from torch import nn

from sdkit.plan.tracker import AdamW8bitStates, ProdigyStates, StepMemTracker, cuda_autocast_policy
from sdkit.training.optim_packages import train_mode

LOW_PRECISION = {"fp16": torch.bfloat16, "bf16": torch.bfloat16}  # fp16 traced as bf16: same bytes
# Where each of the step's phases is counted (sdkit.training.step.PHASES).
PLAN_PHASES = {"encoders": "encode", "forward": "forward/backward", "backward": "forward/backward",
               "optimizer": "optimizer step"}


@dataclass
class TraceResult:
    """Bytes, per phase of the step, at that phase's peak; plus what stays resident."""

    phase_peaks: dict[str, dict[str, int]]  # phase -> category -> bytes (Total included)
    timeline: dict[str, array] = field(repr=False, default_factory=dict)  # forward/backward samples
    params_bytes: int = 0
    buffers_bytes: int = 0
    opt_state_bytes: int = 0
    ema_bytes: int = 0
    trainable_params: int = 0
    total_params: int = 0
    trainable_bytes: int = 0
    trainable_numels: list[int] = field(repr=False, default_factory=list)
    seconds: float = 0.0

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=lambda p: self.phase_peaks[p]["Total"])

    @property
    def peak_bytes(self) -> int:
        return self.phase_peaks[self.peak_phase]["Total"]


class PlanAccelerator:
    """The Accelerator methods `TrainStep` calls, in plain torch on one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0

    def __init__(self, low: torch.dtype | None):
        self.low = low

    def prepare(self, *objects):
        return objects

    def unwrap_model(self, module):
        return module

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return nn.utils.clip_grad_norm_(params, max_norm)

    def autocast(self):
        return torch.autocast("cpu", dtype=self.low) if self.low is not None else contextlib.nullcontext()

    def accumulate(self, *modules):
        return contextlib.nullcontext()  # one traced micro-batch: no accumulation window to sync


class _Tokenizer:
    """Token ids of the right length for trained text encoders (their values do not change memory)."""

    def __init__(self, length: int):
        self.model_max_length = length

    def __call__(self, captions, max_length=None, **_kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(captions), max_length or self.model_max_length, dtype=torch.long))

    # what textual inversion asks of a tokenizer when it adds its tokens
    def add_tokens(self, tokens) -> int:
        return len(tokens)

    def encode(self, text, add_special_tokens=False) -> list[int]:
        return [0]

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        return list(range(len(tokens)))


def _adamw8bit_states(params, optim, lr):
    return AdamW8bitStates(params, lr=lr)


# ------------------------------------------------------------------ building


def vae_scale_factor(vae_config: dict | None) -> int:
    if not vae_config:
        return 8
    return 2 ** (len(vae_config.get("block_out_channels", [1, 2, 3, 4])) - 1)


def _from_config(component, dtype=None):
    """A diffusers or transformers model from its config, on the meta device (in `dtype` if given)."""
    with torch.device("meta"):
        if component.library == "diffusers":
            import diffusers

            model = getattr(diffusers, component.class_name).from_config(component.config)
        else:
            import transformers

            cls = getattr(transformers, component.class_name)
            config = {k: v for k, v in component.config.items() if k not in ("architectures", "model_type")}
            model = cls(cls.config_class(**config))
    if dtype is None:
        return model
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # not its "cast with from_pretrained instead" advice: nothing is loaded here
    try:
        return model.to(dtype)
    finally:
        logging.set_verbosity(level)


def _meta_family(recipe, model, dtype, vae_dtype):
    """The recipe's family over meta modules: the denoiser, the VAE, and the text encoders that train."""
    from sdkit.families import family_class

    family = family_class(model.family)
    components = {family.denoiser_attr: _from_config(model.denoiser, dtype),
                  "scheduler": SimpleNamespace(config={})}  # the default schedule: same tensors
    if model.vae is not None:
        components["vae"] = _from_config(replace(model.vae, config=vae_config_of(recipe, model)), vae_dtype)
    if recipe.method.trains_text_encoders:
        for te in model.text_encoders:
            if te.name in family.text_encoder_attrs:
                components[te.name] = _from_config(te, dtype)
        for attr in family.tokenizer_attrs:
            components[attr] = _Tokenizer(family.text_tokens)
    return family(components)


def vae_config_of(recipe, model):
    from sdkit.plan.architectures import load_vae_config

    base = model.vae.config if model.vae else None
    return load_vae_config(recipe.model.vae, base) if recipe.model.vae else base


def _materialize(module: nn.Module, fake: bool) -> None:
    """Replace meta parameters and buffers by fake (or real) tensors of the same dtypes."""
    made: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # tied weights stay tied
                data = torch.empty(p.shape, dtype=p.dtype)
                if not fake and data.is_floating_point():
                    data.normal_(0.0, 0.02)
                made[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            mod._parameters[name] = made[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def plan_bucket(recipe, model) -> tuple[int, int]:
    """(width, height) the step is traced at: the run's largest bucket (sdkit.training.buckets),
    the square data.resolution when buckets are off."""
    from sdkit.families import family_class
    from sdkit.training.buckets import largest_bucket

    return largest_bucket(recipe.data, recipe.bucket_step(family_class(model.family).bucket_step))


def _example_batch(recipe, family, model, dtype, vae_dtype) -> dict:
    """A batch as the trainer's loader gives it at the largest bucket: posterior moments from
    the cache, or pixels; with prior preservation batch_size instance + batch_size class samples."""
    b = recipe.micro_batch_rows
    width, height = plan_bucket(recipe, model)
    config = model.denoiser.config
    batch = {**family.example_extras(b, (width, height)), "caption": [""] * b}
    if recipe.prior_preservation:
        batch["prior"] = torch.arange(b) >= recipe.train.batch_size
    if recipe.cache_used:
        factor = vae_scale_factor(vae_config_of(recipe, model))
        channels = config.get("in_channels", family.latent_channels)
        batch["moments"] = torch.zeros(b, 2 * channels, height // factor, width // factor, dtype=dtype)
    else:
        batch["pixel_values"] = torch.zeros(b, 3, height, width, dtype=vae_dtype)
    if not recipe.method.trains_text_encoders:
        batch["text"] = family.example_text(b, config, dtype)
    return batch


# ------------------------------------------------------------------ the trace


def plan_dtypes(recipe, model) -> tuple:
    """(autocast dtype or None, frozen weight dtype, VAE dtype) as the trace uses them."""
    from sdkit.families import family_class

    low = LOW_PRECISION.get(recipe.train.mixed_precision)
    dtype = low or torch.float32
    upcast = family_class(model.family).upcasts_vae(recipe.train.mixed_precision, vae_config_of(recipe, model))
    return low, dtype, torch.float32 if upcast else dtype


def _meta_parts(recipe, model):
    """The family and its trainable modules on the meta device, exactly as the trainer prepares
    them (outside any fake mode: dtype casts of meta modules are plain there)."""
    from sdkit.training.adapters import make_adapter
    from sdkit.training.build import prepare_modules

    low, dtype, vae_dtype = plan_dtypes(recipe, model)
    family = _meta_family(recipe, model, dtype, vae_dtype)
    adapter = make_adapter(recipe.method)
    modules = prepare_modules(family, adapter, recipe)
    return family, adapter, modules


def _build_step(recipe, model, family, adapter, modules, fake: bool):
    """Fake (or real) tensors for the modules, then the trainer's step around them, in steady state."""
    from sdkit.training.build import build_step
    from sdkit.training.optim import make_optimizer

    low, dtype, _ = plan_dtypes(recipe, model)
    needs_vae = not recipe.cache_used or recipe.validation.prompts
    for module in [*modules, *([family.vae] if needs_vae and family.components.get("vae") is not None else [])]:
        _materialize(module, fake)
    # Stand-ins with the same state tensors where the real optimizer cannot step on fake tensors.
    factory = {"adamw8bit": _adamw8bit_states, "prodigy": lambda params, optim, lr: ProdigyStates(params, lr=lr)
               }.get(recipe.optim.name, make_optimizer)
    step = build_step(recipe, family, adapter, modules, PlanAccelerator(low), dtype=dtype, steps=1,
                      optimizer_factory=factory)
    # Steady state: the optimizer's states exist before the step (a warm-up step on zero gradients);
    # within an accumulation window a micro-batch starts with every gradient held, and one traced
    # micro-batch stands for all of them (each frees what the last one made).
    for p in step.params:
        p.grad = torch.zeros_like(p)
    train_mode(step.optimizer)  # as the trainer's loop does (schedule-free steps only in train mode)
    # A fused backward's step() only counts (its updates happen in backward): step each parameter.
    getattr(step.optimizer, "step_each", step.optimizer.step)()
    if recipe.train.gradient_accumulation == 1:
        step.optimizer.zero_grad(set_to_none=True)
    step.accumulation = 1
    for module in modules:
        module.train()
    adapter.prepare_trace(modules)
    return step


def _sample_images(recipe, model, family, step, dtype, tracker) -> None:
    """Validation as the trainer runs it: no_grad under autocast, the denoiser on the CFG batch
    (one sampler step stands for all: each frees the last), then the VAE decodes one image.
    The encoders are on the GPU meanwhile, cache or not; sdkit.plan adds them."""
    v, res = recipe.validation, recipe.data.resolution
    vb = 2 if v.guidance > 1 else 1  # classifier-free guidance doubles the batch
    denoiser, config = step.modules[0], model.denoiser.config
    denoiser.eval()
    vae_config = vae_config_of(recipe, model)
    side = res // vae_scale_factor(vae_config)
    with tracker.in_phase("validation"), torch.no_grad(), step.accelerator.autocast():
        sample = torch.zeros(vb, config.get("in_channels", family.latent_channels), side, side, dtype=dtype)
        cond = family.conditioning(family.example_text(vb, config, dtype), family.example_extras(vb, res), res)
        out = family.predict(denoiser, sample, torch.zeros(vb), cond)
        del out, sample, cond
        vae = family.components.get("vae")
        if vae is not None:
            latent = torch.zeros(1, vae_config.get("latent_channels", family.latent_channels), side, side, dtype=vae.dtype)
            vae.decode(latent)  # its output is freed at once, as the pipeline frees it


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def trace_training_step(recipe, model, *, fake: bool = True) -> TraceResult:
    """Run one steady-state training step of `recipe` on `model`'s architecture (and validation
    sampling when the recipe has prompts); its memory by phase."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    start = time.perf_counter()
    gc.collect()  # garbage of earlier work is not the step's: free it before the tracker watches
    recipe = recipe.model_copy(deep=True)
    recipe.train.compile = False  # compiling changes time, not what the step keeps
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    policy = cuda_autocast_policy() if recipe.train.mixed_precision in LOW_PRECISION else contextlib.nullcontext()
    family, adapter, modules = _meta_parts(recipe, model)
    _, dtype, vae_dtype = plan_dtypes(recipe, model)
    with mode, policy, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        step = _build_step(recipe, model, family, adapter, modules, fake)
        batch_phase = "forward/backward" if recipe.cache_used else "encode"
        tracker = StepMemTracker()
        ema = list(step.ema.shadow.values()) if step.ema and not recipe.train.ema_on_cpu else []
        tracker.track_external(*step.modules, step.optimizer, *ema)
        tracker.track_gradients(step.params)
        step.phase = lambda name: tracker.in_phase(PLAN_PHASES.get(name, batch_phase))
        with tracker:
            tracker.phase = batch_phase
            step(_lazy_batch(recipe, family, model, dtype, vae_dtype), 1)
            if recipe.validation.prompts:
                _sample_images(recipe, model, family, step, dtype, tracker)
        tracker.remove_gradient_hooks()
        result = _result(tracker, step, ema)
    result.phase_peaks.pop("setup", None)
    result.seconds = time.perf_counter() - start
    return result


def _lazy_batch(recipe, family, model, dtype, vae_dtype):
    """The batch is made when the step asks for it, inside the tracker, as a loader's would be."""
    yield _example_batch(recipe, family, model, dtype, vae_dtype)


def _result(tracker, step, ema) -> TraceResult:
    states = [t for st in step.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    params = list({id(p): p for m in step.modules for p in m.parameters()}.values())
    buffers = list({id(b): b for m in step.modules for b in m.buffers()}.values())
    return TraceResult(
        phase_peaks=tracker.phase_peaks,
        timeline=tracker.timeline,
        params_bytes=_nbytes(params),
        buffers_bytes=_nbytes(buffers),
        opt_state_bytes=_nbytes(states),
        ema_bytes=_nbytes(ema),
        trainable_params=sum(p.numel() for p in step.params),
        total_params=sum(p.numel() for p in params),
        trainable_bytes=_nbytes(step.params),
        trainable_numels=[p.numel() for p in step.params],
    )
