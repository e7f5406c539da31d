"""`sdkit ui` in a real browser: Debian's chromium driven by Playwright (no browser download).

One server (`sdkit ui --model TINY_SD --model TINY_SDXL --run RUN`) for the module; the images the
page serves must be the pixels `sdkit generate` makes with the same settings. Screenshots of each
tab land in the test's tmp folder.
"""

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, train_recipe, write_recipe

pytest.importorskip("gradio", reason="the ui extra is not installed (pip install -e .[ui])")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system chromium (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle"
SETTINGS = dict(steps=2, guidance=5.0, seed=3)
LOOPBACK = ("http://127.0.0.1", "data:", "blob:")


@pytest.fixture(scope="module")
def run_dir(tiny_sd, tmp_path_factory):
    """A short LoRA training with TensorBoard logs, validation samples at steps 1, 2 and 3 and
    checkpoints at steps 1 and 2."""
    from sdkit.quickstart import tiny

    root = tmp_path_factory.mktemp("ui_run")
    images = tiny.make_image_folder(root / "images", n=4, size=32, captions="metadata")
    recipe = write_recipe(root, tiny_sd, images, root / "runs" / "lora",
                          train={"max_steps": 3, "batch_size": 2, "checkpoint_every": 1},
                          logging={"tensorboard": True, "every": 1},
                          validation={"prompts": ["a red square", "a blue circle"], "every": 1, "steps": 2})
    train_recipe(recipe)
    return root / "runs" / "lora"


@pytest.fixture(scope="module")
def server(tiny_sd, tiny_sdxl, run_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui_server")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "SDKIT_CACHE": str(tmp / "cache")}  # where the checkpoints' models are built
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdkit", "ui", "--model", str(tiny_sd), "--model", str(tiny_sdxl),
         "--run", str(run_dir), "--host", "127.0.0.1", "--port", str(port), "--out", str(tmp / "out"),
         "--max-loaded", "8"],  # the two models and the run's columns stay loaded between clicks
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sdkit ui did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(server):
    """A headless chromium page on the server; any request off the loopback is refused and recorded."""
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.outside = []

        def only_loopback(route):
            if route.request.url.startswith(LOOPBACK):
                return route.continue_()
            tab.outside.append(route.request.url)
            return route.abort()

        tab.route("**/*", only_loopback)
        tab.goto(server)
        yield tab
        browser.close()


def fill_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def generate(page) -> str:
    """Click Generate; the status line once the run ended (done / error / stopped)."""
    page.locator("#status").evaluate("el => el.dataset.before = el.innerText")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => { const el = document.querySelector('#status');"
        " return /^(done|error|stopped)/.test(el.innerText.trim()) && el.innerText !== el.dataset.before; }",
        timeout=240_000,
    )
    return page.locator("#status").inner_text().strip()


def served_png(page, i: int) -> Image.Image:
    srcs = [img.get_attribute("src") for img in page.locator(f"#gallery-{i} img").all()]
    assert len(srcs) == 1, srcs
    with urllib.request.urlopen(srcs[0], timeout=10) as answer:
        return Image.open(io.BytesIO(answer.read()))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_tab_equals_sdkit_generate(page, tiny_sd, tiny_sdxl, tmp_path):
    from sdkit.inference.generate import generate_command

    page.locator("#prompt textarea").fill(PROMPT)
    fill_number(page, "seed", SETTINGS["seed"])
    fill_number(page, "steps", SETTINGS["steps"])
    fill_number(page, "guidance", SETTINGS["guidance"])
    assert generate(page).startswith("done"), page.locator("#status").inner_text()
    page.screenshot(path=str(tmp_path / "generate-tab.png"), full_page=True)
    for i, model in enumerate((tiny_sd, tiny_sdxl)):
        served = served_png(page, i)
        expected = generate_command(prompts=[PROMPT], model=str(model), out=tmp_path / f"cli-{i}", **SETTINGS)[0]
        assert np.array_equal(pixels(served), pixels(Image.open(expected))), f"column {i} differs from sdkit generate"
        # the download is sdkit's PNG: the settings ride in its text chunks
        assert served.text["prompt"] == PROMPT and served.text["seed"] == "3" and served.text["steps"] == "2"
        assert served.text["model"] == str(model)
        line = page.locator(f"#command-{i} textarea").input_value()
        assert line.startswith(f"sdkit generate '{PROMPT}' --model {model} --seed 3 --steps 2 --guidance 5")
    assert page.outside == []  # nothing fetched from the internet


def test_bad_width_shows_generates_message_then_next_run_works(page, tiny_sd, tmp_path):
    cli = subprocess.run([sys.executable, "-m", "sdkit", "generate", PROMPT, "--model", str(tiny_sd), "--width", "30"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert cli.returncode == 2
    message = cli.stderr.strip().splitlines()[-1]
    assert message.startswith("error: --width")
    page.locator("#prompt textarea").fill(PROMPT)
    fill_number(page, "width", 30)
    assert generate(page) == message
    fill_number(page, "width", 0)
    fill_number(page, "seed", 5)
    assert generate(page).startswith("done")
    assert served_png(page, 0).text["seed"] == "5" and served_png(page, 1).text["seed"] == "5"


def test_progress_bar_and_stop_button(page):
    """A long request (150 steps x 8 images x 2 models) shows the step progress and ends at Stop."""
    page.locator("#prompt textarea").fill(PROMPT)
    fill_number(page, "steps", 150)
    fill_number(page, "num-images", 8)
    page.locator("#generate").click()
    page.get_by_text("denoising").first.wait_for(timeout=120_000)  # Gradio's progress, fed by the step callback
    page.locator("#stop").click()
    page.wait_for_function("() => /^(done|error|stopped)/.test(document.querySelector('#status').innerText.trim())",
                           timeout=60_000)
    assert page.locator("#status").inner_text().startswith("stopped")
    assert page.locator("#note-0").inner_text().strip() == "stopped"
    fill_number(page, "steps", SETTINGS["steps"])
    fill_number(page, "num-images", 1)
    assert generate(page).startswith("done")  # the next request runs to the end


def test_runs_tab_shows_curves_and_sample_grid(page, run_dir, tmp_path):
    page.get_by_role("tab", name="Runs").click()
    page.locator("#run-status").get_by_text("3 steps logged").wait_for(timeout=60_000)
    # the loss curve is drawn (Vega renders into a canvas or svg), not printed
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=60_000)
    samples = page.locator("#samples img")
    samples.nth(5).wait_for(timeout=60_000)
    assert samples.count() == 6  # 3 validation steps x 2 prompts
    assert "a blue circle" in page.locator("#samples").inner_text()
    assert "rank: 4" in page.locator("#recipe").inner_text()
    page.screenshot(path=str(tmp_path / "runs-tab.png"), full_page=True)
    # while a run trains, new samples appear without a click (the tab refreshes every few seconds)
    shutil.copytree(run_dir / "samples" / "step-0000003", run_dir / "samples" / "step-0000004")
    samples.nth(7).wait_for(timeout=30_000)
    assert "step 4 · a red square" in page.locator("#samples").inner_text()
    assert page.outside == []


def test_compare_checkpoints_of_a_run(page, run_dir, tmp_path, monkeypatch):
    """Picking the run makes its checkpoints and final result the columns; each checkpoint's images
    are `sdkit generate --model RUN/checkpoints/checkpoint-N`'s (the result's column is the run's, as in
    the Generate test); a damaged one fails in its column."""
    from sdkit.inference.generate import generate_command

    monkeypatch.setenv("SDKIT_CACHE", str(tmp_path / "cache"))  # built again here, apart from the server's
    page.get_by_role("tab", name="Generate").click()
    page.locator("#compare input").click()
    page.get_by_role("option", name=str(run_dir)).click()
    page.locator("#label-2").get_by_text("final result").wait_for(timeout=30_000)
    assert [page.locator(f"#label-{i}").inner_text().strip() for i in range(3)] == ["step 1", "step 2", "final result"]
    assert not page.locator("#label-3").is_visible()  # one column per checkpoint, plus the result
    page.locator("#prompt textarea").fill(PROMPT)
    for name, value in (("seed", SETTINGS["seed"]), ("steps", SETTINGS["steps"]), ("guidance", SETTINGS["guidance"]),
                        ("width", 0), ("num-images", 1)):
        fill_number(page, name, value)
    assert generate(page).startswith("done"), page.locator("#status").inner_text()
    page.screenshot(path=str(tmp_path / "compare-checkpoints.png"), full_page=True)
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    for i, model in enumerate(checkpoints):
        served = served_png(page, i)
        expected = generate_command(prompts=[PROMPT], model=str(model), out=tmp_path / f"cli-{i}", **SETTINGS)[0]
        assert np.array_equal(pixels(served), pixels(Image.open(expected))), f"column {i} differs from sdkit generate"
        assert served.text["model"] == str(model)
        assert f"--model {model} " in page.locator(f"#command-{i} textarea").input_value()
    # a checkpoint written while the page is open joins at the next click; a damaged one says why in its column
    damaged = run_dir / "checkpoints" / "checkpoint-0000003"
    shutil.copytree(checkpoints[-1], damaged)
    try:
        (damaged / "trainable_0.safetensors").write_bytes(b"not the recorded bytes")
        assert generate(page).startswith("done")
        assert page.locator("#label-2").inner_text().strip() == "step 3"
        note = page.locator("#note-2").inner_text().strip()
        assert note.startswith(f"error: --model: checkpoint {damaged} is damaged: trainable_0") and "\n" not in note
        assert page.locator("#gallery-3 img").count() == 1  # the final result still generated
    finally:
        shutil.rmtree(damaged)
    assert page.outside == []
