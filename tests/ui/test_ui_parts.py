"""The page's parts without a browser: Stop ends the denoising loop, the model cache's LRU, a
broken model fails in its own column, the CLI's checks."""

import shutil
import threading
from pathlib import Path

import pytest

from sdkit.errors import UserError
from sdkit.ui.generation import Settings, Stopped, generate_column
from sdkit.ui.models import ModelCache

SETTINGS = Settings(prompt="a red circle", steps=6, guidance=5.0, seed=3)


def test_stop_ends_the_denoising_loop_at_the_next_step(tiny_sd, tmp_path):
    cache, stop, steps = ModelCache(max_loaded=1), threading.Event(), []

    def on_step():
        steps.append(1)
        if len(steps) == 2:
            stop.set()  # what the Stop button does, from another thread

    with pytest.raises(Stopped):
        generate_column(cache, str(tiny_sd), SETTINGS, tmp_path / "out", on_step=on_step, stop=stop)
    assert len(steps) == 2  # 6 steps asked, the loop ended after the second
    assert not (tmp_path / "out").exists()  # no image was written
    # the same (kept) pipeline generates again afterwards
    files, info = generate_column(cache, str(tiny_sd), SETTINGS, tmp_path / "out", on_step=lambda: None,
                                  stop=threading.Event())
    assert len(files) == 1 and info.family == "sd"


def test_cache_keeps_the_most_recently_used_models(tiny_sd, tiny_sdxl):
    cache = ModelCache(max_loaded=2)
    first = cache.get(str(tiny_sd))
    cache.get(str(tiny_sdxl))
    assert cache.get(str(tiny_sd)) is first  # kept, not loaded again
    cache.max_loaded = 1
    cache.get(str(tiny_sdxl))  # the next use evicts the least recently used (tiny_sd)
    assert cache.loaded() == [(str(tiny_sdxl), None)]
    nbytes = cache.get(str(tiny_sdxl)).nbytes
    by_memory = ModelCache(max_loaded=5, max_bytes=nbytes)  # room for one of them
    by_memory.get(str(tiny_sd))
    by_memory.get(str(tiny_sdxl))
    assert by_memory.loaded() == [(str(tiny_sdxl), None)]


def test_a_model_that_fails_to_load_fails_in_its_column_only(tiny_sd, tmp_path):
    from sdkit.ui.generate_tab import GenerateContext, generate_all
    from sdkit.ui.generation import StopFlags

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    ctx = GenerateContext(models=[str(broken), str(tiny_sd)], labels=["broken", "ok"], cache=ModelCache(max_loaded=2),
                          out=tmp_path / "out", stops=StopFlags())
    updates = list(generate_all(ctx, "a red circle", "", 2, 5.0, 3, True, 0, 0, 1, "the model's own", 1.0, False,
                                session="s", progress=lambda *a, **k: None))
    status, broken_items, broken_note, _, ok_items, ok_note, ok_command = updates[-1]
    assert status.startswith("done")
    assert broken_items == [] and broken_note.startswith("error: ") and "\n" not in broken_note
    assert len(ok_items) == 1 and Path(ok_items[0][0]).is_file() and ok_note.startswith("sd, ")
    assert ok_command.startswith("sdkit generate 'a red circle' --model")


def test_ui_command_checks_before_serving(tiny_sd, tmp_path):
    from sdkit.ui.app import ui_command

    with pytest.raises(UserError, match="--share must be one of no, yes"):
        ui_command(models=[str(tiny_sd)], runs=[], share="maybe")
    with pytest.raises(UserError, match="--model: '.*missing' does not exist|--model"):
        ui_command(models=[str(tmp_path / "missing")], runs=[])
    with pytest.raises(UserError, match="at least one model"):
        ui_command(models=[], runs=[])


def test_clip_score_under_each_image_is_sdkit_evals(tiny_sd, tiny_clip, tmp_path):
    from PIL import Image

    from sdkit.inference.evaluate import ClipScorer
    from sdkit.ui.generate_tab import GenerateContext, generate_all
    from sdkit.ui.generation import StopFlags

    ctx = GenerateContext(models=[str(tiny_sd)], labels=["sd"], cache=ModelCache(max_loaded=1), out=tmp_path / "out",
                          scorer_factory=lambda: ClipScorer(str(tiny_clip), "cpu"), stops=StopFlags())
    *_, last = generate_all(ctx, "a red circle", "", 2, 5.0, 3, True, 0, 0, 2, "the model's own", 1.0, False,
                            session="s", progress=lambda *a, **k: None)
    items = last[1]
    assert [caption.split(" · ")[0] for _, caption in items] == ["seed 3", "seed 4"]
    _, expected = ClipScorer(str(tiny_clip), "cpu").score([Image.open(path) for path, _ in items], "a red circle")
    assert [caption.split(" · CLIP ")[1] for _, caption in items] == [f"{score:.2f}" for score in expected]


def test_run_columns_spread_the_checkpoints_then_the_result(tmp_path):
    from sdkit.ui.runs import run_columns

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model: {pretrained: base}\n")
    for step in range(1, 11):
        (run / "checkpoints" / f"checkpoint-{step:07d}").mkdir()
        (run / "checkpoints" / f"checkpoint-{step:07d}" / "sdkit_state.json").write_text("{}")
    (run / "checkpoints" / "checkpoint-0000011").mkdir()  # being written: no state file yet
    columns, line = run_columns(str(run), max_columns=6)
    assert [label for _, label in columns] == ["step 1", "step 3", "step 5", "step 6", "step 8", "step 10"]
    assert columns[0][0] == str(run / "checkpoints" / "checkpoint-0000001")
    assert line.endswith("10 checkpoints (showing 6), no final result yet")
    (run / "model_index.json").write_text("{}")  # a full fine-tune's result
    columns, line = run_columns(str(run), max_columns=3)
    assert columns == [(str(run / "checkpoints" / "checkpoint-0000001"), "step 1"),
                       (str(run / "checkpoints" / "checkpoint-0000010"), "step 10"), (str(run), "final result")]
    assert line.endswith("+ the final result")
