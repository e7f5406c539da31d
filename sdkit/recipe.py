"""Typed training recipes: a YAML file plus dotted KEY=VALUE overrides.

Imports only pydantic and yaml, so a recipe is checked before torch or any model loads.
Every problem becomes a `UserError` whose one line names the key and the file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from sdkit.errors import UserError, shorten
from sdkit.recipe_sections import (  # noqa: F401  (re-exported: sdkit.recipe is where callers look)
    COMPILE_AUTO_MIN_STEPS,
    SOURCE_KEYS,
    DataConfig,
    DatasetEntry,
    LoggingConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
    _Section,
)


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
        auto: on CUDA, for runs long enough to win the compile time back. Not on a CPU, where
        inductor's C++ compile of a whole UNet takes many minutes on a few cores (see
        COMPILE_AUTO_MIN_STEPS) and a run rarely lasts long enough to win them back."""
        setting = self.train.compile
        if setting != "auto":
            return bool(setting)
        long_run = self.train.max_steps is None or self.train.max_steps >= COMPILE_AUTO_MIN_STEPS
        return device_type == "cuda" and long_run

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
        if self.method.trains_text_encoders:
            return ("textual inversion trains the text encoders' input embeddings" if self.method.type == "textual_inversion"
                    else "the text encoder is trained")
        if not self.data.center_crop:
            return "random crops change the pixels every epoch (data.center_crop=false)"
        if self.data.shuffle_caption:
            return "shuffled tags change the captions every epoch (data.shuffle_caption=true)"
        return None

    @property
    def prior_preservation(self) -> bool:
        """Some dataset has class images (DreamBooth prior preservation): every micro-batch
        pairs its instance samples with as many class samples of the same bucket."""
        return any(s.class_prompt for s in self.data.sources())

    @property
    def micro_batch_rows(self) -> int:
        """Samples in one micro-batch: train.batch_size, doubled by the class samples."""
        return self.train.batch_size * (2 if self.prior_preservation else 1)

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
    if len(key) > 100:  # no recipe key is this long: no suggestion (difflib is quadratic in it)
        return f"unknown key '{shorten(key)}'"
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


class _RecipeLoader(yaml.SafeLoader):
    """YAML without aliases: a recipe never needs `*name`, and a few hundred bytes of nested
    aliases expand to billions of values (an alias bomb) in every tool that walks them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{shorten(event.anchor, 40)}) are not "
                                              "allowed in a recipe; write the value out", event.start_mark)
        return super().compose_node(parent, index)


MAX_DEPTH = 12  # a recipe is section.key (lists of strings at most); deeper nesting is refused cheaply


def _depth_problem(data: Any) -> Optional[str]:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep (a recipe is sections of keys)"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return None


def load_yaml(text: str, where: str) -> Any:
    """YAML from outside as a recipe reads it: no aliases, nesting bounded, errors one line."""
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}:{line} is not valid YAML ({shorten(getattr(e, 'problem', None) or e)})") from None
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep (a recipe is sections of keys)") from None
    problem = _depth_problem(data)
    if problem:
        raise UserError(f"{where}: {problem}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"command line: override '{shorten(text)}' is not KEY=VALUE (e.g. train.max_steps=500)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(part.strip() for part in parts):
        raise UserError(f"command line: override '{shorten(text)}': '{shorten(key)}' is not a dotted key "
                        "(e.g. train.max_steps=500)")
    if len(parts) > MAX_DEPTH:
        raise UserError(f"command line: override '{shorten(text)}': no recipe key is {len(parts)} levels deep")
    try:
        value = load_yaml(raw, "command line") if raw.strip() else None
    except UserError as e:
        if "nested" in str(e) or "aliases" in str(e):
            raise UserError(f"command line: override '{shorten(key)}': {str(e).split(': ', 1)[-1]}") from None
        value = raw  # not YAML: the text as it is
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
                raise UserError(f"command line: override '{shorten(text)}': '{shorten(part)}' is not a section")
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
        what = "file" if ref.lower().endswith((".safetensors", ".ckpt")) else "folder"
        raise UserError(f"{key}: {what} '{ref}' does not exist")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(f"recipe file '{where}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe file '{where}' cannot be read ({type(e).__name__})") from None
    data = load_yaml(text, where) or {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping of sections (model:, data:, train: ...)")
    touched = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, where, touched)


def _echo(value: Any) -> str:
    return shorten(repr(value))


def _validation_lines(e: ValidationError, origin) -> list[str]:
    lines = []
    for err in e.errors():
        key = shorten(".".join(str(p) for p in err["loc"]))
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
    def origin(key: str) -> str:  # a key set by an override, or a section an override created
        return "command line" if key in from_cli or any(k.startswith(f"{key}.") for k in from_cli) else where

    problems = [f"{origin(bad)}: {_unknown_key_message(bad)}" for bad in _walk_unknown(data, Recipe)]
    if problems:  # unknown keys first: pydantic would report each again as 'extra inputs'
        raise UserError("\n".join(problems))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError("\n".join(_validation_lines(e, origin))) from None
    refs = [(key, recipe.get(key)) for key in ("model.pretrained", "model.config", "model.vae", "model.refiner",
                                                "data.dataset")]
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

    from sdkit.single_file import config_source

    source = config_source(recipe.model)
    name = recipe.model.family if recipe.model.family != "auto" else (source and local_family(source))
    return check_recipe_family(recipe, name) if name else []
