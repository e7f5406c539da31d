"""Peak memory of one training step of a real-size denoiser, traced on fake tensors.

How, and why this way (ENVIRONMENT.md, "Estimating GPU memory without a GPU"):

- The denoiser is built from its config on the meta device (no memory, a fraction of a
  second), LoRA adapters are added there, then every parameter and buffer is re-created as a
  FakeTensor (`torch._subclasses.fake_tensor`) with the dtype the trainer gives it. Fake
  tensors have shapes, dtypes and strides but no storage: a 2.6 B-parameter SDXL UNet takes a
  forward, backward and optimizer step in tens of seconds of CPU and a few hundred MB of RAM.
- `StepMemTracker` is torch's `MemTracker` (`torch.distributed._tools.mem_tracker`): it sees
  every tensor storage created or freed inside it and sorts them into parameters, gradients,
  optimizer state, activations. Two of its habits are switched off: per-module bookkeeping
  (it walks every module on every op, which never finished for SDXL) and its own module hooks
  (they register gradient hooks on every parameter and fail on the frozen base of a LoRA
  model). Parameters, optimizer state and inputs are registered up front instead, and
  gradients through post-accumulate hooks on the trainable parameters only.
- The fake tensors live on device "cpu", not "cuda": this torch is a CPU-only build, where
  fake CUDA tensors abort at the first autograd op. Kernels allocate the same outputs and
  autograd saves the same tensors on both devices, except for what is corrected here:
  1. Autocast policy. CUDA autocast runs group_norm, layer_norm and softmax in fp32; CPU
     autocast leaves them in bf16, which made estimates ~10% low. `cuda_autocast_policy()`
     registers CUDA's policy for those ops at the AutocastCPU dispatch key while a trace runs
     (and removes it after).
  2. Attention. SDPA is pinned to the flash kernel (the CPU one here), which saves what CUDA's
     flash / memory-efficient kernels save: the output and an fp32 logsumexp, never the L x L
     score matrix of the math path.
  3. fp16 is traced as bf16 (same bytes; CPU autocast is most complete for bf16).
  Not modelled: the CUDA caching allocator's rounding and fragmentation, cuDNN/cuBLAS
  workspaces and the CUDA context; `sdkit.plan.estimate` states them next to the figure.
- The step mirrors `sdkit.training.trainer`: steady state (optimizer state already allocated; for
  gradient accumulation, gradients already held), mixed precision through autocast with fp32
  trainable weights, LoRA adapters fp32 on a base in the weight dtype, torch's fused AdamW or
  bitsandbytes AdamW8bit (emulated: same state tensors, in-place update), EMA as one fp32 copy
  updated in place, latents from the cache or from a VAE encode under no_grad, and
  validation sampling (denoiser on the CFG batch, VAE decode) when the recipe has prompts.

The same code runs on real tensors (`fake=False`); the tests use that on a tiny model to check
the traced figure against the bytes the CPU allocator actually handed out.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from array import array
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

# Text length the families feed the denoiser: CLIP's 77 tokens (SD3 adds its T5 tokens,
# StepSpec.text_tokens; zeros when T5 is not loaded).
CLIP_TOKENS = 77

SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

LOW_PRECISION = {"fp16": torch.bfloat16, "bf16": torch.bfloat16}  # fp16 traced as bf16: same bytes


@dataclass(frozen=True)
class TextEncoderSpec:
    class_name: str  # transformers class, e.g. CLIPTextModel
    config: dict
    tokens: int = CLIP_TOKENS


@dataclass(frozen=True)
class StepSpec:
    """Everything about a training step that changes its memory."""

    denoiser_class: str  # UNet2DConditionModel or SD3Transformer2DModel
    denoiser_config: dict
    method: str = "lora"  # full | lora
    lora_rank: int = 4
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: Optional[tuple[str, ...]] = None  # None: the family's attention projections
    precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit
    batch_size: int = 1
    resolution: int = 512
    gradient_accumulation: int = 1
    ema: bool = False
    vae_config: Optional[dict] = None  # latent size; with encode_images, also a traced VAE encode
    encode_images: bool = False  # False: latents come from the cache
    trained_text_encoders: tuple[TextEncoderSpec, ...] = ()
    validation_batch: int = 0  # >0: also trace sampling (denoiser at this batch, VAE decode of one image)
    text_tokens: int = CLIP_TOKENS  # length of encoder_hidden_states
    vae_upcast: bool = False  # the VAE runs in fp32 (SDXL's stock VAE under fp16)

    @property
    def is_sd3(self) -> bool:
        return self.denoiser_class == "SD3Transformer2DModel"


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


# ------------------------------------------------------------------ CUDA autocast on CPU


@contextlib.contextmanager
def cuda_autocast_policy():
    """Make CPU autocast follow CUDA's policy for the ops where the two differ in memory.

    CUDA autocast lists group_norm and layer_norm as fp32 ops and softmax / log_softmax as
    "fp32 unless a dtype is given"; CPU autocast runs all four in the input's (low) precision.
    The kernels registered here upcast like CUDA's and redispatch below autocast; removed on exit.
    """
    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(x):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        return x

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.aten.group_norm(up(input), num_groups, up(weight), up(bias), eps, cudnn_enabled)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.aten.layer_norm(up(input), normalized_shape, up(weight), up(bias), eps, cudnn_enable)

    def softmax(input, dim, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(below):
            if dtype is None and input.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            return torch.ops.aten.softmax.int(input, dim, dtype)

    def log_softmax(input, dim, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(below):
            if dtype is None and input.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            return torch.ops.aten.log_softmax.int(input, dim, dtype)

    lib.impl("group_norm", group_norm, "AutocastCPU")
    lib.impl("layer_norm", layer_norm, "AutocastCPU")
    lib.impl("softmax.int", softmax, "AutocastCPU")
    lib.impl("log_softmax.int", log_softmax, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


# ------------------------------------------------------------------ the tracker


class _AutogradOnly:
    """Stands in for MemTracker's ModTracker: knows only whether backward is running."""

    parents = {"Global"}

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *hooks) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _category_totals(snap: dict) -> dict[str, int]:
    return {getattr(k, "value", k): v for k, v in snap.items()}


class StepMemTracker(MemTracker):
    """MemTracker without module bookkeeping, plus per-phase peaks and a forward/backward timeline."""

    def __init__(self):
        super().__init__()
        self._mod_tracker = _AutogradOnly()
        self.phase = "setup"
        self.phase_peaks: dict[str, dict[str, int]] = {}
        # Per op while forward/backward runs: activation bytes, the part of them that is
        # autocast's low-precision copies of weights (not proportional to the batch), and
        # gradient bytes. Lets sdkit.plan.estimate rescale the batch without another trace.
        self.timeline = {"act": array("q"), "weight_copies": array("q"), "grad": array("q")}
        self._weight_copy_bytes = 0
        self._grad_hooks: list = []

    def track_gradients(self, params) -> None:
        """Count gradients as such once accumulated (MemTracker's module hooks would do it)."""

        def categorize(p):
            self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)

        self._grad_hooks = [p.register_post_accumulate_grad_hook(categorize) for p in params]

    def remove_gradient_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()

    def _is_param(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        winfo, _ = self._WINFO.get(t.untyped_storage(), (None, None))
        return winfo is not None and winfo.reftype == _MemRefType.PARAM

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(res, torch.Tensor) and self._is_param(args[0]):
            storage = res.untyped_storage()
            self._weight_copy_bytes += storage.nbytes()
            weakref.finalize(storage, self._weight_copy_freed, storage.nbytes())
        self._sample()
        return res

    def _weight_copy_freed(self, nbytes: int) -> None:
        self._weight_copy_bytes -= nbytes

    def _sample(self) -> None:
        # Runs after every op: a few dict reads, a copy only at a new peak.
        for snap in self._curr_mem_snap.values():
            best = self.phase_peaks.get(self.phase)
            if best is None or snap[_TOTAL_KEY] > best["Total"]:
                totals = _category_totals(snap)
                totals["weight_copies"] = self._weight_copy_bytes
                self.phase_peaks[self.phase] = totals
            if self.phase == "forward/backward":
                self.timeline["act"].append(snap[_MemRefType.ACT] + snap[_MemRefType.TEMP])
                self.timeline["weight_copies"].append(self._weight_copy_bytes)
                self.timeline["grad"].append(snap[_MemRefType.GRAD])


# ------------------------------------------------------------------ building modules


def _materialize(module: nn.Module, dtype_of, fake: bool) -> None:
    """Replace meta parameters and buffers by fake (or real) tensors of the given dtypes."""
    made: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # tied weights stay tied
                data = torch.empty(p.shape, dtype=dtype_of(p))
                if not fake and data.is_floating_point():
                    data.normal_(0.0, 0.02)
                made[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            mod._parameters[name] = made[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            # Floating buffers follow the frozen weights (from_pretrained(torch_dtype=...) casts them).
            mod._buffers[name] = torch.zeros(b.shape, dtype=dtype_of(b))


def _build_denoiser(spec: StepSpec):
    import diffusers

    cls = getattr(diffusers, spec.denoiser_class)
    with torch.device("meta"):
        model = cls.from_config(spec.denoiser_config)
        model.requires_grad_(spec.method == "full")
        if spec.method == "lora":
            from peft import LoraConfig

            targets = spec.lora_targets or (SD3_LORA_TARGETS if spec.is_sd3 else UNET_LORA_TARGETS)
            model.add_adapter(
                LoraConfig(
                    r=spec.lora_rank,
                    lora_alpha=spec.lora_alpha or spec.lora_rank,
                    lora_dropout=spec.lora_dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(targets),
                )
            )
    return model


def _build_text_encoder(te: TextEncoderSpec, spec: StepSpec):
    import transformers

    cls = getattr(transformers, te.class_name)
    config = cls.config_class(**{k: v for k, v in te.config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = cls(config)
        model.requires_grad_(spec.method == "full")
        if spec.method == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            targets = [t for t in TEXT_ENCODER_LORA_TARGETS if t in names]
            if targets:  # T5 has no q_proj/...: it stays frozen, as peft would leave it
                inject_adapter_in_model(
                    LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha or spec.lora_rank,
                               init_lora_weights="gaussian", target_modules=targets),
                    model,
                )
    return model


def _build_vae(config: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    vae.requires_grad_(False)
    return vae


def vae_scale_factor(vae_config: Optional[dict]) -> int:
    if not vae_config:
        return 8
    return 2 ** (len(vae_config.get("block_out_channels", [1, 2, 3, 4])) - 1)


def _denoiser_inputs(spec: StepSpec, batch: int, cond_dtype: torch.dtype) -> dict[str, Any]:
    cfg = spec.denoiser_config
    if spec.is_sd3:
        return {
            "encoder_hidden_states": torch.zeros(batch, spec.text_tokens, cfg["joint_attention_dim"], dtype=cond_dtype),
            "pooled_projections": torch.zeros(batch, cfg["pooled_projection_dim"], dtype=cond_dtype),
        }
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, spec.text_tokens, cross, dtype=cond_dtype)}
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size/crop ids
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, dtype=cond_dtype),
            "time_ids": torch.zeros(batch, 6, dtype=cond_dtype),
        }
    return inputs


# ------------------------------------------------------------------ optimizers


class AdamW8bitStates(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's memory without bitsandbytes: same state tensors, in-place update.

    Per parameter of 4096+ elements: two uint8 moments and two fp32 absmax vectors (one value per
    256-element block); smaller parameters keep two fp32 moments. bnb's 8-bit kernels update in
    place, so a step allocates nothing; here the update is an in-place no-op (fake or tiny tensors).
    """

    MIN_8BIT_SIZE = 4096
    BLOCK = 256

    def __init__(self, params, lr=1e-4):
        super().__init__(params, {"lr": lr})

    @classmethod
    def state_bytes(cls, numels) -> int:
        """State bytes for trainable tensors of these element counts."""
        total = 0
        for n in numels:
            if n < cls.MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * n + 2 * 4 * -(-n // cls.BLOCK)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    n = p.numel()
                    if n < self.MIN_8BIT_SIZE:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        blocks = -(-n // self.BLOCK)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32)
                p.mul_(1.0)  # the in-place update


def _make_optimizer(name: str, params):
    if name == "adamw8bit":
        return AdamW8bitStates(params)
    # Fused, as sdkit.training.trainer.make_optimizer builds it: one in-place kernel, no temporaries the
    # size of the weights (the foreach path would add one fp32 copy at the step).
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


# ------------------------------------------------------------------ the step


@dataclass
class _Setup:
    """The step's modules and optimizer, on fake (or real) tensors."""

    spec: StepSpec
    denoiser: nn.Module
    encoders: list  # trained text encoders
    vae: Optional[nn.Module]  # frozen; its weights are added by sdkit.plan.estimate with the other encoders
    trainable: list
    optimizer: torch.optim.Optimizer
    ema: list
    weight_dtype: torch.dtype
    low: Optional[torch.dtype]  # autocast dtype, None without mixed precision

    @property
    def modules(self) -> list:
        return [self.denoiser, *self.encoders]

    def autocast(self):
        return torch.autocast("cpu", dtype=self.low) if self.low is not None else contextlib.nullcontext()

    @property
    def latent_side(self) -> int:
        return self.spec.resolution // vae_scale_factor(self.spec.vae_config)

    @property
    def channels(self) -> int:
        return self.spec.denoiser_config.get("in_channels", 4)

    def timesteps(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.float32 if self.spec.is_sd3 else torch.long)


def _set_up(spec: StepSpec, fake: bool) -> _Setup:
    """Modules as the trainer holds them, and an optimizer in steady state."""
    low = LOW_PRECISION.get(spec.precision)
    weight_dtype = low or torch.float32
    full = spec.method == "full"

    def dtype_of(t):  # trainable weights fp32 (master weights), frozen ones in the weight dtype
        if not t.is_floating_point():
            return t.dtype
        return torch.float32 if (full or t.requires_grad) else weight_dtype

    denoiser = _build_denoiser(spec)
    encoders = [_build_text_encoder(te, spec) for te in spec.trained_text_encoders]
    for module in (denoiser, *encoders):
        _materialize(module, dtype_of, fake)
        if spec.gradient_checkpointing:
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
                module.enable_gradient_checkpointing()
            else:  # transformers
                module.gradient_checkpointing_enable()
        module.train()
    vae = None
    if (spec.encode_images or spec.validation_batch) and spec.vae_config:
        vae = _build_vae(spec.vae_config)
        vae_dtype = torch.float32 if spec.vae_upcast else weight_dtype
        _materialize(vae, lambda t: vae_dtype if t.is_floating_point() else t.dtype, fake)
        vae.eval()

    trainable = [p for m in (denoiser, *encoders) for p in m.parameters() if p.requires_grad]
    optimizer = _make_optimizer(spec.optimizer, trainable)
    # Steady state: the optimizer's states exist before the step (a warm-up step on zero gradients).
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    if spec.gradient_accumulation == 1:
        optimizer.zero_grad(set_to_none=True)
    # else: a later micro-batch of an accumulation window starts with every gradient held.
    ema = [p.detach().float().clone() for p in trainable] if (spec.ema and full) else []
    return _Setup(spec, denoiser, encoders, vae, trainable, optimizer, ema, weight_dtype, low)


def _train_step(s: _Setup, tracker: StepMemTracker) -> None:
    """Encode (unless cached), forward, backward, optimizer step, EMA update: sdkit.training.trainer's order."""
    spec, b = s.spec, s.spec.batch_size
    cond_dtype = torch.float32 if spec.method == "full" else s.weight_dtype
    if spec.encode_images and s.vae is not None:
        tracker.phase = "encode"
        with torch.no_grad():
            pixels = torch.zeros(b, 3, spec.resolution, spec.resolution, dtype=s.vae.dtype)
            moments = s.vae.encode(pixels).latent_dist.parameters
            del pixels
    else:  # cached posterior moments, as the latent cache stores them
        moments = torch.zeros(b, 2 * s.channels, s.latent_side, s.latent_side, dtype=s.weight_dtype)

    tracker.phase = "forward/backward"
    mean, logvar = moments.float().chunk(2, dim=1)
    latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    del mean, logvar, moments
    noise = torch.randn_like(latents)
    noisy = (latents + noise).to(cond_dtype)
    del latents
    inputs = _denoiser_inputs(spec, b, cond_dtype)
    text_outputs = []
    with s.autocast():
        for te_spec, encoder in zip(spec.trained_text_encoders, s.encoders):
            text_outputs.append(encoder(torch.zeros(b, te_spec.tokens, dtype=torch.long))[0])
        pred = s.denoiser(noisy, timestep=s.timesteps(b), **inputs, return_dict=False)[0]
    del noisy, inputs
    loss = nn.functional.mse_loss(pred.float(), noise.float())
    for out in text_outputs:  # the trained text encoders' outputs feed the loss: they get gradients
        loss = loss + 0.0 * out.float().mean()
    del pred, text_outputs, noise
    (loss / spec.gradient_accumulation).backward()
    del loss

    tracker.phase = "optimizer step"
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for shadow, p in zip(s.ema, s.trainable):
            shadow.lerp_(p.detach().float(), 0.01)


def _sample_images(s: _Setup, tracker: StepMemTracker) -> None:
    """Validation as the trainer runs it: no_grad under autocast, the denoiser on the CFG batch
    (one step stands for all: each frees the last), then the VAE decodes one image. The
    encoders are on the GPU meanwhile, cache or not; sdkit.plan.estimate adds them."""
    tracker.phase = "validation"
    for module in s.modules:
        module.eval()
    vb, side = s.spec.validation_batch, s.latent_side
    with torch.no_grad(), s.autocast():
        sample = torch.zeros(vb, s.channels, side, side, dtype=s.weight_dtype)
        inputs = _denoiser_inputs(s.spec, vb, s.weight_dtype)
        out = s.denoiser(sample, timestep=s.timesteps(vb), **inputs, return_dict=False)[0]
        del out, sample, inputs
        if s.vae is not None:
            latent_channels = s.spec.vae_config.get("latent_channels", s.channels)
            image = s.vae.decode(torch.zeros(1, latent_channels, side, side, dtype=s.vae.dtype)).sample
            del image


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def trace_training_step(spec: StepSpec, *, fake: bool = True) -> TraceResult:
    """Run one steady-state training step of `spec` (and validation sampling if asked); its memory by phase."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    start = time.perf_counter()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    policy = cuda_autocast_policy() if spec.precision in LOW_PRECISION else contextlib.nullcontext()
    with mode, policy, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        s = _set_up(spec, fake)
        tracker = StepMemTracker()
        tracker.track_external(*s.modules, s.optimizer, *s.ema)
        tracker.track_gradients(s.trainable)
        with tracker:
            _train_step(s, tracker)
            if spec.validation_batch:
                _sample_images(s, tracker)
        tracker.remove_gradient_hooks()

        states = [t for st in s.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        params = list({id(p): p for m in s.modules for p in m.parameters()}.values())
        buffers = list({id(b): b for m in s.modules for b in m.buffers()}.values())
        result = TraceResult(
            phase_peaks=tracker.phase_peaks,
            timeline=tracker.timeline,
            params_bytes=_nbytes(params),
            buffers_bytes=_nbytes(buffers),
            opt_state_bytes=_nbytes(states),
            ema_bytes=_nbytes(s.ema),
            trainable_params=sum(p.numel() for p in s.trainable),
            total_params=sum(p.numel() for p in params),
            trainable_bytes=_nbytes(s.trainable),
            trainable_numels=[p.numel() for p in s.trainable],
        )
    result.phase_peaks.pop("setup", None)
    result.seconds = time.perf_counter() - start
    return result
