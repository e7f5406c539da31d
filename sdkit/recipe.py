"""Typed training recipes: a YAML file plus dotted KEY=VALUE overrides.

Imports only pydantic and yaml, so a recipe is checked before torch or any model loads.
Every problem becomes a `UserError` whose one line names the key and the file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdkit.errors import UserError


class _Section(BaseModel):
    # Unknown keys are errors; assignment is validated so code cannot smuggle in bad values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    pretrained: str = Field(description="Hub id or local diffusers folder of the base model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    variant: Optional[str] = Field(None, description="Weight variant to load, e.g. fp16.")
    family: Literal["auto", "sd", "sdxl", "sd3"] = Field(
        "auto", description="Model family; auto reads _class_name from model_index.json."
    )
    vae: Optional[str] = Field(
        None, description="Separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix."
    )
    refiner: Optional[str] = Field(
        None, description="SDXL refiner used for validation images (base + refiner)."
    )
    load_t5: bool = Field(True, description="SD3: load the T5 text encoder (false saves memory).")


class MethodConfig(_Section):
    type: Literal["full", "lora", "loha", "lokr"] = Field(
        "lora", description="full: all denoiser weights; lora (DoRA with use_dora), loha, lokr: adapters (peft)."
    )
    rank: int = Field(4, ge=1, description="Adapter rank (LoRA/DoRA/LoHa/LoKr).")
    alpha: Optional[float] = Field(None, gt=0, description="Adapter alpha (strength alpha/rank); defaults to the rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; LoHa/LoKr: module dropout.")
    use_dora: bool = Field(False, description="lora: train DoRA (weight-decomposed LoRA, peft's use_dora).")
    lokr_factor: int = Field(-1, description="lokr: Kronecker factor of the dimensions; -1 splits near the square root.")
    decompose_both: bool = Field(False, description="lokr: also factor the smaller Kronecker matrix in low rank.")
    init_from: Optional[str] = Field(
        None, description="Start the adapters from this file (peft or kohya/LyCORIS layout) instead of at random."
    )
    target_modules: Optional[list[str]] = Field(
        None, description="Module names that get adapters; default: the family's attention projections."
    )
    train_text_encoder: bool = Field(False, description="Also train the text encoder(s) (adapters on their attention; full: all weights).")

    @property
    def lora_alpha(self) -> float:
        """LoRA alpha; defaults to the rank (scale 1)."""
        return self.alpha or self.rank

    @model_validator(mode="after")
    def _variant_keys(self):
        # Keys of one method set on another would silently do nothing.
        owners = {"use_dora": ("lora",), "lokr_factor": ("lokr",), "decompose_both": ("lokr",),
                  "init_from": ("lora", "loha", "lokr")}
        for name, methods in owners.items():
            info = type(self).model_fields[name]
            if getattr(self, name) != info.get_default() and self.type not in methods:
                raise ValueError(f"method.{name} applies to method.type {' or '.join(methods)}, not {self.type}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"method.lokr_factor must be -1 or a positive number, got {self.lokr_factor}")
        return self


class DatasetEntry(_Section):
    """One of several datasets (`data.datasets`); unset keys take their value from `data`."""

    dataset: str = Field(description="Hub dataset id, a folder with metadata.jsonl, or a folder of images with captions.")
    split: Optional[str] = Field(None, description="Dataset split (hub datasets).")
    image_column: Optional[str] = Field(None, description="Column holding the image.")
    caption_column: Optional[str] = Field(None, description="Column holding the caption.")
    caption_extension: Optional[str] = Field(None, description="Caption file suffix beside each image.")
    instance_prompt: Optional[str] = Field(None, description="One caption for every image of this dataset.")
    caption_prefix: Optional[str] = Field(None, description="Text put before every caption of this dataset.")
    caption_dropout: Optional[float] = Field(None, ge=0.0, le=1.0, description="Caption dropout of this dataset.")
    repeats: Optional[int] = Field(None, ge=1, description="Times each image is seen per epoch.")
    max_samples: Optional[int] = Field(None, ge=1, description="Use only the first N samples of this dataset.")


SOURCE_KEYS = tuple(DatasetEntry.model_fields)  # what each entry of data.datasets may set


class DataConfig(_Section):
    dataset: Optional[str] = Field(
        None, description="Hub dataset id, a folder with metadata.jsonl, or a folder of images with .txt captions."
    )
    datasets: Optional[list[DatasetEntry]] = Field(
        None, description="Several datasets in one run (instead of data.dataset); each entry as data.datasets[i].*."
    )
    repeats: int = Field(1, ge=1, description="Times each image is seen per epoch (kohya's repeats).")
    kohya_folder_names: bool = Field(
        False, description="Subfolders named like '10_sks dog' give repeats 10 and instance prompt 'sks dog'."
    )
    caption_extension: str = Field(".txt", description="Caption file suffix beside each image (.txt, .caption).")
    caption_prefix: Optional[str] = Field(None, description="Text put before every caption (a trigger word).")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated tags of each caption every epoch.")
    keep_tokens: int = Field(0, ge=0, description="With shuffle_caption: how many leading tags stay in place.")
    split: str = Field("train", description="Dataset split (hub datasets).")
    image_column: str = Field("image", description="Column holding the image.")
    caption_column: str = Field("text", description="Column holding the caption.")
    instance_prompt: Optional[str] = Field(
        None, description="One caption for every image of a folder without captions."
    )
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (multiple of 8).")
    center_crop: bool = Field(True, description="Center crop; false crops at random.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Share of captions replaced by the empty prompt.")
    max_samples: Optional[int] = Field(None, ge=1, description="Use only the first N samples.")
    bad_images: Literal["skip", "error"] = Field(
        "skip", description="Unreadable images: skip (each is reported with its file name) or stop."
    )
    num_workers: int = Field(0, ge=0, description="Data loader worker processes.")
    cache: bool = Field(
        True, description="Cache latents and text embeddings on disk when the encoders are frozen."
    )
    buckets: bool = Field(
        False, description="Aspect-ratio buckets of about resolution^2 pixels; false: one square of resolution."
    )
    bucket_step: Optional[int] = Field(
        None, ge=8, description="Bucket sides are multiples of this; default: the family's (SD 8, SDXL 64, SD3 16)."
    )
    max_aspect: float = Field(2.0, ge=1.0, description="Largest bucket aspect ratio (long side / short side).")
    min_side: Optional[int] = Field(None, ge=8, description="Smallest bucket side in pixels (default: no limit).")
    max_side: Optional[int] = Field(None, ge=8, description="Largest bucket side in pixels (default: resolution x max_aspect).")

    @model_validator(mode="after")
    def _multiple_of_8(self):
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.min_side and self.max_side and self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        if (self.dataset is None) == (not self.datasets):
            raise ValueError("set data.dataset or data.datasets (a list), not both" if self.dataset
                             else "set data.dataset (or data.datasets, a list)")
        return self

    def dataset_names(self) -> str:
        """The dataset(s) as one line, for logs and model cards."""
        return ", ".join(s.dataset for s in self.sources())

    def sources(self) -> list["DataConfig"]:
        """One data config per dataset: each entry of `datasets` over these keys, or itself."""
        if not self.datasets:
            return [self]
        return [self.model_copy(update={"datasets": None, **entry.model_dump(exclude_none=True)})
                for entry in self.datasets]


class OptimConfig(_Section):
    name: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "adamw_schedulefree"] = Field(
        "adamw", description="adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers; factored second "
        "moments), prodigy (prodigyopt; use lr 1.0), adamw_schedulefree (schedulefree; no lr schedule)."
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (prodigy: a multiplier of its own estimate, 1.0).")
    text_encoder_lr: Optional[float] = Field(
        None, gt=0, description="Learning rate of the text encoders when they train; default: optim.lr."
    )
    scale_lr: bool = Field(False, description="Multiply lr by batch size x accumulation x processes.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    max_grad_norm: Optional[float] = Field(
        1.0, gt=0, description="Gradient clipping norm; null disables. With fused_backward: per parameter tensor."
    )
    fused_backward: bool = Field(
        False, description="Update each parameter during backward and free its gradient at once (no full set of "
        "gradients ever exists); needs train.gradient_accumulation=1."
    )
    relative_step: bool = Field(
        False, description="adafactor: its own time-dependent step size (lr and the schedule are then unused)."
    )

    @model_validator(mode="after")
    def _schedule_free(self):
        if self.name == "adamw_schedulefree" and self.lr_scheduler != "constant":
            raise ValueError("optim.lr_scheduler: adamw_schedulefree needs no schedule (it warms up by "
                             "optim.warmup_steps itself); set constant")
        return self


# train.compile=auto compiles runs at least this long: compiling takes ~20-60 s on a CPU and
# ~1-2 min for SDXL on a GPU, which a run must win back (1.2-1.6x steps/s) before it pays.
COMPILE_AUTO_MIN_STEPS = 1000


class TrainConfig(_Section):
    batch_size: int = Field(1, ge=1, description="Batch size per process.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run (wins over epochs).")
    epochs: Optional[int] = Field(None, ge=1, description="Epochs to run when max_steps is not set.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast precision; trainable weights stay fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    seed: int = Field(42, description="Seed for weights, data order and noise.")
    ema: bool = Field(False, description="Keep an EMA of the weights (full fine-tunes); the result is the EMA.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="DDPM target; auto reads the scheduler config."
    )
    snr_gamma: Optional[float] = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual).")
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (brighter/darker images).")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal", description="Flow matching (SD3): how training timesteps are drawn."
    )
    logit_mean: float = Field(0.0, description="Flow matching: logit-normal mean.")
    logit_std: float = Field(1.0, gt=0, description="Flow matching: logit-normal std.")
    mode_scale: float = Field(1.29, description="Flow matching: scale of the mode sampling.")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Flow matching: loss weighting scheme."
    )
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps.")
    checkpoints_keep: int = Field(3, ge=1, description="How many checkpoints to keep (oldest removed).")
    resume: Optional[str] = Field(None, description="auto (newest complete checkpoint) or a checkpoint folder.")
    allow_tf32: bool = Field(True, description="TF32 matmuls on Ampere and newer GPUs.")
    compile: Literal["auto", True, False] = Field(
        "auto", description=f"torch.compile the denoiser; auto: for runs of {COMPILE_AUTO_MIN_STEPS}+ steps on "
        "CUDA or CPU (one warning and eager training if compiling fails)."
    )
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the trained weights; bf16 halves weights and gradients and rounds each update "
        "stochastically (needs mixed_precision bf16)."
    )
    ema_on_cpu: bool = Field(False, description="Keep the EMA on the CPU (saves 4 bytes a weight of GPU memory).")
    channels_last: bool = Field(False, description="channels_last memory format for the UNet.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML reads a bare `no` (train.mixed_precision=no) as false.
        return "no" if value is False else value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_word(cls, value):
        return {"true": True, "false": False, "yes": True, "no": False}.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.weights_dtype == "bf16" and self.mixed_precision != "bf16":
            raise ValueError("weights_dtype bf16 needs mixed_precision bf16 (the frozen weights and autocast match it)")
        return self


class ValidationConfig(_Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts for sample images during training.")
    negative_prompt: Optional[str] = Field(None, description="Negative prompt for sample images.")
    every: int = Field(500, ge=1, description="Make sample images every N steps (and at the end).")
    num_images: int = Field(1, ge=1, description="Images per prompt.")
    steps: int = Field(25, ge=1, description="Sampler steps.")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    seed: int = Field(0, description="Seed of the sample images.")


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard logs to OUTPUT_DIR/logs.")
    every: int = Field(10, ge=1, description="Log loss and lr every N steps.")


class Recipe(_Section):
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output_dir: str = Field(description="Run folder: checkpoints, samples, logs and the result.")

    @model_validator(mode="after")
    def _text_encoder_lr(self):
        if self.optim.text_encoder_lr is not None and not self.method.train_text_encoder:
            raise ValueError("optim.text_encoder_lr: set method.train_text_encoder=true too (no text encoder trains)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    # --- derived values: every part of sdkit asks these, none restates them
    @property
    def lora_alpha(self) -> float:
        """LoRA alpha; defaults to the rank (scale 1)."""
        return self.method.lora_alpha

    def effective_batch(self, processes: int = 1) -> int:
        """Samples per optimizer step over all processes."""
        return self.train.batch_size * self.train.gradient_accumulation * processes

    def learning_rate(self, processes: int = 1) -> float:
        """Peak learning rate, scaled by the effective batch when optim.scale_lr is on."""
        return self.optim.lr * (self.effective_batch(processes) if self.optim.scale_lr else 1)

    @property
    def ema_applies(self) -> bool:
        """An EMA averages the whole denoiser: kept for full fine-tunes only."""
        return self.train.ema and self.method.type == "full"

    def compiles(self, device_type: str) -> bool:
        """Whether the denoiser is compiled on a `device_type` ("cuda", "cpu", "mps") accelerator.
        auto: on CUDA and CPU (inductor) for runs long enough to win the compile time back."""
        setting = self.train.compile
        if setting != "auto":
            return bool(setting)
        long_run = self.train.max_steps is None or self.train.max_steps >= COMPILE_AUTO_MIN_STEPS
        return device_type in ("cuda", "cpu") and long_run

    @property
    def global_clip_norm(self) -> Optional[float]:
        """The step's clipping norm over all gradients; None with a fused backward, whose
        gradients never exist together (each tensor is clipped alone in its hook)."""
        return None if self.optim.fused_backward else self.optim.max_grad_norm

    def fused_backward_blocker(self) -> Optional[str]:
        """Why optim.fused_backward cannot be used with this recipe, or None."""
        if not self.optim.fused_backward:
            return None
        if self.train.gradient_accumulation > 1:
            return ("optim.fused_backward: each update is applied during backward, so gradients cannot "
                    f"accumulate over micro-batches; set train.gradient_accumulation=1 (now "
                    f"{self.train.gradient_accumulation}) or a larger train.batch_size")
        if self.train.mixed_precision == "fp16":
            return ("optim.fused_backward: fp16 loss scaling needs every gradient before the step; "
                    "use train.mixed_precision=bf16")
        return None

    def cache_blocker(self) -> Optional[str]:
        """Why latents and text embeddings cannot be cached, or None when they can."""
        if self.method.train_text_encoder:
            return "the text encoder is trained"
        if not self.data.center_crop:
            return "random crops change the pixels every epoch (data.center_crop=false)"
        if self.data.shuffle_caption:
            return "shuffled tags change the captions every epoch (data.shuffle_caption=true)"
        return None

    def bucket_step(self, family_step: int) -> int:
        """Step of the bucket sides: data.bucket_step, or the family's own (`Family.bucket_step`)."""
        return self.data.bucket_step or family_step

    @property
    def cache_used(self) -> bool:
        """Training reads latents and text embeddings from the cache (encoders off the accelerator)."""
        return self.data.cache and self.cache_blocker() is None

    # --- dotted access, for checks that name keys
    def get(self, key: str) -> Any:
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def differs_from_default(self, key: str) -> bool:
        section, _, leaf = key.rpartition(".")
        owner = self.get(section) if section else self
        info = type(owner).model_fields[leaf]
        default = info.get_default(call_default_factory=True)
        return getattr(owner, leaf) != default


# ---------------------------------------------------------------- loading

def field_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, Any]:
    """Every dotted key the schema knows, mapped to its pydantic FieldInfo."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_paths(ann, key + "."))
        else:
            out[key] = info
    return out


def _sections(model: type[BaseModel] = Recipe, prefix: str = "") -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.add(prefix + name)
            out |= _sections(ann, prefix + name + ".")
    return out


def _unknown_key_message(key: str) -> str:
    known = list(field_paths()) + sorted(_sections())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelled leaf inside the right section: compare last parts
        leaf = key.rsplit(".", 1)[-1]
        section = key.rsplit(".", 1)[0] if "." in key else ""
        leaves = {k.rsplit(".", 1)[-1]: k for k in known if k.startswith(section + ".")} if section else {}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def _walk_unknown(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key in `data` that the schema does not know, dotted."""
    if not isinstance(data, dict):
        return []
    bad = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        info = model.model_fields.get(key)
        if info is None:
            bad.append(dotted)
            continue
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            bad += _walk_unknown(value, ann, dotted + ".")
    return bad


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE (e.g. train.max_steps=500)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> set[str]:
    """Set dotted keys in place; returns the keys that came from the command line."""
    touched = set()
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
        touched.add(key)
    return touched


def _looks_local(ref: str) -> bool:
    """A path the user clearly meant as a folder (hub ids are 'name' or 'org/name')."""
    return (
        ref.startswith((".", "/", "~"))
        or ref.count("/") > 1
        or "\\" in ref
        or os.path.exists(os.path.expanduser(ref))
    )


def check_local_ref(ref: str, key: str) -> None:
    if _looks_local(ref) and not os.path.exists(os.path.expanduser(ref)):
        raise UserError(f"{key}: folder '{ref}' does not exist")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(f"recipe file '{where}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping of sections (model:, data:, train: ...)")
    touched = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, where, touched)


ECHO_LIMIT = 60  # characters of a bad value echoed back in an error


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else text[: ECHO_LIMIT - 3] + "..."


def _validation_lines(e: ValidationError, origin) -> list[str]:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {_echo(err['input'])})"
        msg = msg.replace("Value error, ", "")
        lines.append(f"{origin(key)}: {key or 'recipe'}: {msg}")
    return lines


def recipe_from_dict(data: dict, where: str = "<recipe>", from_cli: set[str] = frozenset()) -> Recipe:
    """Validate a recipe; every problem in it is reported at once, one line each (exit 2)."""
    def origin(key: str) -> str:
        return "command line" if key in from_cli else where

    problems = [f"{origin(bad)}: {_unknown_key_message(bad)}" for bad in _walk_unknown(data, Recipe)]
    if problems:  # unknown keys first: pydantic would report each again as 'extra inputs'
        raise UserError("\n".join(problems))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError("\n".join(_validation_lines(e, origin))) from None
    refs = [(key, recipe.get(key)) for key in ("model.pretrained", "model.vae", "model.refiner", "data.dataset")]
    refs += [(f"data.datasets.{i}.dataset", entry.dataset) for i, entry in enumerate(recipe.data.datasets or [])]
    for key, ref in refs:
        if ref:
            try:
                check_local_ref(ref, key)
            except UserError as e:
                problems.append(f"{origin(key)}: {e}")
    fused = recipe.fused_backward_blocker()
    if fused:
        problems.append(f"{origin('optim.fused_backward')}: {fused}")
    problems += [f"{origin(line.split(':', 1)[0])}: {line}" for line in _family_problems(recipe)]
    if problems:
        raise UserError("\n".join(problems))
    return recipe


def _family_problems(recipe: Recipe) -> list[str]:
    """What the model's family rejects, when the family is known without a download
    (model.family given, or a local folder); the trainer asks again once it knows it."""
    from sdkit.families import check_recipe_family, local_family

    name = recipe.model.family if recipe.model.family != "auto" else local_family(recipe.model.pretrained)
    return check_recipe_family(recipe, name) if name else []
