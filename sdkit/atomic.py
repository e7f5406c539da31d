"""Write files and folders so that no reader ever sees a half-written one.

Everything is written under a hidden temporary name beside the target (same filesystem, so
the final rename is atomic) and renamed into place only when the block ends without error;
on error the temporary is removed and an existing target is left as it was. Temporary
names start with "." and contain ".tmp-", so globs such as `checkpoint-*` never match a
half-written one, and `is_temporary` tells leftovers of a killed process apart.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]
TEMP_MARK = ".tmp-"


def temporary_sibling(final: PathLike) -> Path:
    """A fresh hidden name in the target's folder, unique to this process and call."""
    final = Path(final)
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: PathLike) -> bool:
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open folders, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_write_path(final: PathLike, *, overwrite: bool = True, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary file path; when the block succeeds it becomes `final`.

    The caller writes the file at the yielded path (e.g. `safetensors.torch.save_file(sd, tmp)`).
    With `overwrite=False` an existing `final` raises FileExistsError instead of being replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        if fsync:
            _fsync_file(tmp)
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} already exists")
        os.replace(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    finally:
        _remove(tmp)  # no-op after a successful rename


@contextmanager
def atomic_dir(final: PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds it becomes `final`.

    A folder cannot be renamed over a non-empty one, so with `overwrite=True` the old folder
    is first moved aside and deleted after the new one is in place: a reader sees the old
    folder, then (after a moment with no folder at all) the complete new one, never a mix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if fsync:
            for root, _, files in os.walk(tmp):
                for name in files:
                    _fsync_file(Path(root) / name)
        if final.exists() or final.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = temporary_sibling(final)
            os.rename(final, old)
        os.rename(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the previous folder back
            old = None
        raise
    finally:
        _remove(tmp)
        if old is not None:
            _remove(old)
