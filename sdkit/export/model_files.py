"""The files of a local model folder that an export may read: only what model_index.json names,
and only inside the folder.

A model folder from a git clone or a tarball is untrusted. Its model_index.json may name a
component `../Documents` (sdkit.inference.loading refuses such names when it reads the index),
and any file or sub-folder in it may be a symlink to `/etc/passwd` or out through `..`. Every
path is resolved here and must stay inside the folder, so an export never packs, copies or
writes through anything outside it. One exception: a snapshot folder of the Hugging Face cache
(`models--org--name/snapshots/REV`) links into its own `blobs/`, which is part of the same repo.
Pickled weights are refused, never loaded: a .bin/.ckpt/.pt can run code when unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdkit.errors import UserError

MODEL_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


@dataclass(frozen=True)
class ModelFile:
    rel: Path  # path inside the model folder, as model_index.json's layout names it
    source: Path  # the real file to read (symlinks resolved, checked to stay inside)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _allowed_root(folder: Path) -> str:
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return str(real.parent.parent)  # the HF cache's repo folder: snapshots link into blobs/
    return str(real)


def _checked(path: Path, root: str, folder: Path, key: str) -> Path:
    real = os.path.realpath(path)
    if not _inside(real, root):
        rel = os.path.relpath(path, folder)
        raise UserError(f"{key}: '{rel}' in '{folder}' is a link out of the model folder; "
                        "sdkit reads nothing outside the model folder (copy the real file in)")
    return Path(real)


def component_files(folder: str | os.PathLike, key: str = "--model") -> dict[str, list[ModelFile]]:
    """Every file of each component model_index.json names, by component; the index itself under ''."""
    from sdkit.inference.loading import read_model_index

    folder = Path(folder)
    root = _allowed_root(folder)
    index_source = _checked(folder / MODEL_INDEX, root, folder, key)
    index = read_model_index(str(folder))  # refuses component names that are not plain folder names
    found: dict[str, list[ModelFile]] = {"": [ModelFile(Path(MODEL_INDEX), index_source)]}
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        start = folder / component
        if not (start.exists() or start.is_symlink()):
            found[component] = []  # missing: a loader decides whether the model still works
            continue
        _checked(start, root, folder, key)
        found[component] = _walk(folder, start, root, key)
    return found


def _walk(folder: Path, start: Path, root: str, key: str) -> list[ModelFile]:
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
        real_dir = str(_checked(Path(dirpath), root, folder, key))
        if real_dir in seen:  # a link loop inside the folder: walk each real folder once
            dirnames[:] = []
            continue
        seen.add(real_dir)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            source = _checked(path, root, folder, key)
            if source.is_file():
                files.append(ModelFile(path.relative_to(folder), source))
    return sorted(files, key=lambda f: str(f.rel))


def refuse_pickled_weights(files: dict[str, list[ModelFile]], folder, key: str = "--model") -> None:
    """A component whose weights exist only pickled is refused in one line (safetensors beside a
    .bin are used and the .bin ignored)."""
    for component, entries in files.items():
        if not component:
            continue
        pickled = [f for f in entries if f.rel.name.endswith(PICKLE_SUFFIXES)]
        safe = [f for f in entries if f.rel.name.endswith(".safetensors")]
        if pickled and not safe:
            raise UserError(f"{key}: '{folder}' has only pickled weights for {component} ({pickled[0].rel}); "
                            "sdkit loads no pickle (it can run code): convert them to safetensors first")
