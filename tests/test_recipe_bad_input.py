"""Hostile or careless recipes and overrides: one line, exit 2, naming where, never a traceback,
never megabytes echoed back."""

from __future__ import annotations

import time

import pytest

from helpers import one_error, run_sdkit

MINIMAL = "model: {pretrained: a/b}\ndata: {dataset: c/d}\noutput_dir: runs/x\n"


ALIAS_BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(MINIMAL + ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 520
    started = time.perf_counter()
    line = one_error(run_sdkit("train", recipe, "--dry-run"))
    assert time.perf_counter() - started < 60
    assert line == f"error: {recipe}: line 5 is not valid YAML (YAML aliases (*a) are not allowed in a recipe; write the value out)"


@pytest.mark.parametrize("where", ["file", "override"])
def test_nesting_5000_levels_is_one_line(tmp_path, where):
    recipe = tmp_path / "deep.yaml"
    deep = "[" * 5000 + "]" * 5000
    if where == "file":
        recipe.write_text(MINIMAL + f"model_extra: {deep}\n")
        assert one_error(run_sdkit("train", recipe, "--dry-run")).startswith(f"error: {recipe}: nested more than")
    else:
        recipe.write_text(MINIMAL)
        line = one_error(run_sdkit("train", recipe, f"train.max_steps={deep}", "--dry-run"))
        assert line.startswith("error: command line: override 'train.max_steps': nested more than")
        line = one_error(run_sdkit("train", recipe, ".".join(["a"] * 5000) + "=5", "--dry-run"))
        assert line.startswith("error: command line: override 'a.a.a") and "levels deep" in line


@pytest.mark.parametrize("override", [".=5", "train..max_steps=5"])
def test_empty_key_parts_are_blamed_on_the_command_line(tmp_path, override):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL)
    line = one_error(run_sdkit("train", recipe, override, "--dry-run"))
    assert line.startswith(f"error: command line: override '{override}'") and "not a dotted key" in line


def test_unknown_section_from_an_override_is_blamed_on_the_command_line(tmp_path):
    from sdkit.errors import UserError
    from sdkit.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL)
    with pytest.raises(UserError, match=r"^command line: unknown key 'trian'"):
        load_recipe(recipe, ["trian.max_steps=5"])


def test_huge_values_are_cut_in_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL + f"train: {{max_steps: '{'9' * 100_000}x'}}\n{'k' * 100_000}: 1\n")
    result = run_sdkit("train", recipe, "--dry-run")
    assert result.returncode == 2 and len(result.stderr) < 2000, result.stderr[:3000]
    assert all(line.startswith("error: ") for line in result.stderr.strip().splitlines())
