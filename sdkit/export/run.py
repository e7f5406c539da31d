"""`sdkit export`: check the arguments, decide what gets written where, hand over to a writer.

Every argument problem is a UserError raised before any weights load. Writers live in
sdkit.export.safetensors (diffusers folders, single files, LoRA files) and sdkit.export.mar
(TorchServe archives); both name their output with `default_name` and check `--name` here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError

FORMATS = ("mar", "safetensors", "kserve")
DTYPES = ("fp16", "bf16", "fp32")
LORA_FORMATS = ("peft", "kohya")
SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_OUT = Path("export")  # an export without --out goes to export/NAME/
# An export's name is a file name and a TorchServe model name: torch-model-archiver's rule.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise UserError(f"{flag}: '{value}' is not one of {', '.join(allowed)}")
    return value


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"--name: '{name}' may hold only letters, digits, '_', '-' and '.', "
                        "and start with a letter or digit (it becomes a file name)")
    return name


def default_name(resolved) -> str:
    """The name of an export without --name: the run or model folder's name, or the hub id's
    last part, made to pass check_name."""
    source = resolved.run_dir or resolved.base
    stem = Path(str(source).rstrip("/\\")).name
    if resolved.checkpoint:  # RUN/checkpoints/checkpoint-N -> RUN-checkpoint-N
        stem += "-" + Path(resolved.checkpoint).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "model"


def refuse_existing(path: Path, force: bool) -> bool:
    """An existing output (a file, or a folder with anything in it) needs --force.

    Returns whether the writer may replace what is at `path` (--force, or an empty folder).
    """
    if not (path.exists() or path.is_symlink()):
        return force
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return True  # an empty folder holds nothing to lose
    if not force:
        raise UserError(f"--out: '{path}' already exists; pass --force to overwrite it")
    return True


def _file_target(out: Path, file_name: str) -> Path:
    """--out as a file when it ends in .safetensors, else a folder to put `file_name` in."""
    if out.suffix == SAFETENSORS_SUFFIX:
        return out
    if out.is_file():
        raise UserError(f"--out: '{out}' is a file; give a folder or a path ending in {SAFETENSORS_SUFFIX}")
    return out / file_name


def export_command(
    format: str,
    model: str,
    out: Optional[str] = None,
    lora: Optional[str] = None,
    refiner: Optional[str] = None,
    name: Optional[str] = None,
    dtype: Optional[str] = None,
    single_file: bool = False,
    lora_format: str = "peft",
    fuse_lora: bool = False,
    lora_scale: float = 1.0,
    force: bool = False,
    archive_format: str = "default",
    check: bool = False,
    max_steps: int = 50,
    max_size: int = 1024,
    max_batch: int = 4,
    settings=None,
    split: bool = False,
) -> list[Path]:
    """Export `model` (+ LoRA) in `format`; returns the paths written. Without `out`: export/NAME/.

    settings: a ServeSettings (generation defaults, refiner, timeouts, requirements) for --format mar.
    split: --format kserve serves the text encoder, denoiser and decoder as models of their own too.
    dtype None: fp16 for safetensors; for mar, local safetensors as stored (others re-saved fp32).
    """
    from sdkit.export.mar import ARCHIVE_FORMATS
    from sdkit.inference.loading import resolve_lora, resolve_model

    _choice(format, FORMATS, "--format")
    if dtype is not None:
        _choice(dtype, DTYPES, "--dtype")
    _choice(lora_format, LORA_FORMATS, "--lora-format")
    _choice(archive_format, tuple(ARCHIVE_FORMATS), "--archive-format")
    if name is not None:
        check_name(name)
    if lora_scale <= 0:
        raise UserError(f"--lora-scale: must be positive, got {lora_scale}")

    resolved = resolve_model(model)
    if lora and resolved.lora:
        raise UserError(f"--lora: --model '{model}' is a LoRA run that already brings its LoRA ({resolved.lora})")
    lora_ref = resolve_lora(lora) if lora else resolved.lora
    out_path = Path(os.path.expanduser(out)) if out else DEFAULT_OUT / (name or default_name(resolved))

    if format == "mar":
        from dataclasses import replace

        from sdkit.export.serve_settings import ServeSettings

        settings = replace(settings or ServeSettings(), dtype=dtype)
        return _export_mar(resolved, lora_ref, refiner, out_path, name, archive_format, fuse_lora, lora_scale,
                           check, max_steps, max_size, max_batch, force, single_file, lora_format, settings)
    if settings is not None and settings != _default_settings():
        raise UserError("--steps/--width/--height/--guidance/--negative-prompt/--image-format/--refiner-*/"
                        "--*-timeout/--no-requirements: only used with --format mar")
    if format == "kserve":
        if refiner or check or archive_format != "default":
            raise UserError("--refiner/--check/--archive-format: only used with --format mar")
        from sdkit.export.kserve import export_kserve

        settings = settings or _default_settings()
        settings.check(max_steps=max_steps, max_size=max_size, refiner=False)
        return export_kserve(resolved, out_path, name=name or default_name(resolved),
                             lora=_local_lora(lora_ref), lora_scale=lora_scale, dtype=dtype, max_steps=max_steps,
                             max_size=max_size, max_batch=max_batch, image_format=settings.image_format,
                             force=refuse_existing(out_path, force), split=split)
    if split:
        raise UserError("--split: only used with --format kserve")
    if refiner:
        raise UserError("--refiner: only used with --format mar")
    if check:
        raise UserError("--check: only used with --format mar")
    if archive_format != "default":
        raise UserError("--archive-format: only used with --format mar")
    return _export_safetensors(resolved, lora_ref, out_path, name=name, dtype=dtype or "fp16", single_file=single_file,
                               lora_format=lora_format, fuse_lora=fuse_lora, lora_scale=lora_scale, force=force)


def _export_safetensors(resolved, lora_ref: Optional[str], out_path: Path, *, name: Optional[str], dtype: str,
                        single_file: bool, lora_format: str, fuse_lora: bool, lora_scale: float,
                        force: bool) -> list[Path]:
    if fuse_lora and not lora_ref:
        raise UserError("--fuse-lora: no LoRA to fuse (pass --lora, or a LoRA run folder as --model)")
    if lora_format == "kohya" and not lora_ref:
        raise UserError("--lora-format kohya: needs a LoRA (pass --lora, or a LoRA run folder as --model)")
    if lora_format == "kohya" and fuse_lora:
        raise UserError("--lora-format kohya: a fused LoRA is part of the model; drop --lora-format or --fuse-lora")
    if lora_scale != 1.0 and not fuse_lora:
        raise UserError("--lora-scale: only used with --fuse-lora (an unfused LoRA's strength is set where it is loaded)")
    if single_file and lora_ref and not fuse_lora:
        raise UserError("--single-file: writes a full checkpoint; add --fuse-lora to merge the LoRA into it, "
                        "or drop --single-file to export the LoRA file")

    from sdkit.export import safetensors as writer

    stem = name or default_name(resolved)
    fused = lora_ref if fuse_lora else None
    if single_file:
        writer.single_file_info(resolved.base)  # configs only: fails fast for a family without the layout
        target = _file_target(out_path, stem + SAFETENSORS_SUFFIX)
        replace = refuse_existing(target, force)
        return writer.export_single_file(resolved.base, target, dtype=dtype, lora=fused, lora_scale=lora_scale,
                                         force=replace, title=name or target.stem)
    if lora_ref and not fuse_lora:
        from sdkit.inference.loading import LORA_FILE

        recipe = _run_recipe(resolved.run_dir) if resolved.lora else None
        file_name = LORA_FILE if lora_format == "peft" else stem + SAFETENSORS_SUFFIX
        target = _file_target(out_path, file_name)
        replace = refuse_existing(target, force)
        if lora_format == "kohya":
            writer.model_info(resolved.base)  # fail on unreadable base configs before reading the LoRA
        return writer.export_lora(lora_ref, target, base=resolved.base, lora_format=lora_format, dtype=dtype,
                                  recipe=recipe, name=name or target.stem, force=replace)
    if out_path.suffix == SAFETENSORS_SUFFIX:
        raise UserError(f"--out: a diffusers export is a folder, not '{out_path.name}' (or add --single-file)")
    replace = refuse_existing(out_path, force)
    # A run's model card describes its final result, not one of its checkpoints.
    card = Path(resolved.run_dir) / writer.MODEL_CARD if resolved.run_dir and not resolved.checkpoint else None
    return writer.export_diffusers(resolved.base, out_path, dtype=dtype, lora=fused, lora_scale=lora_scale,
                                   force=replace, model_card=card)


def _local_lora(ref: Optional[str]) -> Optional[str]:
    from sdkit.inference.loading import local_lora_file

    return local_lora_file(ref) if ref else None


def _default_settings():
    from sdkit.export.serve_settings import ServeSettings

    return ServeSettings()


def _run_recipe(run_dir: Optional[str]):
    if not run_dir:
        return None
    from sdkit.inference.loading import RECIPE_FILE
    from sdkit.recipe import load_recipe

    return load_recipe(Path(run_dir) / RECIPE_FILE)


def _export_mar(resolved, lora_ref, refiner, out_path, name, archive_format, fuse_lora, lora_scale, check,
                max_steps, max_size, max_batch, force, single_file, lora_format, settings) -> list[Path]:
    if single_file:
        raise UserError("--single-file: only used with --format safetensors")
    if lora_format != "peft":
        raise UserError("--lora-format: only used with --format safetensors")
    if fuse_lora and not lora_ref:
        raise UserError("--fuse-lora: no LoRA to fuse (pass --lora, or a LoRA run folder as --model)")
    if refiner:
        from sdkit.inference.loading import resolve_model

        refiner = resolve_model(refiner, key="--refiner").base
    from sdkit.export.mar import export_mar

    written = export_mar(
        resolved, lora=lora_ref, refiner=refiner, out=str(out_path), name=name, archive_format=archive_format,
        fuse_lora=fuse_lora, max_steps=max_steps, max_size=max_size, max_batch=max_batch, force=force,
        lora_scale=lora_scale, settings=settings,
    )
    if check:
        from sdkit.export.torchserve import check_archive

        check_archive(str(out_path), name)  # name None: the one model the exported config serves
    return written
