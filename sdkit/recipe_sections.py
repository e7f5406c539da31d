"""The sections of a recipe (model, method, data, optim, train, validation, logging): typed
fields with their defaults and one-line descriptions, which README's recipe reference lists.

Imports only pydantic, so a recipe is checked before torch or any model loads; `sdkit.recipe`
puts the sections together and owns the derived values.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    # Unknown keys are errors; assignment is validated so code cannot smuggle in bad values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    pretrained: str = Field(
        description="Hub id, local diffusers folder, or single-file .safetensors checkpoint of the base model."
    )
    config: Optional[str] = Field(
        None, description="Single-file pretrained: diffusers folder or hub id with its configs and tokenizers "
        "(needed offline; online diffusers infers it from the checkpoint)."
    )
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

    @field_validator("pretrained")
    @classmethod
    def _no_pickle(cls, value: str) -> str:
        from sdkit.single_file import pickle_refusal

        refusal = pickle_refusal(value)
        if refusal:
            raise ValueError(refusal)
        return value

    @model_validator(mode="after")
    def _config_with_single_file(self):
        from sdkit.single_file import SINGLE_FILE_SUFFIX

        if self.config and not self.pretrained.lower().endswith(SINGLE_FILE_SUFFIX):
            raise ValueError(f"model.config applies to a single-file {SINGLE_FILE_SUFFIX} model.pretrained; "
                             f"'{self.pretrained}' brings its own configs")
        return self


class MethodConfig(_Section):
    type: Literal["full", "lora", "loha", "lokr", "textual_inversion"] = Field(
        "lora", description="full: all denoiser weights; lora (DoRA with use_dora), loha, lokr: adapters (peft); "
        "textual_inversion: new token embeddings of the CLIP text encoder(s) only."
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
    placeholder_token: Optional[str] = Field(
        None, description="textual_inversion: the new word the captions use, e.g. <my-cat> (not already a token)."
    )
    initializer_token: Optional[str] = Field(
        None, description="textual_inversion: a word whose embedding the new vectors start from (several tokens: their mean)."
    )
    num_vectors: int = Field(1, ge=1, le=64, description="textual_inversion: embedding vectors behind the placeholder token.")

    @property
    def trains_text_encoders(self) -> bool:
        """The text encoders run inside the training graph (their output cannot be cached)."""
        return self.train_text_encoder or self.type == "textual_inversion"

    @property
    def lora_alpha(self) -> float:
        """LoRA alpha; defaults to the rank (scale 1)."""
        return self.alpha or self.rank

    @model_validator(mode="after")
    def _variant_keys(self):
        # Keys of one method set on another would silently do nothing.
        owners = {"use_dora": ("lora",), "lokr_factor": ("lokr",), "decompose_both": ("lokr",),
                  "init_from": ("lora", "loha", "lokr"), "placeholder_token": ("textual_inversion",),
                  "initializer_token": ("textual_inversion",), "num_vectors": ("textual_inversion",),
                  "train_text_encoder": ("full", "lora", "loha", "lokr")}
        for name, methods in owners.items():
            info = type(self).model_fields[name]
            if getattr(self, name) != info.get_default() and self.type not in methods:
                raise ValueError(f"method.{name} applies to method.type {' or '.join(methods)}, not {self.type}")
        if self.type == "textual_inversion":
            for name in ("placeholder_token", "initializer_token"):
                value = getattr(self, name)
                if not value or not value.strip() or len(value) > 100 or any(c.isspace() for c in value):
                    raise ValueError(f"method.{name}: textual_inversion needs one word without spaces "
                                     f"(e.g. placeholder_token=<my-cat> initializer_token=cat), got {value!r}")
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
    class_prompt: Optional[str] = Field(None, description="Prior preservation: the caption of this dataset's class images.")
    class_dir: Optional[str] = Field(None, description="Prior preservation: a folder of class images (generated ones go here too).")
    num_class_images: Optional[int] = Field(None, ge=1, description="Prior preservation: class images to have; missing ones are generated.")


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
    class_prompt: Optional[str] = Field(
        None, description="DreamBooth prior preservation: the caption of the class images (e.g. 'a photo of a dog')."
    )
    class_dir: Optional[str] = Field(
        None, description="Folder of class images; generated ones are written here (default: RUN/class_images/N)."
    )
    num_class_images: Optional[int] = Field(
        None, ge=1, description="Class images to have; the missing ones are generated with the base model before training."
    )
    class_steps: int = Field(30, ge=1, description="Sampler steps of each generated class image.")
    class_guidance: float = Field(7.5, ge=0.0, description="Guidance scale of the generated class images.")

    @model_validator(mode="after")
    def _multiple_of_8(self):
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.min_side and self.max_side and self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        for source in self.sources():
            if (source.class_dir or source.num_class_images) and not source.class_prompt:
                raise ValueError(f"class_dir / num_class_images of dataset '{source.dataset}' need a class_prompt")
            if source.class_prompt and not (source.class_dir or source.num_class_images):
                raise ValueError(f"class_prompt of dataset '{source.dataset}' needs class_dir or num_class_images")
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


# train.compile=auto compiles CUDA runs at least this long: compiling takes ~1-2 min for SDXL on a
# GPU, which a run must win back (1.2-1.6x steps/s) before it pays. Not CPU runs: there inductor
# compiles for many minutes (20+ min wall for a tiny SD 1.5-structure UNet on a loaded 2-core box).
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
        "CUDA (true also compiles on a CPU; one warning and eager training if compiling fails)."
    )
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the trained weights; bf16 halves weights and gradients and rounds each update "
        "stochastically (needs mixed_precision bf16)."
    )
    ema_on_cpu: bool = Field(False, description="Keep the EMA on the CPU (saves 4 bytes a weight of GPU memory).")
    channels_last: bool = Field(False, description="channels_last memory format for the UNet.")
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="Weight of the prior-preservation loss on class images (data.class_prompt)."
    )

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
    every: int = Field(10, ge=1, description="Log loss, lr, grad norm and steps/s every N steps.")
    wandb: bool = Field(
        False, description="Also log to Weights & Biases (extra `wandb`; WANDB_MODE=offline writes OUTPUT_DIR/wandb only)."
    )
    wandb_project: str = Field("sdkit", description="wandb: project name.")
    wandb_run_name: Optional[str] = Field(None, description="wandb: run name; default: the output_dir folder name.")
    wandb_entity: Optional[str] = Field(None, description="wandb: team or user the run belongs to; default: yours.")

    @model_validator(mode="after")
    def _wandb_keys(self):
        for name in ("wandb_project", "wandb_run_name", "wandb_entity"):
            if not self.wandb and getattr(self, name) != type(self).model_fields[name].get_default():
                raise ValueError(f"logging.{name} applies with logging.wandb: true")
        return self
