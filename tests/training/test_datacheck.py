"""`sdkit data check` and the bucket table of `sdkit train --dry-run`, run as a user runs them."""

import os
import subprocess
import sys

from PIL import Image

from helpers import write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sdkit(*args):
    return subprocess.run([sys.executable, "-m", "sdkit", *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_data_check_reports_each_dataset_and_dry_run_prints_buckets(tiny_sd, tmp_path):
    from sdkit.quickstart.tiny import make_image_folder

    make_image_folder(tmp_path / "data" / "3_sks dog", n=3, sizes=[(48, 32), (32, 48), (16, 16)], captions="none")
    make_image_folder(tmp_path / "data" / "1_cat", n=2, size=32, captions="txt")
    (tmp_path / "data" / "1_cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data" / "1_cat" / "broken.txt").write_text("x")
    recipe = write_recipe(tmp_path, tiny_sd, {"dataset": str(tmp_path / "data"), "kohya_folder_names": True,
                                              "buckets": True, "bucket_step": 8}, tmp_path / "run")
    result = sdkit("data", "check", str(recipe))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3_sks dog: 3 images, captions 3 found / 0 missing, repeats 3 -> 9 samples per epoch" in out
    assert "1_cat: 2 images" in out and "broken.png" in out  # the unreadable file, named
    assert "smaller than their bucket (upscaled): 1" in out  # the 16x16 image
    assert "samples per epoch: 11" in out
    assert "40x24" in out and "24x40" in out and "32x32" in out
    dry = sdkit("train", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "bucket  images  batches" in dry.stdout and "40x24" in dry.stdout


def test_data_check_stops_on_an_empty_dataset(tiny_sd, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"broken")
    recipe = write_recipe(tmp_path, tiny_sd, {"dataset": str(folder), "instance_prompt": "x"}, tmp_path / "run")
    result = sdkit("data", "check", str(recipe))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data.dataset: no usable images in") and "Traceback" not in result.stderr
