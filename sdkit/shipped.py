"""The recipes that ship with sdkit: where they are, one line about each, a copy to edit.

The YAML files live once, in the checkout's top-level `recipes/`; `sdkit/recipes` is a link
to it, so a built wheel carries them as package data and an installed sdkit finds them
beside its own code. `sdkit train NAME` takes a shipped recipe's name where a path does not
exist (torchtune's `tune ls` / `tune cp` habit). Torch-free: the CLI lists them instantly.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from sdkit.errors import UserError

SUMMARY_CHARS = 90
GPU_LINE = re.compile(r"^#\s*gpu:\s*(.+)$", re.MULTILINE)  # each recipe says what it is sized for


def recipes_dir() -> Path:
    """The shipped recipes: inside the installed package, or this checkout's recipes/."""
    here = Path(__file__).resolve().parent
    for root in (here / "recipes", here.parent / "recipes"):
        if root.is_dir():
            return root
    raise UserError("the shipped recipes are missing from this sdkit install (reinstall it)")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    family: str
    method: str
    gpu: str
    summary: str


def _describe(path: Path) -> ShippedRecipe:
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    model, method = data.get("model") or {}, data.get("method") or {}
    gpu = GPU_LINE.search(text)
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#") and not GPU_LINE.match(line)]
    sentence = " ".join(comments).split(". ")[0].rstrip(".")
    return ShippedRecipe(
        name=path.stem, path=path, family=str(model.get("family", "auto")),
        method=str(method.get("type", "lora")), gpu=gpu.group(1).strip() if gpu else "-",
        summary=sentence if len(sentence) <= SUMMARY_CHARS else sentence[: SUMMARY_CHARS - 3].rstrip() + "...",
    )


def shipped_recipes() -> list[ShippedRecipe]:
    return [_describe(p) for p in sorted(recipes_dir().glob("*.yaml"))]


def shipped_path(name: str) -> Optional[Path]:
    """The shipped recipe called `name` (with or without .yaml), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        return None
    path = recipes_dir() / f"{stem}.yaml"
    return path if path.is_file() else None


def resolve_recipe(ref: str | Path) -> Path:
    """A recipe argument: an existing file, else a shipped recipe's name."""
    path = Path(ref)
    if path.is_file():
        return path
    found = shipped_path(str(ref))
    if found is not None:
        return found
    names = ", ".join(r.name for r in shipped_recipes())
    raise UserError(f"recipe '{ref}' is neither a file nor a shipped recipe ({names}; see `sdkit recipes`)")


def copy_recipe(name: str, dest: Optional[Path] = None) -> Path:
    """Copy a shipped recipe to edit: to DEST (a file, or a folder to put NAME.yaml in), default ./NAME.yaml."""
    src = shipped_path(name)
    if src is None:
        raise UserError(f"no shipped recipe '{name}' (see `sdkit recipes`)")
    dest = Path(dest) if dest is not None else Path(f"{src.stem}.yaml")
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise UserError(f"'{dest}' exists already; pass another PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def table() -> str:
    """One line per shipped recipe: name, family, method, GPU memory target, what it is."""
    rows = [(r.name, r.family, r.method, r.gpu, r.summary) for r in shipped_recipes()]
    widths = [max(len(row[i]) for row in rows + [("name", "family", "method", "gpu", "")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("name", "family", "method", "gpu"), widths)) + "  about"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(lines)
