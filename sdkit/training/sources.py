"""Several datasets in one run: which sources a data config names, and the caption rules that
apply to each (kohya folder names, caption prefix, tag shuffling). Torch- and PIL-free.

`data.datasets` lists sources whose unset keys come from `data` (`DataConfig.sources`). With
`data.kohya_folder_names`, a folder named like `10_sks dog` (the source itself, or each such
subfolder of it) is a source of its own with repeats 10 and, when its images have no caption
files, the instance prompt "sks dog" (kohya sd-scripts' DreamBooth layout).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def expand_sources(cfg) -> list:
    """Every single-dataset config the run reads, in order."""
    out = []
    for source in cfg.sources():
        out += _kohya_sources(source) if cfg.kohya_folder_names else [source]
    return out


def _kohya_sources(cfg) -> list:
    root = Path(os.path.expanduser(cfg.dataset))
    if not root.is_dir():
        return [cfg]
    if KOHYA_FOLDER.match(root.name):
        return [_kohya_source(cfg, root)]
    folders = sorted(d for d in root.iterdir() if d.is_dir() and KOHYA_FOLDER.match(d.name))
    return [_kohya_source(cfg, d) for d in folders] or [cfg]


def _kohya_source(cfg, folder: Path):
    match = KOHYA_FOLDER.match(folder.name)
    update = {"dataset": str(folder), "repeats": int(match[1])}
    has_captions = any(p.is_file() for p in folder.rglob(f"*{cfg.caption_extension}"))
    if cfg.instance_prompt is None and not has_captions:
        update["instance_prompt"] = match[2].strip()
    return cfg.model_copy(update=update)


def with_prefix(prefix, caption: str) -> str:
    """The caption with the prefix (a trigger word) as its first tag."""
    if not prefix:
        return caption
    return f"{prefix}, {caption}" if caption else prefix


def shuffle_tags(caption: str, keep: int, seed: int) -> str:
    """Comma-separated tags in a seeded order, the first `keep` in place (kohya's
    shuffle_caption / keep_tokens)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    random.Random(seed).shuffle(tail)
    return ", ".join(head + tail)
