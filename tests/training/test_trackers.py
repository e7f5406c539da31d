"""TensorBoard and wandb (offline) get the scalars and the validation images, captioned with their
prompt; both are read back from the files the trackers wrote."""

from __future__ import annotations

import io
import json
import struct
import sys

import pytest
from PIL import Image

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError

PROMPTS = ["a red square", "a blue circle"]
SCALARS = {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_s"}


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e .[wandb])")
    from sdkit.quickstart import tiny

    tmp = tmp_path_factory.mktemp("trackers")
    images = tiny.make_image_folder(tmp / "images", n=4, size=32, captions="metadata")
    recipe = write_recipe(tmp, tiny_sd, images, tmp / "run", train={"max_steps": 2, "batch_size": 2},
                          logging={"tensorboard": True, "every": 1, "wandb": True, "wandb_run_name": "tiny-run"},
                          validation={"prompts": PROMPTS, "steps": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        train_recipe(recipe)
    return tmp / "run"


def test_tensorboard_holds_scalars_and_captioned_images(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = (run / "logs" / "sdkit").glob("events.out.tfevents*")  # (hparams have a folder of their own)
    reader = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    assert SCALARS <= set(reader.Tags()["scalars"])
    assert [e.step for e in reader.Scalars("train/loss")] == [1, 2]
    tags = sorted(reader.Tags()["images"])
    assert tags == [f"validation/{i:02d} {p}" for i, p in enumerate(PROMPTS)]
    image = Image.open(io.BytesIO(reader.Images(tags[0])[-1].encoded_image_string))
    assert image.size == (32, 32) and reader.Images(tags[0])[-1].step == 2


def test_wandb_offline_run_holds_scalars_and_captioned_images(run):
    [wandb_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = [r.history for r in _wandb_records(wandb_file) if r.HasField("history")]
    rows = {h.step.num: _history_row(h) for h in history}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert SCALARS <= set(row) and all(isinstance(row[key], float) for key in SCALARS)
    rows = list(rows.values())
    [images] = [row["validation"] for row in rows if "validation" in row]
    assert images["_type"] == "images/separated" and images["captions"] == PROMPTS
    media = sorted((wandb_file.parent / "files").rglob("validation_*.png"))
    assert len(media) == len(PROMPTS) and Image.open(media[0]).size == (32, 32)
    run_record = next(r.run for r in _wandb_records(wandb_file) if r.HasField("run"))
    assert run_record.display_name == "tiny-run" and run_record.project == "sdkit"


def test_wandb_absent_is_one_line_naming_the_extra(tiny_sd, image_folder, tmp_path, monkeypatch):
    from sdkit.recipe import load_recipe
    from sdkit.training.trackers import tracker_names

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as on an install without it
    recipe = load_recipe(write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "run", logging={"wandb": True}))
    with pytest.raises(UserError, match=r"^logging\.wandb: needs the wandb package: pip install 'sdkit-recipes\[wandb\]'"):
        tracker_names(recipe.logging)


def _history_row(history) -> dict:
    """One history record as the dict that was logged (images come flattened into nested keys)."""
    row: dict = {}
    for item in history.item:
        path = [item.key] if item.key else list(item.nested_key)
        target = row
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return row


def _wandb_records(path):
    """The protobuf records of a .wandb file. Its framing is LevelDB's log format (32 KiB blocks of
    chunks with a 7-byte header: crc, length, type) after a 7-byte file header; wandb ships no
    Python reader for it any more, so this test reads it itself."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in this block for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill at the end of a block
            pos += block - pos % block
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""
