"""A run folder is sdkit's: recognised by a marker, refused where it would overwrite the user's
files, and locked while a run writes into it.

- `check_output_dir` refuses (one line, before anything loads) an output_dir that is a file,
  that is (or lies inside) the dataset or a local model folder (a run writes samples, a README
  and, for full fine-tunes, model weights into it), or that already holds files without the
  marker `.sdkit-run` that every run writes first.
- `acquire_run_lock` holds an exclusive `flock` on `.sdkit-lock` for the run's life. A second run
  into the same folder exits 2 naming the holder's pid and host. The kernel drops the lock when
  a process dies (even by SIGKILL), so a lock file naming a dead process is taken over with a
  warning. The file's content (pid, host, start) only names the holder for the message.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from sdkit.atomic import is_temporary, pid_alive
from sdkit.errors import UserError, shorten

MARKER = ".sdkit-run"
LOCK_FILE = ".sdkit-lock"
_HELD: dict[str, int] = {}  # real path of a lock file -> its open descriptor, for this process


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder sdkit made: its marker, or (runs from before the marker) a checkpoint state file."""
    path = Path(path)
    return (path / MARKER).is_file() or any(path.glob("checkpoints/checkpoint-*/sdkit_state.json"))


def mark_run_folder(path: str | os.PathLike) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        (path / MARKER).write_text(json.dumps({"sdkit_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_dir(recipe) -> None:
    out = Path(os.path.expanduser(recipe.output_dir))
    where = shorten(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{where}' is a file; give a folder for the run")
    real = os.path.realpath(out)
    for key in ("data.dataset", "model.pretrained", "model.vae", "model.refiner"):
        ref = recipe.get(key)
        if not ref or not os.path.isdir(os.path.expanduser(ref)):
            continue  # a hub id: nothing of the user's to overwrite
        source = os.path.realpath(os.path.expanduser(ref))
        if _inside(real, source):
            what = "is" if real == source else "is inside"
            raise UserError(f"output_dir: '{where}' {what} the {key} folder '{shorten(ref)}'; a run writes samples, "
                            "checkpoints and results into output_dir: choose another folder")
    refuse_foreign_folder(out, "output_dir")


def refuse_foreign_folder(path: Path, key: str) -> None:
    """A folder that holds files but is no sdkit run folder is the user's: refused, never written into."""
    if path.is_dir() and not is_run_folder(path):
        own = {MARKER, LOCK_FILE}
        if any(p.name not in own and not is_temporary(p) for p in path.iterdir()):
            raise UserError(f"{key}: '{shorten(str(path))}' already holds files and is not an sdkit run folder "
                            f"(no {MARKER}); choose a new or empty folder so nothing of yours is overwritten")


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return (f"pid {shorten(holder.get('pid', '?'), 20)} on host {shorten(holder.get('host', '?'), 80)}, "
            f"since {shorten(holder.get('since', '?'), 40)}")


def acquire_run_lock(run_dir: str | os.PathLike, warn: Callable[[str], None]) -> None:
    """Lock `run_dir` for this process until it exits (or `release_run_lock`)."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = os.path.realpath(path)
    if key in _HELD:
        return  # a second Trainer in this process (bench --compare, notebooks): the lock is ours
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"output_dir: '{shorten(str(run_dir))}' is in use by another sdkit train ({_describe(holder)}); "
                        "wait for it to finish or choose another output_dir") from None
    except OSError:
        pass  # a filesystem without flock: the pid check below is all there is
    holder, host = _holder(fd), socket.gethostname()
    if holder.get("pid") and (holder.get("pid"), holder.get("host")) != (os.getpid(), host):
        if holder.get("host") == host and isinstance(holder["pid"], int) and pid_alive(holder["pid"]) \
                and holder["pid"] != os.getpid():
            os.close(fd)  # a filesystem that ignores flock: trust the live process instead
            raise UserError(f"output_dir: '{shorten(str(run_dir))}' is in use by another sdkit train "
                            f"({_describe(holder)}); wait for it to finish or choose another output_dir")
        warn(f"warning: took over the lock of {run_dir} left by a run that is gone ({_describe(holder)})")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
    os.fsync(fd)
    _HELD[key] = fd


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Empty the lock file (a clean end, not a stale lock) and unlock it. The file stays: deleting
    a lock file races with a run that has just opened it."""
    import fcntl

    fd = _HELD.pop(os.path.realpath(Path(run_dir) / LOCK_FILE), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_run_lock(Path(key).parent)
