"""`sdkit train --dry-run --accelerate-config F`: process counts over machines, and DeepSpeed /
FSDP configs checked by accelerate's own launcher and plugins, without a GPU."""

import re
from pathlib import Path

import pytest

from sdkit.errors import UserError
from sdkit.recipe import load_recipe
from sdkit.shipped import shipped_path
from sdkit.training.launch import launch_or_run

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, config_text, capsys, overrides=("train.batch_size=2", "train.gradient_accumulation=2")):
    config = tmp_path / "accelerate.yaml"
    config.write_text(config_text)
    path = shipped_path("sd15-lora")
    launch_or_run(load_recipe(path, list(overrides)), path, list(overrides), config, dry_run=True)
    return capsys.readouterr().out


@pytest.mark.parametrize("machines, per_machine", [(1, 1), (1, 2), (2, 1), (2, 4)])
def test_effective_batch_counts_each_process_once(tmp_path, capsys, machines, per_machine):
    total = machines * per_machine
    kind = "MULTI_GPU" if total > 1 else '"NO"'
    out = dry_run(tmp_path, f"distributed_type: {kind}\nnum_machines: {machines}\nnum_processes: {total}\n"
                            "machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: 29561\n", capsys)
    plural = "es" if total > 1 else ""
    assert f"effective batch {2 * 2 * total} (2 x 2 accumulation x {total} process{plural})" in out
    if machines > 1:
        assert f"on {machines} machines x {per_machine} process" in out
        assert "same output_dir" in out
    assert ("launch: " in out) == (total > 1)


def readme_engine_configs() -> list[str]:
    """The accelerate configs README's multi-GPU section shows."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Multi-GPU and multi-node", 1)[1].split("\n### ", 1)[0]
    return [block for block in re.findall(r"```yaml\n(.*?)```", section, re.S) if "distributed_type" in block]


@pytest.mark.parametrize("index", range(5))
def test_readme_configs_pass_as_written(tmp_path, capsys, index):
    configs = readme_engine_configs()
    assert len(configs) == 5, "README's multi-GPU section changed: update this test's count"
    out = dry_run(tmp_path, configs[index], capsys)
    engine = re.search(r"^engine: (.*)$", out, re.M).group(1)
    assert engine.split()[0] in {"DDP", "DeepSpeed", "FSDP1", "FSDP2"}, out


def test_deepspeed_takes_micro_batch_and_accumulation_from_the_recipe(tmp_path, capsys):
    out = dry_run(tmp_path, "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 3\n", capsys)
    assert "engine: DeepSpeed ZeRO-3 on 2 processes" in out
    assert "micro-batch 2 per process, accumulation 2" in out


def test_deepspeed_takes_text_encoder_training_as_one_model(tmp_path, capsys):
    out = dry_run(tmp_path, "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 2\n", capsys,
                  overrides=("train.batch_size=2", "method.train_text_encoder=true"))
    assert "engine: DeepSpeed ZeRO-2 on 2 processes" in out
    assert "text encoders train in one prepared module with the denoiser" in out


@pytest.mark.parametrize("config, needle", [
    ("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  gradient_accumulation_steps: 4\n",
     "train.gradient_accumulation: the DeepSpeed config sets gradient_accumulation_steps: 4"),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: HALF_SHARD\n", "HALF_SHARD"),
    ("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_gpus: 2\n", "unknown keys (['num_gpus'])"),
    ("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 3\n", "multiple of num_machines (2)"),
])
def test_configs_accelerate_would_refuse_are_one_line_errors(tmp_path, capsys, config, needle):
    with pytest.raises(UserError) as e:
        dry_run(tmp_path, config, capsys)
    assert needle in str(e.value) and "\n" not in str(e.value)
