"""DeepSpeed ZeRO-2/3 and FSDP training through `sdkit train --accelerate-config`, on GPUs only.

accelerate runs these engines only on accelerators: with `cpu=True` it turns an FSDP config
into DDP, and DeepSpeed needs CUDA. So these skip on CPU machines (with the reason); the
engine-agnostic parts (accumulate(), gathered save, all-rank validation) run under CPU DDP in
test_train.py and test_multinode.py. Each run here is a full fine-tune with EMA and validation
images (gathered weights, sharded forward), the result loaded back in diffusers.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import write_recipe

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_cuda = pytest.mark.skipif(GPUS == 0, reason="needs CUDA: accelerate runs DeepSpeed and FSDP only on GPUs "
                                                   "(on a CPU an FSDP config falls back to DDP)")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs deepspeed: pip install 'sdkit-recipes[deepspeed]'")

ENGINES = {
    "zero2": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n",
    "zero3": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  zero3_init_flag: false\n"
             "  zero3_save_16bit_model: true\n",
    "fsdp": "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n"
            "  fsdp_auto_wrap_policy: SIZE_BASED_WRAP\n  fsdp_min_num_params: 1000\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", n=8, size=32)


@needs_cuda
@pytest.mark.parametrize("engine", [pytest.param("zero2", marks=needs_deepspeed),
                                    pytest.param("zero3", marks=needs_deepspeed), "fsdp"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sharded_engine_trains_and_saves_full_weights(tiny_sd, images, tmp_path, engine, method):
    from diffusers import StableDiffusionPipeline

    processes = min(GPUS, 2)
    config = tmp_path / "accelerate.yaml"
    config.write_text(ENGINES[engine] + f"num_machines: 1\nnum_processes: {processes}\nmixed_precision: 'no'\n"
                      "main_process_port: 29571\n")
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, tiny_sd, images, out, method={"type": method},
        train={"max_steps": 4, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 2,
               "ema": method == "full"},
        validation={"prompts": ["a red square"], "every": 2, "steps": 2},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "sdkit", "train", str(recipe), "--accelerate-config", str(config)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert list((out / "samples").rglob("*.png")), "no validation images"
    assert list((out / "checkpoints").glob("checkpoint-*"))
    if method == "full":
        pipe = StableDiffusionPipeline.from_pretrained(out)
        base = StableDiffusionPipeline.from_pretrained(tiny_sd)
        trained, start = pipe.unet.state_dict(), base.unet.state_dict()
        assert trained.keys() == start.keys()
        assert all(trained[k].shape == start[k].shape for k in start), "a saved weight is a shard"
        assert any(not torch.equal(trained[k], start[k]) for k in start)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
        pipe.load_lora_weights(out)
