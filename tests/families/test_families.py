"""Families own every family fact: nothing else compares family names, recipes are checked by
the family, and a family's description needs no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdkit.errors import UserError
from sdkit.families import family_class, family_names
from sdkit.recipe import recipe_from_dict

PACKAGE = Path(__file__).resolve().parents[2] / "sdkit"
FAMILY_NAMES = ("sd", "sd2", "sdxl", "sd3", "flux")
# `family == "sd3"`, `x != 'sdxl'`, `name in ("sd", ...)`, `in {"sd3"}`: a family decided outside families/.
NAME_COMPARISON = re.compile(r"""(==|!=|\bin)\s*[\(\[\{]?\s*["'](%s)["']""" % "|".join(FAMILY_NAMES))
# A family told by its pipeline class name (`"XL" in index["_class_name"]`, `type(pipe).__name__ == ...`):
# only families/ maps class names to families. Reading a class name to show it is fine.
CLASS_NAME = re.compile(r"""_class_name|(type\([^)]*\)|__class__)\.__name__""")
COMPARISON = re.compile(r"""==|!=|\bin\b|\.(startswith|endswith)\(""")
NAME_SETS = re.compile(r"\bFLOW_FAMILIES\b")


def family_fact_violations(source: str) -> list[str]:
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("#", 1)[0]
        sniffing = CLASS_NAME.search(code) and COMPARISON.search(code)
        if NAME_COMPARISON.search(code) or NAME_SETS.search(code) or sniffing:
            found.append(f"{number}: {line.strip()}")
    return found


def test_the_scan_catches_what_it_is_for():
    old_code = [
        'FLOW_FAMILIES = {"sd3"}',
        "valid = FLOW_SCHEDULERS if family in FLOW_FAMILIES else DDPM_SCHEDULERS",
        'if "XL" not in str(index.get("_class_name", "")):',
        'if model.family != "sd3":',
        'return bool(config) and model.family == "sdxl"',
        "if family in ('sd', 'sd2'):",
        'if module.component == "unet" and layout == "sdxl":',
        '"ss_v2": str(layout == "sd2"),',
        'if type(pipe).__name__.startswith("StableDiffusionXL"):',
    ]
    for line in old_code:
        assert family_fact_violations(line), line
    for line in ['FAMILIES = {"sd": ("sdkit.families.sd", "StableDiffusion")}', 'family_class("sd3")',
                 'if objective == "flow":', "name = 'sdxl'  # == 'sd3' in a comment",
                 'pipeline_class=index.get("_class_name", "?"),', 'if __name__ == "__main__":']:
        assert not family_fact_violations(line), line


def test_no_family_name_is_compared_outside_families():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "families" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 20
    bad = []
    for path in files:
        bad += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in family_fact_violations(path.read_text())]
    assert not bad, "family facts outside sdkit/families/ (ask the family class instead):\n" + "\n".join(bad)


# ---------------------------------------------------------------- Family.check_recipe


def recipe_dict(family: str, **sections) -> dict:
    data = {
        "model": {"pretrained": "someone/some-model", "family": family},
        "data": {"dataset": "someone/some-data"},
        "train": {"max_steps": 10},
        "output_dir": "runs/x",
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def rejected(data: dict) -> list[str]:
    with pytest.raises(UserError) as caught:
        recipe_from_dict(data)
    return str(caught.value).splitlines()


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_defaults_pass(family):
    recipe = recipe_from_dict(recipe_dict(family, data={"resolution": 1024}))
    assert family_class(family).check_recipe(recipe) == []


def test_sd3_size_must_be_a_multiple_of_16():
    [line] = rejected(recipe_dict("sd3", data={"resolution": 520}))
    assert "data.resolution" in line and "16" in line and "520" in line
    recipe_from_dict(recipe_dict("sd", data={"resolution": 520}))  # SD's multiple is 8


def test_flow_keys_are_rejected_on_a_ddpm_family():
    [line] = rejected(recipe_dict("sd", train={"timestep_sampling": "uniform"}))
    assert "train.timestep_sampling" in line and "uniform" in line


def test_ddpm_keys_are_rejected_on_a_flow_family():
    [line] = rejected(recipe_dict("sd3", train={"snr_gamma": 5}))
    assert "train.snr_gamma" in line and "5" in line


def test_a_family_key_is_rejected_on_another_family():
    [line] = rejected(recipe_dict("sd", model={"load_t5": False}))
    assert "model.load_t5" in line
    recipe_from_dict(recipe_dict("sd3", model={"load_t5": False}))


def test_every_problem_is_listed_one_line_each():
    lines = rejected(recipe_dict("sd3", data={"resolution": 520}, train={"snr_gamma": 5, "noise_offset": 0.1}))
    assert len(lines) == 3
    assert [key for key in ("data.resolution", "train.snr_gamma", "train.noise_offset") if any(key in l for l in lines)]\
        == ["data.resolution", "train.snr_gamma", "train.noise_offset"]


def test_check_recipe_on_a_recipe_whose_family_was_not_known():
    # family auto with a hub id: recipe_from_dict cannot ask the family; the trainer asks later.
    recipe = recipe_from_dict(recipe_dict("auto", data={"resolution": 520}, train={"snr_gamma": 5}))
    problems = family_class("sd3").check_recipe(recipe)
    assert [p.split(":")[0] for p in problems] == ["data.resolution", "train.snr_gamma"]
    assert family_class("sd").check_recipe(recipe) == []


def test_refiner_only_on_a_refiner_capable_family():
    for name in family_names():
        cls = family_class(name)
        data = recipe_dict(name, model={"refiner": "someone/refiner"}, data={"resolution": 1024})
        if cls.refiner_capable:
            recipe_from_dict(data)
        else:
            assert any(line.startswith("<recipe>: model.refiner") for line in rejected(data)), name


# ---------------------------------------------------------------- torch-free descriptions


@pytest.mark.parametrize("module", ["sdkit.families", "sdkit.families.sd", "sdkit.families.sdxl",
                                    "sdkit.families.sd3", "sdkit.units"])
def test_family_modules_import_no_torch(module):
    code = (
        f"import sys, {module}\n"
        "from sdkit.families import family_class, family_names\n"
        "facts = [(c.objective, c.denoiser_attr, c.size_multiple, c.refiner_capable)\n"
        "         for c in map(family_class, family_names())]\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print(facts)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
