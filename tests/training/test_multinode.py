"""Two accelerate "machines" of one CPU process each on 127.0.0.1, each started by
`sdkit train --accelerate-config`: the run trains, survives a SIGKILL of both machines and a
restart of both with the weights of an uninterrupted run, and refuses an output_dir that the
machines do not share."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import free_port, write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
RESULT = "pytorch_lora_weights.safetensors"


def node_configs(tmp_path: Path) -> list[Path]:
    port = free_port()
    paths = []
    for rank in (0, 1):
        path = tmp_path / f"node{rank}.yaml"
        path.write_text(f"distributed_type: MULTI_GPU\nuse_cpu: true\nnum_machines: 2\nnum_processes: 2\n"
                        f"machine_rank: {rank}\nmain_process_ip: 127.0.0.1\nmain_process_port: {port}\n"
                        "mixed_precision: 'no'\ndynamo_config: {}\n")
        paths.append(path)
    return paths


def start_nodes(tmp_path, recipe, overrides=((), ())):
    """Both machines' `sdkit train`, each in its own process group (accelerate starts children)."""
    return [subprocess.Popen([sys.executable, "-m", "sdkit", "train", str(recipe), *extra, "--accelerate-config", str(cfg)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for cfg, extra in zip(node_configs(tmp_path), overrides)]


def kill_tree(pid: int) -> None:
    """SIGKILL a whole machine: sdkit, accelerate's launcher and its rank, which torchrun starts
    in a session of its own (so killing the process group would miss it)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


def finish(nodes, timeout=600) -> list[tuple[int, str]]:
    out = []
    for node in nodes:
        try:
            _, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(node.pid)
            _, err = node.communicate()
        out.append((node.returncode, err))
    return out


def kill_after_checkpoint(nodes, run_dir: Path, timeout=600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(n.poll() is None for n in nodes):
        if any((d / "sdkit_state.json").is_file() for d in (run_dir / "checkpoints").glob("checkpoint-*")):
            break
        time.sleep(0.05)
    for node in nodes:
        kill_tree(node.pid)
    results = finish(nodes)
    assert all(code == -signal.SIGKILL for code, _ in results), results[0][1][-2000:] + results[1][1][-2000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("multinode") / "images", n=8, size=32)


@pytest.mark.slow
def test_two_machines_train_resume_after_sigkill_of_both(tiny_sd, data, tmp_path):
    train = {"max_steps": 8, "checkpoint_every": 4, "batch_size": 2, "gradient_accumulation": 2, "resume": "auto"}
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = write_recipe(tmp_path, tiny_sd, data, straight_dir, train=train)
    dry = subprocess.run([sys.executable, "-m", "sdkit", "train", str(straight), "--dry-run",
                          "--accelerate-config", str(node_configs(tmp_path)[1])], env=ENV, capture_output=True, text=True)
    assert "effective batch 8 (2 x 2 accumulation x 2 processes)" in dry.stdout, dry.stderr
    assert "on 2 machines x 1 process" in dry.stdout

    for code, err in finish(start_nodes(tmp_path, straight)):
        assert code == 0, err[-3000:]
    killed = write_recipe(tmp_path, tiny_sd, data, killed_dir, train=train)
    kill_after_checkpoint(start_nodes(tmp_path, killed), killed_dir)
    assert not (killed_dir / RESULT).exists()
    checkpoint = sorted((killed_dir / "checkpoints").glob("checkpoint-*"))[-1]
    assert {p.name for p in checkpoint.glob("sdkit_rng_*")} == {"sdkit_rng_0.safetensors", "sdkit_rng_1.safetensors"}
    for code, err in finish(start_nodes(tmp_path, killed)):
        assert code == 0, err[-3000:]
        assert "resumed from" in err or code == 0

    a, b = load_file(straight_dir / RESULT), load_file(killed_dir / RESULT)
    assert a.keys() == b.keys() and a
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-6, f"resumed two-machine run differs from the uninterrupted one by {diff}"


@pytest.mark.slow
def test_machines_that_do_not_share_output_dir_stop_with_one_line(tiny_sd, data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_sd, data, tmp_path / "run", train={"max_steps": 2, "batch_size": 2})
    # Each machine gets its own output_dir: what rank 0 writes, rank 1 cannot see.
    nodes = start_nodes(tmp_path, recipe, overrides=([f"output_dir={tmp_path / 'a'}"], [f"output_dir={tmp_path / 'b'}"]))
    results = finish(nodes)
    assert all(code != 0 for code, _ in results)
    assert any("needs output_dir on a file system all of them share" in err for _, err in results), results[1][1][-2000:]
