"""The run folder: never the data, the model or a folder of the user's; one run at a time."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys

import yaml

from helpers import one_error, run_sdkit, write_recipe

LOCKER = """
import sys, time
from sdkit.training.run_folder import acquire_run_lock, mark_run_folder
mark_run_folder(sys.argv[1])
acquire_run_lock(sys.argv[1], print)
print("locked", flush=True)
time.sleep(120)
"""


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_dir_on_the_data_the_model_or_your_files_is_refused(tiny_sd, image_folder, tmp_path):
    recipe = write_recipe(tmp_path, tiny_sd, image_folder, tmp_path / "run")
    data_before, model_before = _snapshot(image_folder), _snapshot(tiny_sd)
    assert "is the data.dataset folder" in one_error(run_sdkit("train", recipe, f"output_dir={image_folder}"))
    assert "is inside the data.dataset folder" in one_error(run_sdkit("train", recipe, f"output_dir={image_folder}/run"))
    assert "is the model.pretrained folder" in one_error(
        run_sdkit("train", recipe, f"output_dir={tiny_sd}", "method.type=full"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "recipe.yaml").write_text("my recipe")
    assert "is not an sdkit run folder" in one_error(run_sdkit("train", recipe, f"output_dir={mine}"))
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in one_error(run_sdkit("train", recipe, f"output_dir={tmp_path / 'a-file'}"))
    assert _snapshot(image_folder) == data_before and _snapshot(tiny_sd) == model_before
    assert (mine / "README.md").read_text() == "my notes" and (mine / "recipe.yaml").read_text() == "my recipe"


def test_a_second_run_into_a_locked_folder_exits_2_and_a_dead_holder_is_taken_over(tiny_sd, image_folder, tmp_path):
    from rich.console import Console

    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, image_folder, out, train={"max_steps": 2})
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_error(run_sdkit("train", recipe))
        assert f"in use by another sdkit train (pid {holder.pid} on host {socket.gethostname()}" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock file still names it
        holder.wait()
        holder.stdout.close()
    log = io.StringIO()
    trainer = Trainer(load_recipe(recipe), console=Console(file=log, width=400))
    trainer.fit()
    assert trainer.state.step == 2 and (out / "pytorch_lora_weights.safetensors").is_file()
    assert f"took over the lock of {out} left by a run that is gone (pid {holder.pid}" in log.getvalue()
    assert (out / ".sdkit-lock").read_text() == ""  # released at the end
    assert yaml.safe_load((out / "recipe.yaml").read_text())["output_dir"] == str(out)
