"""Training data: where images and captions come from, how each sample is transformed, and
which samples each process sees in which order.

Sources (`load_records`), picked from what `data.dataset` points at:
  - a folder with `metadata.jsonl` (or `metadata.csv`): `file_name` plus a caption column;
  - a folder of images with a `.txt` caption beside each (kohya layout, subfolders included);
  - a folder of images without captions, with `data.instance_prompt`;
  - a folder written by `datasets.save_to_disk`, or of parquet/arrow/csv/json data files;
  - a hub dataset id, through `datasets.load_dataset`.

Every random choice a sample needs (flip, caption dropout, crop position) is drawn from
(seed, epoch, index) alone, never from a global RNG, so a resumed run and a latent cache see
exactly the same samples as an uninterrupted run, whatever the worker count (sdkit.training.samples).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from PIL import Image, ImageOps

from sdkit.errors import UserError, shorten
from sdkit.recipe import DataConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DATA_FILE_SUFFIXES = frozenset({".parquet", ".arrow", ".csv", ".json", ".jsonl"})
SHOW_PROGRESS_FROM = 200  # scanning fewer images is too quick for a progress bar to help
SUMMARY_NAMES = 5  # bad images named in the one-line skip summary

Log = Callable[[str], Any]


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class Record:
    """One training sample before any transform: a caption and a way to load its image."""

    name: str  # for messages: file path relative to the folder, or "<dataset>[<row>]"
    caption: str
    identity: str  # stable across runs while the image is unchanged; part of cache keys
    path: Optional[Path] = field(default=None, repr=False)
    rows: Optional["_HubRows"] = field(default=None, repr=False, compare=False)
    row: int = -1
    size: Optional[tuple[int, int]] = None  # (width, height) as loaded, once measured
    repeats: int = 1  # times seen per epoch
    dropout: Optional[float] = None  # caption dropout of its dataset (None: data.caption_dropout)
    source: int = 0  # which dataset of the run (index into sources.expand_sources)
    prior: bool = False  # a class image (DreamBooth prior preservation), not an instance image

    def image_size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation; local files are measured by the scan, hub rows here."""
        if self.size is not None:
            return self.size
        try:
            image = Image.open(self.path) if self.path is not None else self.rows.image(self.row)
            with image:
                return oriented_size(image)
        except Exception as e:
            raise UserError(f"data.dataset: image {self.name} could not be decoded ({_reason(e)})") from None

    def load_image(self) -> Image.Image:
        """The image as RGB, EXIF rotation applied. Raises UserError naming the file or row."""
        try:
            if self.path is not None:
                with Image.open(self.path) as image:
                    return to_rgb(image)
            return to_rgb(self.rows.image(self.row))
        except UserError:
            raise
        except Exception as e:  # PIL raises many types for broken files
            raise UserError(f"data.dataset: image {self.name} could not be decoded ({_reason(e)})") from None


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied (orientations 5-8 swap the sides)."""
    orientation = image.getexif().get(0x0112, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode fully, honour EXIF orientation, and put transparent pixels on white."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH_MODES:
        image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey, 32-bit integer and float images as 8-bit grey, by their real range.

    PIL's own convert clips these to 0..255 (16-bit photos come out white, 0..1 floats black).
    16-bit modes span 0..65535; floats within 0..1 span that; other 32-bit data span their
    own minimum..maximum (their nominal range says nothing about a scan's or a render's)."""
    import numpy as np

    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        low, high = 0.0, 1.0
    else:
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = (np.nan_to_num(array, nan=low) - low) / max(high - low, 1e-12)
    return Image.fromarray((scaled.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__


class _HubRows:
    """A `datasets.Dataset` whose image column we decode ourselves, so a broken row names itself."""

    def __init__(self, dataset, image_column: str):
        import datasets

        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.base_dir: Optional[Path] = None  # for string paths in a local dataset

    def image(self, row: int) -> Image.Image:
        value = self.dataset[row][self.image_column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):  # datasets.Image storage: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"]))
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str):
            path = Path(value)
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            return Image.open(path)
        raise ValueError(f"column '{self.image_column}' holds {type(value).__name__}, not an image")


# ---------------------------------------------------------------- loading

def load_records(cfg: DataConfig, *, log: Log = print, progress: bool = True) -> list[Record]:
    """Every usable sample of every dataset of `cfg` (see sdkit.training.sources), in a stable
    order, captions resolved, each with its dataset's repeats and caption dropout."""
    from sdkit.training.sources import expand_sources, with_prefix

    sources = expand_sources(cfg)
    records: list[Record] = []
    for number, source in enumerate(sources):
        found = load_source(source, log=log, progress=progress)
        label = f"{Path(source.dataset).name}/" if len(sources) > 1 else ""
        records += [replace(r, name=label + r.name, caption=with_prefix(source.caption_prefix, r.caption),
                            repeats=source.repeats, dropout=source.caption_dropout, source=number) for r in found]
    return records


def load_source(cfg: DataConfig, *, log: Log = print, progress: bool = True) -> list[Record]:
    """Every usable sample of `cfg.dataset`, in a stable order, captions resolved.

    Local image files are checked once here (each one decoded); unreadable ones are skipped
    with one summary line, or stop the run when `bad_images=error`. Hub rows are not scanned
    (too slow for big sets): a broken row raises when it is first loaded.
    `progress=False` hides the scan's progress bar (e.g. on every rank but the first).
    """
    source = os.path.expanduser(cfg.dataset)
    root = Path(source)
    if root.is_dir():
        records = _load_folder(root, cfg, log, progress)
    elif root.is_file():
        records = _load_with_datasets(cfg, log, data_files=root)
    elif _looks_like_path(cfg.dataset):
        raise UserError(f"data.dataset: folder '{cfg.dataset}' does not exist")
    else:
        records = _load_with_datasets(cfg, log)
    if not records:
        raise UserError(f"data.dataset: no usable images in '{cfg.dataset}'")
    return records


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _load_folder(root: Path, cfg: DataConfig, log: Log, progress: bool) -> list[Record]:
    for folder in (root, root / cfg.split):
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                records = _metadata_records(folder, folder / name, cfg, display_root=root)
                return _scan(records, cfg, log, progress)
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        return _load_with_datasets(cfg, log, saved=root)
    images = _image_files(root)
    if not images:
        if any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in root.rglob("*") if p.is_file()):
            return _load_with_datasets(cfg, log, data_dir=root)
        raise UserError(f"data.dataset: no images found in folder '{cfg.dataset}'")
    return _scan(_caption_file_records(root, images, cfg), cfg, log, progress)


def _image_files(root: Path) -> list[Path]:
    """Image files under root, hidden files and folders left out, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return found


def _file_record(path: Path, root: Path, caption: str) -> Record:
    # identity is filled in by the scan, from the file's bytes (see check_image)
    return Record(name=path.relative_to(root).as_posix(), caption=caption, identity="", path=path)


def _caption_file_records(root: Path, images: list[Path], cfg: DataConfig) -> list[Record]:
    if cfg.instance_prompt is not None:
        return [_file_record(p, root, cfg.instance_prompt) for p in images]
    ext = cfg.caption_extension
    captioned = [p for p in images if p.with_suffix(ext).is_file()]
    if not captioned:
        raise UserError(
            f"data.instance_prompt: folder '{cfg.dataset}' has no captions (no metadata.jsonl, "
            f"no {ext} beside the images); set data.instance_prompt"
        )
    if len(captioned) < len(images):
        missing = next(p for p in images if not p.with_suffix(ext).is_file())
        raise UserError(
            f"data.dataset: image {missing.relative_to(root).as_posix()} has no {ext} caption "
            f"({len(images) - len(captioned)} of {len(images)} lack one); add them or set data.instance_prompt"
        )
    records = []
    for p in images:
        caption = p.with_suffix(ext).read_text(encoding="utf-8", errors="replace").strip()
        records.append(_file_record(p, root, caption))
    return records


def _decoded_lines(meta: Path) -> list[str]:
    """The file's lines as text; invalid UTF-8 is named by line, not a traceback mid-read."""
    lines = []
    for number, raw in enumerate(meta.read_bytes().split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"data.dataset: {meta} line {number} is not valid UTF-8 (byte {e.start + 1})") from None
    return lines


def _metadata_rows(meta: Path) -> Iterator[tuple[int, dict]]:
    lines = _decoded_lines(meta)
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO("\n".join(lines), newline=""))
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"data.dataset: {meta} line {number} is not valid JSON ({getattr(e, 'msg', 'nested too deep')})") from None
        if not isinstance(row, dict):
            raise UserError(f"data.dataset: {meta} line {number} is not a JSON object")
        yield number, row


def _metadata_records(folder: Path, meta: Path, cfg: DataConfig, display_root: Path) -> list[Record]:
    records = []
    inside = folder.resolve()
    for number, row in _metadata_rows(meta):
        if "file_name" not in row:
            raise UserError(f"data.dataset: {meta} line {number} has no 'file_name'")
        file_name = row["file_name"]
        if not isinstance(file_name, str) or not file_name:
            raise UserError(f"data.dataset: {meta} line {number}: 'file_name' must be a file name in quotes "
                            f"(got {_echo(file_name)})")
        if cfg.instance_prompt is not None:
            caption = cfg.instance_prompt
        elif cfg.caption_column in row:
            caption = _caption_text(row[cfg.caption_column])
        else:
            raise UserError(
                f"data.caption_column: '{cfg.caption_column}' is not in {meta} line {number} "
                f"(it has: {', '.join(sorted(row))})"
            )
        path = folder / file_name
        if not path.resolve().is_relative_to(inside):
            raise UserError(f"data.dataset: {meta} line {number}: 'file_name' {_echo(file_name)} points outside {folder}")
        records.append(_file_record(path, display_root, caption))  # a listed but absent file is skipped by the scan
    return records


def _echo(value: Any) -> str:
    return shorten(repr(value), 60)  # a file_name is short: 60 characters name it


def _caption_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # several captions per image: take the first
        return _caption_text(value[0]) if value else ""
    return str(value).strip()


def _limit(cfg: DataConfig) -> int:
    return cfg.max_samples if cfg.max_samples is not None else math.inf


# ---------------------------------------------------------------- scanning local files

@dataclass(frozen=True)
class Checked:
    """What the scan learns about one file: why it is unusable, or its size and content digest."""

    problem: Optional[str] = None
    size: Optional[tuple[int, int]] = None
    digest: str = ""


def check_image(path: Path) -> Checked:
    """Decode the file once: its problem, or its (width, height) and the digest of its bytes
    (the latent cache's key: a file renamed or touched is still the same image)."""
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:32]
        with Image.open(io.BytesIO(data)) as image:
            size = oriented_size(image)
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))  # decoding at 1/8 scale still reads every byte
            image.load()
        return Checked(size=size, digest=digest)
    except FileNotFoundError:
        return Checked("file not found")
    except Exception as e:
        return Checked(_reason(e))


def _scan(records: list[Record], cfg: DataConfig, log: Log, progress: bool) -> list[Record]:
    """The first `max_samples` records whose image decodes, with their size and content
    identity; the others are skipped with one summary line, or stop the run when
    `bad_images=error`."""
    limit = _limit(cfg)
    good: list[Record] = []
    bad: list[tuple[Record, str]] = []
    checked = 0
    workers = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check_image, [r.path for r in records])
        if progress and len(records) >= SHOW_PROGRESS_FROM and limit >= SHOW_PROGRESS_FROM:
            results = _with_progress(results, len(records))
        try:
            for record, result in zip(records, results):
                checked += 1
                if result.problem is None:
                    good.append(replace(record, size=result.size, identity=f"sha256:{result.digest}"))
                elif cfg.bad_images == "error":
                    raise UserError(
                        f"data.dataset: image {record.name} is unreadable ({result.problem}); fix or remove it, "
                        f"or set data.bad_images=skip"
                    )
                else:
                    bad.append((record, result.problem))
                if len(good) >= limit:
                    break
        finally:
            results.close()  # ends the progress bar and cancels checks not yet started
    if bad:
        named = "; ".join(f"{r.name} ({why})" for r, why in bad[:SUMMARY_NAMES])
        more = f"; and {len(bad) - SUMMARY_NAMES} more" if len(bad) > SUMMARY_NAMES else ""
        log(f"skipped {len(bad)} unreadable image(s) of {checked}: {named}{more}")
    return good


def _with_progress(results: Iterator, total: int) -> Iterator:
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("checking images", total=total)
        for result in results:
            progress.advance(task)
            yield result


# ---------------------------------------------------------------- datasets library

def _load_with_datasets(cfg: DataConfig, log: Log, *, saved: Optional[Path] = None,
                        data_dir: Optional[Path] = None, data_files: Optional[Path] = None) -> list[Record]:
    import datasets

    try:
        if saved is not None:
            dataset = datasets.load_from_disk(str(saved))
            if isinstance(dataset, datasets.DatasetDict):
                if cfg.split not in dataset:
                    raise UserError(
                        f"data.split: '{cfg.split}' is not a split of '{cfg.dataset}' "
                        f"(it has: {', '.join(dataset)})"
                    )
                dataset = dataset[cfg.split]
        elif data_files is not None:
            builder = {".jsonl": "json"}.get(data_files.suffix, data_files.suffix.lstrip("."))
            dataset = datasets.load_dataset(builder, data_files=str(data_files), split=cfg.split)
        elif data_dir is not None:
            dataset = datasets.load_dataset(str(data_dir), split=cfg.split)
        else:
            dataset = datasets.load_dataset(cfg.dataset, split=cfg.split)
    except UserError:
        raise
    except ValueError as e:  # an unknown split, or a folder the builders cannot read
        raise UserError(f"data.dataset: could not load '{cfg.dataset}' split '{cfg.split}' ({_reason(e)})") from None
    except (FileNotFoundError, ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"data.dataset: could not load '{cfg.dataset}' ({_reason(e)})") from None

    columns = list(dataset.column_names)
    if cfg.image_column not in columns:
        raise UserError(f"data.image_column: '{cfg.image_column}' is not a column of '{cfg.dataset}' "
                        f"(columns: {', '.join(columns)})")
    if cfg.instance_prompt is None and cfg.caption_column not in columns:
        raise UserError(f"data.caption_column: '{cfg.caption_column}' is not a column of '{cfg.dataset}' "
                        f"(columns: {', '.join(columns)})")
    # Taken before select(): a row's identity must not depend on max_samples.
    fingerprint = getattr(dataset, "_fingerprint", None) or cfg.split
    if cfg.max_samples is not None and cfg.max_samples < len(dataset):
        dataset = dataset.select(range(cfg.max_samples))

    if cfg.instance_prompt is not None:
        captions = [cfg.instance_prompt] * len(dataset)
    else:  # reading one column does not decode any image
        captions = [_caption_text(c) for c in dataset.select_columns([cfg.caption_column])[cfg.caption_column]]
    rows = _HubRows(dataset, cfg.image_column)
    if saved is not None or data_dir is not None or data_files is not None:
        local = saved or data_dir or data_files.parent
        rows.base_dir = local
    return [
        Record(name=f"{cfg.dataset}[{i}]", caption=caption, identity=f"{cfg.dataset}@{fingerprint}[{i}]",
               rows=rows, row=i)
        for i, caption in enumerate(captions)
    ]
