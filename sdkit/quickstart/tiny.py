"""Tiny random-weight pipelines of every family, built from configs with no download.

Tests (and `sdkit` demos) need real diffusers folders that load with `from_pretrained`
offline and run in milliseconds. Each builder here assembles components whose shapes fit
together the way the real model's do (same block types, same conditioning wiring, same
scheduler config), only with tiny channel counts, and saves them with safetensors.

Every component is built under its own seed (`seed + k`) inside a forked RNG, so a build
is deterministic, does not disturb the caller's RNG, and components shared between
builders (e.g. the SDXL VAE of base and refiner) come out identical.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

# Special CLIP tokens sit after the byte vocabulary, as in the real CLIP vocab (49406/49407),
# so `argmax(input_ids)` also finds the end-of-text token.
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 514  # 256 bytes + 256 end-of-word bytes + 2 specials
# Two blocks, one cross-attention block each way: the smallest UNet that still conditions on text.
SMALL_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=32,
)

# Scheduler configs as the real checkpoints ship them.
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
SD21_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="v_prediction",
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
    timestep_spacing="leading", use_karras_sigmas=False,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# Words the tiny T5 vocabulary knows whole; anything else falls back to letters.
_T5_WORDS = (
    "a an the of on in with and photo picture painting drawing dog cat red green blue yellow "
    "white black circle square triangle background small large man woman car house tree sky"
).split()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for one component without touching the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# ---------------------------------------------------------------------------- tokenizers


def tiny_clip_tokenizer():
    """A CLIPTokenizer with a byte-level vocab: every prompt tokenizes, one token per byte."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": 256 + i for i, ch in enumerate(alphabet)})
    vocab[CLIP_BOS] = 512
    vocab[CLIP_EOS] = 513
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def tiny_t5_tokenizer():
    """A T5TokenizerFast from an in-memory Unigram vocab (no sentencepiece file)."""
    from transformers import T5TokenizerFast

    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    scores.update({ch: -5.0 for ch in letters})
    scores.update({"▁" + ch: -5.5 for ch in letters})
    scores.update({"▁" + word: -3.0 for word in _T5_WORDS})  # after letters: "▁a" is a word
    return T5TokenizerFast(vocab=list(scores.items()), extra_ids=0, additional_special_tokens=[], model_max_length=512)


def _t5_vocab_size() -> int:
    return len(tiny_t5_tokenizer())


# ---------------------------------------------------------------------------- components


def _clip_text_config(hidden_size: int = 32, *, hidden_act: str = "quick_gelu", projection_dim: int = 32, **more):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": hidden_act,
        "projection_dim": projection_dim,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
        **more,  # e.g. a shorter context, another init scale (the quickstart)
    })


def clip_text_model(seed: int, *, with_projection: bool = False, **config_kwargs):
    """A tiny random CLIP text encoder for `tiny_clip_tokenizer`'s byte-level vocabulary."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with seeded(seed):
        return cls(_clip_text_config(**config_kwargs)).eval()


def _vae(seed: int, *, block_out_channels: Sequence[int] = (8, 16), layers_per_block: int = 1,
         latent_channels: int = 4, sample_size: int = 32, norm_num_groups: int = 2, **extra):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            **extra,
        ).eval()


def _save(pipe, path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------- SD 1.x / 2.x


def build_tiny_sd(path, *, v_prediction: bool = False, sd_structure: bool = False, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline (SD 1.5 layout; `v_prediction=True` mimics SD 2.1).

    Default: 2-block UNet/VAE for 32 px images. `sd_structure=True`: SD's real 4-block
    layout (2 layers per block) with tiny channels, for 64 px images; diffusers' converter
    to and from the original single-file key layout hardcodes that structure.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if sd_structure:
        unet_kwargs = dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=8,  # 64 px / VAE factor 8
        )
        vae_kwargs = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32, sample_size=64)
    else:
        unet_kwargs = dict(SMALL_UNET, sample_size=16)  # 32 px / VAE factor 2
        vae_kwargs = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=2, sample_size=32)

    with seeded(seed):
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=32,
            use_linear_projection=v_prediction,  # SD 2.x uses linear proj_in/proj_out
            **unet_kwargs,
        ).eval()
    vae = _vae(seed + 1, latent_channels=4, scaling_factor=0.18215, **vae_kwargs)
    text_encoder = clip_text_model(seed + 2, hidden_act="gelu" if v_prediction else "quick_gelu")
    if v_prediction:
        scheduler = DDIMScheduler(**SD21_SCHEDULER)
    else:
        scheduler = PNDMScheduler(**SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, path)


# ---------------------------------------------------------------------------- SDXL

# The two text encoders differ in width as in SDXL (768 vs 1280): diffusers' single-file
# loader tells them apart by width, and equal widths would load encoder 1 into encoder 2.
_SDXL_TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L in SDXL)
_SDXL_TEXT_HIDDEN_2 = 64  # text_encoder_2 (OpenCLIP bigG in SDXL)
_SDXL_PROJECTION = 32  # text_encoder_2 projection = pooled text_embeds width
_SDXL_TIME_EMBED = 8


def _sdxl_unet(seed: int, *, cross_attention_dim: int, n_time_ids: int):
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        return UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            sample_size=16,  # 32 px / VAE factor 2
            block_out_channels=(32, 64),
            layers_per_block=1,
            # SDXL's first level has no attention, as here.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=cross_attention_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=_SDXL_PROJECTION + n_time_ids * _SDXL_TIME_EMBED,
            norm_num_groups=32,
        ).eval()


def build_tiny_sdxl(path, *, refiner: bool = False, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline, or with `refiner=True` the img2img refiner.

    The refiner, like the real one, has only text_encoder_2 and conditions on 5 time ids
    (with an aesthetic score); its VAE is the base's (same seed), so base latents fit it.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    vae = _vae(seed + 1, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    text_encoder_2 = clip_text_model(
        seed + 3, with_projection=True, hidden_size=_SDXL_TEXT_HIDDEN_2, hidden_act="gelu",
        projection_dim=_SDXL_PROJECTION,
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tiny_clip_tokenizer(),
            unet=_sdxl_unet(seed + 4, cross_attention_dim=_SDXL_TEXT_HIDDEN_2, n_time_ids=5),
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=clip_text_model(seed + 2, hidden_size=_SDXL_TEXT_HIDDEN),
            text_encoder_2=text_encoder_2,
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(),
            unet=_sdxl_unet(seed, cross_attention_dim=_SDXL_TEXT_HIDDEN + _SDXL_TEXT_HIDDEN_2, n_time_ids=6),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return _save(pipe, path)


# ---------------------------------------------------------------------------- SD3

# Widths differ as in SD3 (CLIP-L 768, CLIP-G 1280, T5 4096): T5 is wider than both CLIPs
# together, so the pipeline pads (never truncates) the CLIP embeddings to T5's width.
_SD3_CLIP_HIDDEN = 32
_SD3_CLIP_HIDDEN_2 = 64
_SD3_T5_DIM = 128


def build_tiny_sd3(path, *, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline: MMDiT, 16-channel VAE, two CLIPs + T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,  # 32 px / VAE factor 2
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_SD3_T5_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=_SD3_CLIP_HIDDEN + _SD3_CLIP_HIDDEN_2,
            pos_embed_max_size=32,
        ).eval()
    vae = _vae(
        seed + 1, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = clip_text_model(
        seed + 2, with_projection=True, hidden_size=_SD3_CLIP_HIDDEN, projection_dim=_SD3_CLIP_HIDDEN,
        hidden_act="quick_gelu",
    )
    text_encoder_2 = clip_text_model(
        seed + 3, with_projection=True, hidden_size=_SD3_CLIP_HIDDEN_2, projection_dim=_SD3_CLIP_HIDDEN_2,
        hidden_act="gelu",
    )
    t5_config = T5Config(
        vocab_size=_t5_vocab_size(), d_model=_SD3_T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    with seeded(seed + 4):
        text_encoder_3 = T5EncoderModel(t5_config).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return _save(pipe, path)


# ---------------------------------------------------------------------------- CLIP (for eval)


def build_tiny_clip(path, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor folder, loadable with `from_pretrained(path)` offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text_config = _clip_text_config(hidden_size=32, projection_dim=32).to_dict()
    vision_config = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    with seeded(seed):
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- image folders

_COLOURS = [
    ("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 70, 220)), ("yellow", (235, 210, 40)),
    ("purple", (150, 50, 180)), ("orange", (240, 140, 30)), ("white", (245, 245, 245)), ("black", (15, 15, 15)),
]
_SHAPES = ["circle", "square", "triangle"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_image_folder(path, n: int = 4, size: int = 32, captions: str = "metadata", seed: int = 0,
                      sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write `n` distinct PNGs of coloured shapes with captions, as a training set to overfit.

    captions: "metadata" -> metadata.jsonl ({"file_name", "text"}), the `imagefolder` layout;
    "txt" -> a .txt caption beside each image (kohya layout); "none" -> images only.
    sizes: per-image (width, height) overriding `size`.
    """
    import random

    from PIL import Image, ImageDraw

    if captions not in ("metadata", "txt", "none"):
        raise ValueError(f"captions must be 'metadata', 'txt' or 'none', not {captions!r}")
    if sizes is not None and len(sizes) != n:
        raise ValueError(f"sizes has {len(sizes)} entries for n={n} images")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        width, height = sizes[i] if sizes is not None else (size, size)
        # Index picks shape and colours, so images differ even for the same seed.
        shape = _SHAPES[i % len(_SHAPES)]
        fg_index = (i + seed) % len(_COLOURS)
        bg_offset = 1 + (2 + i // len(_COLOURS)) % (len(_COLOURS) - 1)  # never 0: shape stays visible
        fg_name, fg = _COLOURS[fg_index]
        bg_name, bg = _COLOURS[(fg_index + bg_offset) % len(_COLOURS)]
        image = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(image)
        margin = min(width, height) // 6
        jitter = max(1, min(width, height) // 10)
        x0, y0 = margin + rng.randrange(jitter), margin + rng.randrange(jitter)
        x1, y1 = width - margin - rng.randrange(jitter), height - margin - rng.randrange(jitter)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fg)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fg)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fg)
        file_name = f"{i:04d}.png"
        image.save(path / file_name)
        text = f"{_article(fg_name)} {fg_name} {shape} on {_article(bg_name)} {bg_name} background"
        rows.append({"file_name": file_name, "text": text})
        if captions == "txt":
            (path / f"{i:04d}.txt").write_text(text + "\n")
    if captions == "metadata":
        with open(path / "metadata.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return path


BUILDERS = {
    "sd": lambda out, seed: build_tiny_sd(out, seed=seed),
    "sd2": lambda out, seed: build_tiny_sd(out, v_prediction=True, seed=seed),
    "sd-struct": lambda out, seed: build_tiny_sd(out, sd_structure=True, seed=seed),
    "sdxl": lambda out, seed: build_tiny_sdxl(out, seed=seed),
    "sdxl-refiner": lambda out, seed: build_tiny_sdxl(out, refiner=True, seed=seed),
    "sd3": lambda out, seed: build_tiny_sd3(out, seed=seed),
    "clip": lambda out, seed: build_tiny_clip(out, seed=seed),
    "images": lambda out, seed: make_image_folder(out, seed=seed),
}


def build_by_name(name: str, out, *, seed: int = 0) -> Path:
    """`sdkit tiny OUT --family NAME`: one of BUILDERS."""
    from sdkit.errors import UserError

    if name not in BUILDERS:
        raise UserError(f"--family: unknown tiny model '{name}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[name](out, seed)
