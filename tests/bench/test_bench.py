"""`sdkit bench` on a tiny model: it runs the trainer's step, splits the time into phases
that add up, compares variants, and runs the plain diffusers loop beside it. No timing is
asserted: only that the numbers are there and make sense."""

import pytest
from typer.testing import CliRunner

from helpers import write_recipe
from sdkit.bench.baseline import PLAIN_LABEL
from sdkit.bench.run import run_bench
from sdkit.training.step import PHASES
from sdkit.errors import UserError


@pytest.fixture
def recipe(tiny_sd, image_folder, tmp_path):
    return write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "run", train={"batch_size": 2, "max_steps": 5})


def check_sane(v, samples_per_step):
    shares = v["shares"]
    assert set(shares) == {*PHASES, "other"}
    assert all(0.0 <= x <= 1.0 for x in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert sum(s for k, s in shares.items() if k != "other") > 0.8  # the phases cover the step
    assert v["steps_per_s"] > 0 and v["steps_per_s_wall"] > 0 and v["steps_per_s_cpu"] > 0
    assert v["samples_per_s"] == pytest.approx(v["steps_per_s"] * samples_per_step)
    assert v["shares"]["forward"] > 0 and v["shares"]["backward"] > 0 and v["shares"]["optimizer"] > 0
    assert v["peak_memory_bytes"] > 0
    assert v["last_loss"] == v["last_loss"] and v["last_loss"] > 0  # a number, not NaN


def test_bench_compares_cache_on_and_off_and_the_plain_loop(recipe, tmp_path):
    report = run_bench(str(recipe), [], steps=3, warmup=1, compare=["data.cache=false"], baseline=True)
    cached, uncached, plain = report["variants"]
    assert [v["label"] for v in report["variants"]] == ["recipe", "data.cache=false", PLAIN_LABEL]
    for v in report["variants"]:
        assert v["steps"] == 3
        check_sane(v, samples_per_step=2)
    # Cached steps never run an encoder; uncached ones and the plain loop do.
    assert cached["shares"]["encoders"] == 0.0 and cached["cache_build_s"] > 0
    assert uncached["shares"]["encoders"] > 0 and plain["shares"]["encoders"] > 0
    assert plain["plain_loop"] and not cached["plain_loop"]
    for label in ("data.cache=false", PLAIN_LABEL):
        ratio = report["ratios"][label]
        assert ratio["steps_per_s"] > 0
        assert ratio["steps_per_s"] == pytest.approx(cached["steps_per_s"] / report["variants"][
            [v["label"] for v in report["variants"]].index(label)]["steps_per_s"])
    # Bench leaves the recipe's run folder alone.
    assert not (tmp_path / "run").exists()


def test_bench_interleaved_rounds_with_accumulation_on_the_cpu_clock(recipe):
    report = run_bench(str(recipe), ["data.cache=false"], steps=4, warmup=1, rounds=2, clock="cpu",
                       compare=["train.gradient_accumulation=2"])
    assert report["rounds"] == 2 and report["clock"] == "cpu"
    plain_steps, accumulated = report["variants"]
    check_sane(plain_steps, samples_per_step=2)
    check_sane(accumulated, samples_per_step=4)  # two micro-batches per optimizer step
    assert plain_steps["steps"] == accumulated["steps"] == 4


def test_bench_command_prints_a_table(recipe):
    from sdkit.cli import app

    result = CliRunner().invoke(app, ["bench", str(recipe), "--steps", "2", "--warmup", "0",
                                      "--compare", "data.cache=false"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "steps/s" in out and "encoders" in out and "data.cache=false" in out
    assert "the steps/s of data.cache=false" in out


def test_bench_refuses_the_plain_loop_for_other_families_before_loading(recipe):
    with pytest.raises(UserError, match="SD 1.x/2.x"):
        run_bench(str(recipe), ["model.family=sdxl"], steps=1, warmup=0, baseline=True)


def test_bench_checks_its_arguments(recipe):
    with pytest.raises(UserError, match="--clock"):
        run_bench(str(recipe), [], steps=1, clock="gpu")
    with pytest.raises(UserError, match="unknown key"):
        run_bench(str(recipe), [], steps=1, compare=["data.cahce=false"])


@pytest.mark.slow
def test_bench_reports_compile_time_and_first_step_apart(recipe):
    report = run_bench(str(recipe), ["method.type=full", "train.batch_size=1"], steps=2, warmup=1,
                       compare=["train.compile=true"])
    eager, compiled = report["variants"]
    assert eager["compile_s"] == 0 and eager["first_step_s"] > 0
    # One warm-up step: the compile lies inside it (counted once, however deep torch's compile nests) and is
    # most of it.
    assert 0.5 * compiled["first_step_s"] < compiled["compile_s"] <= compiled["first_step_s"]
    assert compiled["first_step_s"] > 1.0 / compiled["steps_per_s"]  # steady steps exclude the compile
