"""The command line: instant help, one-line errors with exit code 2, dry runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SDKIT = [sys.executable, "-m", "sdkit"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    return subprocess.run([*SDKIT, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, sdkit.cli; print(any(m in sys.modules for m in ('torch', 'diffusers', 'peft')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip() == "False"
    for args in (["--help"], ["train", "--help"]):
        # CPU seconds of the child, not wall time: the test must not fail because the machine is busy
        # (it runs beside the other pytest worker); ~0.4 s on an idle 2-core machine.
        before = _children_cpu_seconds()
        result = run(*args)
        spent = _children_cpu_seconds() - before
        assert result.returncode == 0
        assert spent < 1.0, f"sdkit {' '.join(args)} took {spent:.2f} CPU seconds"


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_step=5", "did you mean 'train.max_steps'"),
        ("train.batch_size=lots", "train.batch_size"),
        ("data.dataset=./no/such/folder", "data.dataset"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(override, needle):
    result = run("train", str(ROOT / "recipes" / "sd15-lora.yaml"), override, "--dry-run")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [["--lora", "x"], ["--lora-scale", "0.5"], ["--embedding", "x"], ["--compile"]])
def test_generate_endpoint_refuses_in_process_flags_in_one_line(flags):
    # The served parts load the model as `sdkit serve` set it: a flag they would ignore is an error, not a no-op.
    result = run("generate", "a dog", "--endpoint", "http://127.0.0.1:9/v2/models/tiny", *flags)
    assert result.returncode == 2 and f"{flags[0]}: not with --endpoint" in result.stderr, result.stderr


def test_missing_recipe_file_exits_2():
    result = run("train", "nope.yaml")
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_dry_run_prints_resolved_recipe_and_plan(tmp_path):
    result = run("train", str(ROOT / "recipes" / "sd15-pokemon-full.yaml"), "train.max_steps=7", "--dry-run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout
    assert "family: sd" in result.stdout and "method: full" in result.stdout
    assert "effective batch 4" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_tiny_builds_model_and_family_is_detected(tmp_path):
    result = run("tiny", str(tmp_path / "sd"), "--family", "sd")
    assert result.returncode == 0, result.stderr
    from sdkit.families import detect_family

    assert detect_family(str(tmp_path / "sd")) == "sd"


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["generate"], ["export"]])
def test_help_shows_the_everyday_loop_first(command):
    """`sdkit --help` and the four commands' help: the four commands, in order, before any option."""
    from typer.testing import CliRunner

    from sdkit.cli import EVERYDAY, app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = result.output
    where = [text.find(line) for line in EVERYDAY.splitlines()]
    assert -1 not in where and where == sorted(where), text
    assert where[-1] < text.find("--help")
