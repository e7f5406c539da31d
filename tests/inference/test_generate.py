"""`sdkit generate` on tiny models: reproducible pixels, metadata, LoRA, refiner, run folders, errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import write_recipe
from sdkit.errors import UserError
from sdkit.inference.generate import generate_command

FAST = dict(steps=2, guidance=5.0, seed=3)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_generate(out, model, prompts=("a red circle",), **kwargs):
    return generate_command(prompts=list(prompts), model=str(model), out=out, **{**FAST, **kwargs})


def make_lora_file(model_dir, out_dir, seed=0):
    """A LoRA on the tiny UNet with random non-zero lora_B, saved as diffusers saves LoRAs."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero, which would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
    )
    return out_dir / "pytorch_lora_weights.safetensors"


def run_cli(monkeypatch, capsys, *args):
    """sdkit's real entry point (`main` turns UserError into one line and exit code 2)."""
    from sdkit.cli import main

    monkeypatch.setattr(sys, "argv", ["sdkit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured


def test_same_seed_same_pixels_and_no_clobbering(tiny_sd, tmp_path):
    first = run_generate(tmp_path / "a", tiny_sd, num_images=2)
    second = run_generate(tmp_path / "b", tiny_sd, num_images=2)
    assert [p.name for p in first] == ["a-red-circle-3.png", "a-red-circle-4.png"]  # image k uses seed + k
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))
    # image k alone (seed 4) is the same as image 2 of the seed-3 run
    alone = run_generate(tmp_path / "c", tiny_sd, seed=4)
    assert np.array_equal(pixels(alone[0]), pixels(first[1]))
    # the model's own size when none is asked for (tiny: 32 px)
    assert Image.open(first[0]).size == (32, 32)
    # a second run into the same folder keeps the first run's files
    again = run_generate(tmp_path / "a", tiny_sd)
    assert again[0].name == "a-red-circle-3-2.png" and first[0].exists()


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_batched_images_start_from_their_own_seeds(model, request, tmp_path):
    """--batch-size: several images per pipeline call, each the image its seed gives alone."""
    folder = request.getfixturevalue(model)
    one_by_one = run_generate(tmp_path / "a", folder, num_images=3, negative_prompt="blurry")
    batched = run_generate(tmp_path / "b", folder, num_images=3, negative_prompt="blurry", batch_size=2)
    assert [p.name for p in batched] == [p.name for p in one_by_one]
    for a, b in zip(one_by_one, batched):
        # Same starting noise; a batched matmul may round differently, by a grey level at most.
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, (a.name, model)
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))


def test_metadata_round_trips(tiny_sd, tmp_path, capsys):
    [path] = run_generate(
        tmp_path, tiny_sd, prompts=["a blue square, on white: ünïcode"], negative_prompt="blurry",
        scheduler="euler-a", width=48, height=32,
    )
    assert f"wrote {path}" in capsys.readouterr().out
    image = Image.open(path)
    assert image.size == (48, 32)
    text = image.text
    assert text["prompt"] == "a blue square, on white: ünïcode"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "3" and text["steps"] == "2" and text["guidance"] == "5.0"
    assert text["model"] == str(tiny_sd) and text["lora"] == "" and text["refiner"] == ""
    assert text["scheduler"] == "euler-a" and text["width"] == "48" and text["height"] == "32"
    assert text["sdkit_version"]
    assert text["parameters"].splitlines() == [
        "a blue square, on white: ünïcode",
        "Negative prompt: blurry",
        f"Steps: 2, Sampler: Euler a, CFG scale: 5.0, Seed: 3, Size: 48x32, Model: {tiny_sd}, "
        f"Version: sdkit {text['sdkit_version']}",
    ]


def test_lora_changes_the_output_and_scale_zero_does_not(tiny_sd, tmp_path):
    lora = make_lora_file(tiny_sd, tmp_path / "lora")
    [base] = run_generate(tmp_path / "base", tiny_sd)
    [with_lora] = run_generate(tmp_path / "lora-out", tiny_sd, lora=str(lora))
    [scale_zero] = run_generate(tmp_path / "zero", tiny_sd, lora=str(lora), lora_scale=0.0)
    assert np.abs(pixels(base) - pixels(with_lora)).mean() > 1.0
    assert np.array_equal(pixels(base), pixels(scale_zero))
    text = Image.open(with_lora).text
    assert text["lora"] == str(lora) and text["lora_scale"] == "1.0"
    assert f"Lora: {lora}" in text["parameters"]


def test_refiner_changes_the_output(tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    [base] = run_generate(tmp_path / "base", tiny_sdxl)
    [refined] = run_generate(tmp_path / "refined", tiny_sdxl, refiner=str(tiny_sdxl_refiner))
    [again] = run_generate(tmp_path / "again", tiny_sdxl, refiner=str(tiny_sdxl_refiner))
    # The refiner takes only the last, least noisy 20% of the schedule, so the change is
    # small but real: the same refined run repeats exactly.
    assert np.abs(pixels(base) - pixels(refined)).mean() > 0.1
    assert np.array_equal(pixels(refined), pixels(again))
    assert Image.open(refined).text["refiner"] == str(tiny_sdxl_refiner)


def test_lora_run_folder_as_model(tiny_sd, image_folder, tmp_path):
    """A LoRA run folder resolves to its base model plus its LoRA file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = write_recipe(tmp_path, tiny_sd, image_folder, run_dir)
    shutil.copy(recipe, run_dir / "recipe.yaml")
    lora = make_lora_file(tiny_sd, run_dir)
    [from_run] = run_generate(tmp_path / "run-out", run_dir)
    [explicit] = run_generate(tmp_path / "explicit", tiny_sd, lora=str(lora))
    assert np.array_equal(pixels(from_run), pixels(explicit))
    text = Image.open(from_run).text
    assert text["model"] == str(run_dir) and text["base_model"] == str(tiny_sd) and text["lora"] == str(lora)


def test_full_run_folder_as_model(tiny_sd, image_folder, tmp_path):
    """A full fine-tune's run folder holds the pipeline itself (model_index.json + recipe.yaml)."""
    run_dir = tmp_path / "full-run"
    shutil.copytree(tiny_sd, run_dir)
    shutil.copy(write_recipe(tmp_path, tiny_sd, image_folder, run_dir, method={"type": "full"}),
                run_dir / "recipe.yaml")
    [from_run] = run_generate(tmp_path / "run-out", run_dir)
    [base] = run_generate(tmp_path / "base", tiny_sd)
    assert np.array_equal(pixels(from_run), pixels(base))


def test_sd3_and_flow_scheduler(tiny_sd3, tmp_path):
    [path] = run_generate(tmp_path, tiny_sd3, scheduler="flow-euler")
    assert Image.open(path).size == (32, 32) and Image.open(path).text["scheduler"] == "flow-euler"
    with pytest.raises(UserError, match=r"'ddim' does not work with sd3 models \(choose from: flow-euler, flow-heun\)"):
        run_generate(tmp_path, tiny_sd3, scheduler="ddim")


def test_profile_reports_each_phase(tiny_sd, tmp_path, capsys):
    run_generate(tmp_path, tiny_sd, num_images=2, profile=True)
    out = capsys.readouterr().out
    report = out[out.index("profile:"):]
    for phase in ("text encoding", "denoising", "VAE decoding"):
        line = next(line for line in report.splitlines() if line.strip().startswith(phase))
        assert float(line.split()[-4]) > 0.0, line  # "<phase>  <seconds> s  <per image> s/image"
    assert "peak memory" in report and ("MiB" in report or "GiB" in report)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "./no/such/model"], "--model: folder './no/such/model' does not exist"),
        (["--width", "30"], "--width must be a positive multiple of 8"),
        (["--scheduler", "warp-drive"], "--scheduler: unknown scheduler 'warp-drive' (choose from: ddim"),
        (["--device", "cuda:7"], None),  # CUDA only where there is a GPU
        (["--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
        (["--batch-size", "2", "--refiner", "./no/such/refiner"], "--batch-size: with --refiner"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_sd, tmp_path, monkeypatch, capsys, args, needle):
    import torch

    if needle is None:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        needle = "--device cuda:7: CUDA is not available"
    base = ["generate", "a dog", "--model", str(tiny_sd), "--steps", "2", "--out", str(tmp_path)]
    code, captured = run_cli(monkeypatch, capsys, *base, *args)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert lines[-1] == lines[-1].strip() and needle in lines[-1], captured.err
    assert lines[-1].startswith("error: ") and "Traceback" not in captured.err
    assert not list(tmp_path.glob("*.png"))


def test_console_entry_point_bad_model_one_line(tmp_path):
    """The installed command, from another folder: exit 2, one line, no traceback, no torch needed."""
    result = subprocess.run(
        [sys.executable, "-m", "sdkit", "generate", "a dog", "--model", "./no/such/model"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: --model: folder './no/such/model' does not exist"


def test_refiner_only_model_and_refiner_on_sd_are_refused(tiny_sd, tiny_sdxl_refiner, tmp_path):
    with pytest.raises(UserError, match="is an SDXL refiner"):
        run_generate(tmp_path, tiny_sdxl_refiner)
    with pytest.raises(UserError, match="--refiner: a refiner works with SDXL"):
        run_generate(tmp_path, tiny_sd, refiner=str(tiny_sdxl_refiner))


def test_dtype_and_device_choice():
    import torch

    from sdkit.inference.sampling import pick_device, pick_dtype

    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    assert pick_dtype("cuda", "fp32") == torch.float32
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert pick_device() in ("cpu", "mps")
