"""Shipped recipes: `sdkit recipes`, `sdkit recipes cp`, `sdkit train NAME`, and (slow) a built
wheel installed into a fresh venv outside the checkout that has them and runs the quickstart."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import yaml

from sdkit.recipe import Recipe
from sdkit.shipped import shipped_recipes

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sdkit(*args, cwd, env=ENV, exe=(sys.executable, "-m", "sdkit")):
    return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_every_shipped_recipe_loads_and_says_what_it_targets():
    recipes = shipped_recipes()
    assert {r.name for r in recipes} >= {"sd15-lora", "sdxl-lora", "sd3-lora", "tiny-sd-lora", "quickstart"}
    for r in recipes:
        Recipe.model_validate(yaml.safe_load(r.path.read_text()))  # the schema (its folders come later)
        assert r.family in {"sd", "sdxl", "sd3"}, r.name  # listed without loading a model
        assert r.gpu != "-" and r.summary, r.name


def test_recipes_lists_copies_and_trains_by_name(tmp_path):
    listing = sdkit("recipes", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("sdxl-lora "))
    assert row.split()[1:4] == ["sdxl", "lora", "24"]
    copied = sdkit("recipes", "cp", "sd15-lora", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "sd15-lora.yaml").is_file()
    again = sdkit("recipes", "cp", "sd15-lora", cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr
    (tmp_path / "mine").mkdir()
    assert sdkit("recipes", "cp", "sdxl-lora", "mine", cwd=tmp_path).returncode == 0
    assert (tmp_path / "mine" / "sdxl-lora.yaml").read_text() == (ROOT / "recipes" / "sdxl-lora.yaml").read_text()
    dry = sdkit("train", "sdxl-lora", "data.buckets=false", "--dry-run", cwd=tmp_path)  # buckets read the data
    assert dry.returncode == 0 and "family: sdxl" in dry.stdout, dry.stderr
    missing = sdkit("train", "no-such-recipe", "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and "sdkit recipes" in missing.stderr


@pytest.mark.slow
def test_wheel_installs_outside_the_checkout_with_its_recipes(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("sdkit_recipes-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # torch and the rest come from this interpreter's site-packages (a path line, not a site
    # dir: its .pth files, such as an editable sdkit, are not run), so nothing is downloaded.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    work = tmp_path / "empty"
    work.mkdir()
    exe = (str(venv / "bin" / "sdkit"),)
    where = subprocess.run([py, "-c", "import sdkit; print(sdkit.__file__)"], capture_output=True, text=True, env=env, cwd=work)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    listing = sdkit("recipes", cwd=work, env=env, exe=exe)
    assert listing.returncode == 0 and "tiny-sd-lora" in listing.stdout, listing.stderr
    for args in (["tiny", "runs/tiny/sd"], ["tiny", "runs/tiny/images", "--family", "images"]):
        assert sdkit(*args, cwd=work, env=env, exe=exe).returncode == 0
    dry = sdkit("train", "tiny-sd-lora", "--dry-run", cwd=work, env=env, exe=exe)
    assert dry.returncode == 0 and "effective batch" in dry.stdout, dry.stderr[-2000:]
    found = subprocess.run([py, "-c", "from sdkit.quickstart.run import recipe_path, digit_prompts_path as d; "
                                      "print(recipe_path(), d())"], capture_output=True, text=True, env=env, cwd=work)
    assert found.stdout.count(str(venv)) == 2, found.stdout + found.stderr  # the quickstart's recipe comes with the wheel
    quick = sdkit("quickstart", "--steps", "5", "--vae-steps", "2", "--images-per-digit", "1", cwd=work, env=env, exe=exe)
    assert quick.returncode == 0, quick.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "quickstart.json").is_file()
