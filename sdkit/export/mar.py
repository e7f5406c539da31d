"""`sdkit export --format mar`: a TorchServe model archive plus the config KServe's runtime reads.

Output, ready to copy to a bucket (KServe's `storageUri` points at OUT):

    OUT/config/config.properties   TorchServe config: addresses, model_snapshot, timeouts, sizes
    OUT/model-store/NAME.mar       sdkit_handler.py + sdkit_requests.py, sdkit_serve.json, model-config.yaml,
                                   pipeline/ (diffusers folder, safetensors), refiner/, lora/

The diffusers files go into the archive as they are (no model.zip inside the .mar: TorchServe
unpacks the archive once and the handler loads the folder). `no-archive` writes the unpacked
folder instead of a zip and `tgz` a .tar.gz, for models too large to zip comfortably.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from sdkit.atomic import atomic_dir, atomic_write_path, remove_stale_temporaries
from sdkit.errors import UserError
from sdkit.export.model_files import ModelFile, component_files, refuse_pickled_weights
from sdkit.export.run import check_name, default_name
from sdkit.export.serve_settings import ServeSettings, requirements_text
from sdkit.inference.loading import LORA_FILE, ResolvedModel, local_lora_file, read_model_index, resolve_lora

HANDLER_SOURCE = Path(__file__).with_name("handler.py")
HANDLER_NAME = "sdkit_handler.py"  # a distinctive module name: TorchServe imports it by name
# The handler's request parsing, shipped beside it under the name the handler imports.
REQUESTS_SOURCE = Path(__file__).with_name("handler_requests.py")
REQUESTS_NAME = "sdkit_requests.py"
ANSWERS_SOURCE = Path(__file__).with_name("handler_answers.py")
ANSWERS_NAME = "sdkit_answers.py"
SERVE_CONFIG = "sdkit_serve.json"  # must match handler.SERVE_CONFIG
MODEL_CONFIG = "model-config.yaml"
REQUIREMENTS = "requirements.txt"
STAGING_MARK = ".staging-"  # .NAME.staging-PID-xxxx: a default/tgz/zip-store archive being written
# torch-model-archiver's --archive-format choices and what each writes (its `archiving_options`):
# a deflated zip, a zip that stores files as they are (fast for weights, which hardly compress),
# a .tar.gz, or the unpacked folder.
ARCHIVE_FORMATS = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5", ".pb", ".safetensors")

MAX_REQUEST_BYTES = 1024 * 1024 + 4096  # the handler's own body cap (handler_requests.MAX_BODY_BYTES) and headers
MIN_RESPONSE_BYTES = 64 * 1024 * 1024  # TorchServe's default (6.5 MB) is too small for a batch of large PNGs

# Where KServe's TorchServe runtime mounts the bucket, and the ports its wrapper expects.
KSERVE_MODEL_STORE = "/mnt/models/model-store"
KSERVE_PROPERTIES = {
    "inference_address": "http://0.0.0.0:8085",
    "management_address": "http://0.0.0.0:8085",
    "metrics_address": "http://0.0.0.0:8082",
    "grpc_inference_port": "7070",
    "grpc_management_port": "7071",
}


def export_mar(
    model: ResolvedModel,
    *,
    out: str | Path,
    lora: Optional[str] = None,
    refiner: Optional[str] = None,
    name: Optional[str] = None,
    archive_format: str = "default",
    fuse_lora: bool = False,
    max_steps: int = 50,
    max_size: int = 1024,
    max_batch: int = 4,
    force: bool = False,
    lora_scale: float = 1.0,
    settings: Optional[ServeSettings] = None,
) -> list[Path]:
    """Write OUT/model-store/NAME.mar (or NAME/, NAME.tar.gz) and OUT/config/config.properties."""
    name, lora_file = _check_arguments(model, lora=lora, refiner=refiner, name=name, archive_format=archive_format,
                                       fuse_lora=fuse_lora, limits=(max_steps, max_size, max_batch))
    settings = (settings or ServeSettings()).check(max_steps=max_steps, max_size=max_size, refiner=bool(refiner))
    out = Path(os.path.expanduser(str(out)))
    store, config_path = out / "model-store", out / "config" / "config.properties"
    archive = store / f"{name}{ARCHIVE_FORMATS[archive_format]}"
    existing = [p for p in (store / f"{name}{ext}" for ext in set(ARCHIVE_FORMATS.values())) if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to overwrite it")
    manifest = _manifest(name, settings.requirements)  # also fails early when torch-model-archiver is missing
    store.mkdir(parents=True, exist_ok=True)

    serve_config = {
        "sdkit_serve": 1,
        "pipeline": "pipeline",
        "refiner": "refiner" if refiner else None,
        "lora": f"lora/{LORA_FILE}" if lora_file and not fuse_lora else None,
        "lora_scale": lora_scale,
        "limits": {"max_steps": max_steps, "max_size": max_size, "max_batch": max_batch},
        "defaults": settings.defaults(max_steps),
        **(settings.refiner_config() if refiner else {}),
    }

    def fill(stage: Path, *, link: bool) -> None:
        stage_pipeline(model.base, stage / "pipeline", link=link, lora_file=lora_file if fuse_lora else None,
                       lora_scale=lora_scale, dtype=settings.dtype)
        if refiner:
            stage_pipeline(refiner, stage / "refiner", link=link, dtype=settings.dtype)
        if serve_config["lora"]:
            (stage / "lora").mkdir()
            _place(Path(lora_file), stage / "lora" / LORA_FILE, link=link)
        shutil.copyfile(HANDLER_SOURCE, stage / HANDLER_NAME)
        shutil.copyfile(REQUESTS_SOURCE, stage / REQUESTS_NAME)
        shutil.copyfile(ANSWERS_SOURCE, stage / ANSWERS_NAME)
        (stage / SERVE_CONFIG).write_text(json.dumps(serve_config, indent=2) + "\n")
        (stage / MODEL_CONFIG).write_text(model_config_yaml(settings))
        if settings.requirements:
            (stage / REQUIREMENTS).write_text(requirements_text(peft=bool(serve_config["lora"])))

    _write_store(archive, name, archive_format, manifest, fill)
    for stale in existing:  # --force: a previous export of this name in another format goes too
        if stale != archive:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    with atomic_write_path(config_path) as target:
        target.write_text(config_properties(name, archive.name, max_size=max_size, max_batch=max_batch,
                                            previous=config_path, settings=settings))
    return [archive, config_path]


def _write_store(archive: Path, name: str, archive_format: str, manifest: str, fill) -> None:
    """`fill(stage, link=...)` stages the archive's files; the archive appears at `archive` complete or not at all."""
    if archive_format == "no-archive":
        remove_stale_temporaries(archive.parent)
        # Copies, never hard links: the folder outlives this call and must not change with the source.
        with atomic_dir(archive, overwrite=True) as stage:
            fill(stage, link=False)
            _write_archive(stage, stage.name, stage.parent, manifest, archive_format)
        return
    # The staging folder's name carries our pid, so the next export can tell the leftovers of a
    # killed one (hundreds of MB in the folder KServe's storageUri points at) and remove them.
    remove_stale_temporaries(archive.parent.parent, marks=(STAGING_MARK,))
    remove_stale_temporaries(archive.parent)
    with tempfile.TemporaryDirectory(prefix=f".{name}{STAGING_MARK}{os.getpid()}-", dir=archive.parent.parent) as tmp:
        stage = Path(tmp) / "content"
        stage.mkdir()
        fill(stage, link=True)  # hard links are fine here: the staging folder is deleted after zipping
        _write_archive(stage, name, Path(tmp), manifest, archive_format)
        with atomic_write_path(archive) as target:
            os.replace(Path(tmp) / archive.name, target)


# ------------------------------------------------------------------------ naming, inputs


def _check_arguments(model: ResolvedModel, *, lora, refiner, name, archive_format, fuse_lora,
                     limits: tuple[int, int, int]) -> tuple[str, Optional[str]]:
    """(the archive's name, the local LoRA file or None); every problem a UserError before any weights load."""
    if archive_format not in ARCHIVE_FORMATS:
        raise UserError(f"--archive-format: '{archive_format}' is not one of {', '.join(ARCHIVE_FORMATS)}")
    for flag, value, low in zip(("--max-steps", "--max-size", "--max-batch"), limits, (1, 8, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"{flag}: must be an integer of at least {low}, got {value}")
    name = check_name(name or default_name(model))
    lora_file = _lora_file(lora, model)
    if fuse_lora and lora_file is None:
        raise UserError("--fuse-lora: there is no LoRA to fuse (pass --lora or a LoRA training run as --model)")
    read_model_index(model.base)  # fails early, naming the folder, when it is not a pipeline
    if refiner is not None:
        from sdkit.families import detect_family, family_class

        family = family_class(detect_family(model.base, key="--model"))
        if not family.refiner_capable:
            raise UserError(f"--refiner: only {_refiner_families()} base models take a refiner; "
                            f"'{model.base}' is a {family.name} model")
        read_model_index(refiner)  # fails early, naming the folder, when it is not a pipeline
    return name, lora_file


def _refiner_families() -> str:
    from sdkit.families import family_class, family_names

    return ", ".join(n for n in family_names() if family_class(n).refiner_capable)


def _lora_file(lora: Optional[str], model: ResolvedModel) -> Optional[str]:
    """A local LoRA file: --lora wins over a LoRA run's own; hub LoRAs are fetched to the cache."""
    ref = resolve_lora(lora) if lora else model.lora
    return None if ref is None else local_lora_file(ref)


# ------------------------------------------------------------------------ staging the files


def stage_pipeline(source: str, dest: Path, *, link: bool, lora_file: Optional[str] = None, lora_scale: float = 1.0,
                   dtype: Optional[str] = None) -> None:
    """Put a loadable diffusers folder (safetensors only) at `dest`.

    A local folder whose weights are all plain safetensors is linked/copied file by file,
    keeping only what model_index.json names (a full fine-tune's run folder also holds
    checkpoints and logs), each file checked to lie inside the folder (sdkit.export.model_files).
    Anything else (hub ids, variants only, a LoRA to fuse) is loaded and saved again with
    safetensors; pickled weights are refused.
    """
    folder = Path(os.path.expanduser(source))
    if folder.is_dir():
        listing = component_files(folder)
        refuse_pickled_weights(listing, source)
        files = None if (lora_file is not None or dtype is not None) else _plain_safetensors_files(listing)
        if files is not None:
            for f in files:
                (dest / f.rel).parent.mkdir(parents=True, exist_ok=True)
                _place(f.source, dest / f.rel, link=link)
            return
    _resave_pipeline(source, dest, lora_file=lora_file, lora_scale=lora_scale, dtype=dtype or "fp32")


def _plain_safetensors_files(listing: dict[str, list[ModelFile]]) -> Optional[list[ModelFile]]:
    """The files to copy, or None when a component's weights are not plain safetensors."""
    files = list(listing[""])
    for component, entries in listing.items():
        if not component:
            continue
        if not entries:
            return None  # a component without its folder: let diffusers decide
        weights = []
        for f in entries:
            name = f.rel.name
            if name.endswith(WEIGHT_SUFFIXES):
                if not name.endswith(".safetensors"):
                    continue  # pickled weights beside safetensors: never shipped
                if _is_variant(name):
                    continue  # e.g. unet/diffusion_pytorch_model.fp16.safetensors beside the plain file
                weights.append(f)
            elif name.endswith(".safetensors.index.json") and _is_variant(name.replace(".index.json", "")):
                continue
            else:
                files.append(f)  # configs, tokenizer files, sharding index
        if not weights and any(f.rel.name == "config.json" and len(f.rel.parts) == 2 for f in entries):
            return None  # a model (it has a config.json) with only variant weights: let diffusers pick them
        files.extend(weights)
    return files


def _is_variant(filename: str) -> bool:
    """`model.fp16.safetensors` / `model.fp16-00001-of-00002.safetensors` are variants; `model.safetensors` is not."""
    stem = filename[: -len(".safetensors")]
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return "." in stem


def _resave_pipeline(source: str, dest: Path, *, lora_file: Optional[str], lora_scale: float, dtype: str) -> None:
    from sdkit.export.safetensors import load_pipeline

    # A LoRA is fused into the weights: the served model needs no peft and runs at the base's speed.
    pipe = load_pipeline(source, dtype=dtype, lora=lora_file, lora_scale=lora_scale)
    pipe.save_pretrained(dest, safe_serialization=True)


def _place(src: Path, dst: Path, *, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


# ------------------------------------------------------------------------ archive and configs


def _manifest(name: str, requirements: bool) -> str:
    try:
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging_utils import ModelExportUtils
    except ImportError:
        raise UserError("--format mar needs torch-model-archiver: pip install 'sdkit-recipes[serve]'") from None

    config = ModelArchiverConfig(model_name=name, handler=HANDLER_NAME, version="1.0", config_file=MODEL_CONFIG,
                                 requirements_file=REQUIREMENTS if requirements else None)
    return ModelExportUtils.generate_manifest_json(config)


def _write_archive(stage: Path, name: str, export_dir: Path, manifest: str, archive_format: str) -> None:
    """torch-model-archiver's own writer, given our staged folder (its CLI would copy it to /tmp first)."""
    from model_archiver.model_packaging_utils import ModelExportUtils

    ModelExportUtils.archive(str(export_dir), name, str(stage), manifest, archive_format)


def model_config_yaml(settings: ServeSettings) -> str:
    """Per-model settings TorchServe reads from the archive when it is registered by hand."""
    return (
        "# One worker holds the whole pipeline in GPU memory; raise maxWorkers on larger GPUs.\n"
        "minWorkers: 1\n"
        "maxWorkers: 1\n"
        "batchSize: 1\n"
        "maxBatchDelay: 100\n"
        f"responseTimeout: {settings.response_timeout}\n"
        f"startupTimeout: {settings.startup_timeout}\n"
    )


def response_bytes(max_size: int, max_batch: int) -> int:
    """Upper bound of one answer: max_batch incompressible RGB PNGs in base64 (4/3), or UINT8 tensors
    as JSON numbers ("255, ": 5 characters a value, plus brackets), plus JSON around them."""
    png = (max_size * max_size * 3 + max_size + 4096) * 4 // 3
    tensor = max_size * max_size * 3 * 5 + max_size * max_size * 4 + max_size * 4
    return max_batch * (max(png, tensor) + 64) + 65536


def read_properties(path: Path) -> dict:
    props = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


def config_properties(name: str, marname: str, *, max_size: int, max_batch: int, previous: Optional[Path] = None,
                      settings: Optional[ServeSettings] = None) -> str:
    """config.properties as KServe's TorchServe runtime expects it (model store at /mnt/models).

    Models of an earlier export into the same folder stay listed while their archive exists,
    so one bucket can hold several models.
    """
    settings = settings or ServeSettings()
    entry = {
        "defaultVersion": True, "marName": marname, "minWorkers": 1, "maxWorkers": 1, "batchSize": 1,
        "maxBatchDelay": 100, "responseTimeout": settings.response_timeout, "startupTimeout": settings.startup_timeout,
    }
    models = {}
    max_response = max(response_bytes(max_size, max_batch), MIN_RESPONSE_BYTES)
    if previous is not None:
        old = read_properties(previous)
        try:
            snapshot = json.loads(old.get("model_snapshot", "{}"))
        except json.JSONDecodeError:
            snapshot = {}
        store = previous.parent.parent / "model-store"
        for old_name, versions in (snapshot.get("models") or {}).items():
            kept = {v: e for v, e in versions.items() if isinstance(e, dict) and (store / str(e.get("marName"))).exists()}
            if kept and old_name != name:
                models[old_name] = kept
        if old.get("max_response_size", "").isdigit():
            max_response = max(max_response, int(old["max_response_size"]))
    models[name] = {"1.0": entry}
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    props = {
        **KSERVE_PROPERTIES,
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "number_of_netty_threads": "4",
        "job_queue_size": "10",
        # KServe sets the request envelope (kserve / kservev2) through TS_SERVICE_ENVELOPE.
        "enable_envvars_config": "true",
        # The stock KServe TorchServe image has torch but not diffusers/transformers: TorchServe installs
        # the archive's requirements.txt at load (--no-requirements: for images that already have them).
        "install_py_dep_per_model": "true" if settings.requirements else "false",
        # Requests are authenticated by KServe / the ingress, not by TorchServe's token.
        "disable_token_authorization": "true",
        "default_workers_per_model": "1",
        "default_response_timeout": str(settings.response_timeout),
        "default_startup_timeout": str(settings.startup_timeout),
        "max_request_size": str(MAX_REQUEST_BYTES),
        "max_response_size": str(max_response),
        "model_store": KSERVE_MODEL_STORE,
        "load_models": ",".join(sorted(f"{n}={e[next(iter(e))]['marName']}" for n, e in models.items())),
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    }
    lines = [
        "# TorchServe config written by `sdkit export --format mar`, laid out for KServe's TorchServe",
        "# runtime: point an InferenceService's storageUri at the folder holding config/ and model-store/.",
    ]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"
