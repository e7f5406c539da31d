"""Small helpers the training tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sdkit.recipe import load_recipe


def write_recipe(tmp_path: Path, model, data, out, **sections) -> Path:
    """A recipe file for a tiny run; sections are merged into the defaults below.
    data: the dataset folder, or a dict of data keys (with "dataset")."""
    recipe = {
        "model": {"pretrained": str(model)},
        "method": {"type": "lora", "rank": 4},
        "data": {"resolution": 32, **(data if isinstance(data, dict) else {"dataset": str(data)})},
        # compile off: train.compile=auto would not compile runs this short anyway, and a test
        # that compiles says so (tests/training/test_compile.py): compiling on a CPU takes tens of seconds.
        "train": {"batch_size": 4, "max_steps": 20, "checkpoint_every": 1000, "seed": 0, "compile": False},
        "optim": {"lr": 1e-3},
        "logging": {"tensorboard": False},
        "output_dir": str(out),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = Path(tmp_path) / f"recipe-{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_recipe(path: Path, overrides=()):
    """Train in this process; returns the Trainer (loss history, trainable state)."""
    from sdkit.training.trainer import Trainer

    trainer = Trainer(load_recipe(path, list(overrides)))
    trainer.fit()
    return trainer


def fit_with(trainer, before_loop):
    """Train `trainer` in this process, calling before_loop(trainer) once its parts are built
    (to wrap trainer.step.compute_loss, say); returns the trainer."""
    trainer.setup()
    try:
        before_loop(trainer)
        trainer.loop()
        trainer.finish()
    finally:
        trainer.close()
    return trainer


def loss_fell(history: list[float], window: int = 10, factor: float = 0.7) -> tuple[bool, float, float]:
    first = sum(history[:window]) / window
    last = sum(history[-window:]) / window
    return last < factor * first, first, last


def kill_after_checkpoint(recipe: Path, run_dir: Path, overrides=(), timeout: float = 300) -> int:
    """Start `sdkit train` in a subprocess, SIGKILL it once a checkpoint is complete."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdkit", "train", str(recipe), *overrides],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout
    ckpts = Path(run_dir) / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if any((d / "sdkit_state.json").is_file() for d in ckpts.glob("checkpoint-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert code == -signal.SIGKILL, f"training was not killed mid-run (exit {code}):\n{err[-2000:]}"
    return code


def check_resume_after_sigkill(tmp_path: Path, model, images, train: dict, **sections):
    """Train once straight through, once killed after a checkpoint and resumed with
    train.resume=auto; assert both end at the same step with the same trainable weights."""
    straight = train_recipe(write_recipe(tmp_path, model, images, Path(tmp_path) / "straight", train=train, **sections))
    out = Path(tmp_path) / "killed"
    recipe = write_recipe(tmp_path, model, images, out, train={**train, "resume": "auto"}, **sections)
    kill_after_checkpoint(recipe, out)
    result_file = "pytorch_lora_weights.safetensors"
    assert not (out / result_file).exists() and not (out / "model_index.json").exists()
    resumed = train_recipe(recipe)
    steps = train["max_steps"]
    assert resumed.state.step == straight.state.step == steps
    assert len(resumed.loss_history) < steps  # it really started from a checkpoint
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-6, f"resumed weights differ by {diff}"
    if (out / result_file).exists():
        from safetensors.torch import load_file

        assert load_file(Path(tmp_path) / "straight" / result_file).keys() == load_file(out / result_file).keys()
    return out


RANK_SCRIPT = """
import json, sys
from safetensors.torch import save_file
from sdkit.recipe import load_recipe
from sdkit.training.trainer import Trainer

trainer = Trainer(load_recipe(sys.argv[1]))
seen, shapes = [], []
def record_batches(trainer):
    compute = trainer.step.compute_loss
    def recording(batch):
        seen.extend(int(i) for i in batch["index"])
        shapes.append(list((batch["moments"] if "moments" in batch else batch["pixel_values"]).shape[-2:]))
        return compute(batch)
    trainer.step.compute_loss = recording
trainer.setup()
record_batches(trainer)
trainer.loop()
trainer.finish()
trainer.accelerator.end_training()
rank = trainer.accelerator.process_index
out = sys.argv[2]
json.dump({"seen": seen, "shapes": shapes, "steps": trainer.state.step, "world": trainer.accelerator.num_processes},
          open(f"{out}/seen-{rank}.json", "w"))
save_file(trainer.trainable_state(), f"{out}/weights-{rank}.safetensors")
texts = {f"{i}.{k}": v.detach().cpu().contiguous() for i, enc in enumerate(trainer.family.text_encoders)
         if any(p.requires_grad for p in enc.parameters()) for k, v in trainer.adapter.trainable_state(enc).items()}
save_file(texts, f"{out}/text-{rank}.safetensors")  # the trained text encoders' weights (none: empty)
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous, a server)."""
    from sdkit.export.torchserve import free_ports

    return free_ports(1)[0]


def train_two_cpu_ranks(tmp_path: Path, recipe: Path, port: int) -> tuple[Path, list[dict]]:
    """Train `recipe` on 2 CPU processes (accelerate's multi-GPU launcher with cpu=True ranks,
    see ENVIRONMENT.md); returns the results folder and, per rank, the batch indices and
    shapes it trained, its steps and the world size (weights in results/weights-RANK.safetensors)."""
    import json

    script = Path(tmp_path) / "rank.py"
    script.write_text(RANK_SCRIPT)
    results = Path(tmp_path) / "results"
    results.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "--num_cpu_threads_per_process", "1",
           str(script), str(recipe), str(results)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return results, [json.loads((results / f"seen-{r}.json").read_text()) for r in (0, 1)]


def run_sdkit(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`sdkit ARGS` in a subprocess, offline; its exit code and output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sdkit", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a run that exited 2 (and printed nothing else)."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 600, result.stderr[-2000:]
    return lines[0]


def pipe_image(pipe, size: int, seed: int = 0):
    """A 2-step image of 'a red circle' as a float array (for pixel comparisons)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
