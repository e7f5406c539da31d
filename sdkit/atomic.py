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


@contextmanager
def atomic_entries(folder: PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder inside `folder`; when the block succeeds, each entry written
    into it replaces the entry of the same name in `folder` (each one atomically, as atomic_dir).

    Everything else in `folder` stays: an export with --force into a folder that also holds
    another run's checkpoints replaces only what the export writes. `folder` may be `.`.
    """
    folder = Path(os.path.abspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".export{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        entries = sorted(tmp.iterdir())
        clash = [e.name for e in entries if (folder / e.name).exists() or (folder / e.name).is_symlink()]
        if clash and not overwrite:
            raise FileExistsError(f"{folder / clash[0]} already exists")
        for entry in entries:
            if fsync:
                paths = [entry] if entry.is_file() else [Path(r) / n for r, _, fs in os.walk(entry) for n in fs]
                for path in paths:
                    _fsync_file(path)
            final = folder / entry.name
            old = None
            if final.exists() or final.is_symlink():
                old = temporary_sibling(final)
                os.rename(final, old)
            os.rename(entry, final)
            if old is not None:
                _remove(old)
        if fsync:
            _fsync_dir(folder)
    finally:
        _remove(tmp)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(folder: PathLike, marks: tuple[str, ...] = (TEMP_MARK,)) -> list[Path]:
    """Delete hidden temporaries in `folder` left by killed processes: names starting with "."
    that hold one of `marks` followed by the writer's pid, when that pid is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = path.name
        mark = next((m for m in marks if name.startswith(".") and m in name), None)
        if mark is None:
            continue
        pid = name.split(mark, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(path)
            removed.append(path)
    return removed
