"""The tiny model builders give real pipelines that load offline and generate."""

import json
import subprocess
import sys

import pytest
import torch

from sdkit.quickstart import tiny

PIPELINES = [
    # fixture, pipeline class name, image side in px
    ("tiny_sd", "StableDiffusionPipeline", 32),
    ("tiny_sd2", "StableDiffusionPipeline", 32),
    ("tiny_sd_struct", "StableDiffusionPipeline", 64),
    ("tiny_sdxl", "StableDiffusionXLPipeline", 32),
    ("tiny_sd3", "StableDiffusion3Pipeline", 32),
]


def _generate(pipe, **kwargs):
    return pipe("a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("fixture,class_name,side", PIPELINES)
def test_pipeline_loads_offline_and_generates(request, fixture, class_name, side):
    import diffusers

    path = request.getfixturevalue(fixture)
    pipe = getattr(diffusers, class_name).from_pretrained(path)
    # No height/width given: the default resolution follows from the UNet/VAE configs.
    image = _generate(pipe).images[0]
    assert image.size == (side, side)
    assert _generate(pipe).images[0].tobytes() == image.tobytes()  # fixed generator -> same image


def test_weights_are_safetensors(tiny_sd):
    assert sorted(p.name for p in tiny_sd.rglob("*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors",
    ]
    assert not list(tiny_sd.rglob("*.bin"))


def test_sd2_is_v_prediction(tiny_sd2):
    config = json.loads((tiny_sd2 / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["prediction_type"] == "v_prediction"


def test_sd_structure_has_sd_block_layout(tiny_sd_struct):
    unet = json.loads((tiny_sd_struct / "unet" / "config.json").read_text())
    vae = json.loads((tiny_sd_struct / "vae" / "config.json").read_text())
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["layers_per_block"] == 2 and len(unet["block_out_channels"]) == 4
    assert vae["layers_per_block"] == 2 and len(vae["block_out_channels"]) == 4


def test_clip_tokenizer_splits_prompts_into_distinct_tokens(tiny_sd):
    from transformers import CLIPTokenizer

    for tokenizer in (tiny.tiny_clip_tokenizer(), CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")):
        ids = tokenizer("a photo of a dog").input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(set(ids)) > 3 and tokenizer.unk_token_id not in ids[1:-1]
        padded = tokenizer("a dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a photo of a dog"


def test_t5_tokenizer_splits_prompts_into_distinct_tokens(tiny_sd3):
    from transformers import T5TokenizerFast

    for tokenizer in (tiny.tiny_t5_tokenizer(), T5TokenizerFast.from_pretrained(tiny_sd3 / "tokenizer_3")):
        ids = tokenizer("a photo of a zebra").input_ids
        assert len(set(ids)) > 3 and tokenizer.unk_token_id not in ids
        assert ids[-1] == tokenizer.eos_token_id


def test_sdxl_refiner_refines_base_latents(tiny_sdxl, tiny_sdxl_refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    latents = _generate(base, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)
    image = refiner("a photo of a dog", image=latents, num_inference_steps=2, strength=0.5,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def _tensors(folder):
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


@pytest.mark.parametrize("build", [tiny.build_tiny_sd, tiny.build_tiny_sdxl, tiny.build_tiny_sd3])
def test_same_seed_same_weights(tmp_path, build):
    a, b = _tensors(build(tmp_path / "a", seed=3)), _tensors(build(tmp_path / "b", seed=3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _tensors(build(tmp_path / "c", seed=4))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_disturb_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_sd(tmp_path / "sd")
    assert torch.equal(torch.rand(3), expected)


def test_sdxl_refiner_shares_the_base_vae(tiny_sdxl, tiny_sdxl_refiner):
    assert _tensors(tiny_sdxl / "vae").keys() == _tensors(tiny_sdxl_refiner / "vae").keys()
    base, refiner = _tensors(tiny_sdxl / "vae"), _tensors(tiny_sdxl_refiner / "vae")
    assert all(torch.equal(base[k], refiner[k]) for k in base)


def test_clip_folder_loads_and_scores(tiny_clip, image_folder):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    images = [Image.open(p) for p in sorted(image_folder.glob("*.png"))]
    inputs = processor(text=["a red circle", "a blue square"], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_image_folder_metadata_layout(image_folder):
    rows = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:04d}.png" for i in range(4)]
    assert len({r["text"] for r in rows}) == 4
    pixels = {(image_folder / r["file_name"]).read_bytes() for r in rows}
    assert len(pixels) == 4


def test_image_folder_loads_with_datasets_imagefolder(image_folder):
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(image_folder), split="train")
    assert len(dataset) == 4 and dataset[0]["image"].size == (32, 32) and dataset[0]["text"]


def test_image_folder_txt_and_none_layouts_and_sizes(tmp_path):
    from PIL import Image

    txt = tiny.make_image_folder(tmp_path / "txt", n=3, captions="txt", sizes=[(32, 32), (48, 32), (32, 40)])
    assert sorted(p.name for p in txt.iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt",
    ]
    assert [Image.open(txt / f"{i:04d}.png").size for i in range(3)] == [(32, 32), (48, 32), (32, 40)]
    assert (txt / "0001.txt").read_text().startswith("a ")
    bare = tiny.make_image_folder(tmp_path / "none", n=2, size=16, captions="none")
    assert sorted(p.name for p in bare.iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(ValueError):
        tiny.make_image_folder(tmp_path / "bad", captions="csv")


def test_importing_tiny_does_not_import_torch():
    code = "import sys, sdkit.quickstart.tiny; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_text_encoders_differ_in_width_as_the_real_models(tiny_sdxl, tiny_sd3):
    # diffusers' single-file loader tells the CLIPs apart by width; equal widths mix them up.
    def width(folder, name):
        return json.loads((folder / name / "config.json").read_text())["hidden_size"]

    assert width(tiny_sdxl, "text_encoder") != width(tiny_sdxl, "text_encoder_2")
    assert width(tiny_sd3, "text_encoder") != width(tiny_sd3, "text_encoder_2")
    t5 = json.loads((tiny_sd3 / "text_encoder_3" / "config.json").read_text())["d_model"]
    assert t5 >= width(tiny_sd3, "text_encoder") + width(tiny_sd3, "text_encoder_2")
