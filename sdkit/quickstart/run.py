"""`sdkit quickstart`: train a miniature text-to-image model offline, on a CPU, in minutes.

What is real: the training loop (`sdkit.training.trainer.train` from `recipes/quickstart.yaml`: latent
and text caching, caption dropout, AdamW with a cosine schedule, EMA, checkpoints, validation
samples), the Stable Diffusion pipeline layout it reads and writes, DDIM sampling with
classifier-free guidance, and a judge that scores prompt-following.
What is miniature: the model and the data. scikit-learn's bundled handwritten digits
(16x16 grey), a small VAE that sdkit trains first on those digits (a random VAE decodes
nothing recognisable), a random frozen two-layer CLIP text encoder, and a 0.8M-parameter UNet.

Steps: (1) write the digits as a captioned image folder, (2) build the base model: train the
VAE, add a random UNet and text encoder, save a StableDiffusionPipeline folder, (3) train the
UNet with the sdkit trainer, (4) export the result as fp16 safetensors (`sdkit export`),
(5) `sdkit eval --metric digits` on the base, the result and the export: every digit drawn
10 times, labelled by a digits classifier; then an image grid and a JSON summary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

RESOLUTION = 16  # pixels
# Three VAE blocks (two downsamples): 16x16 digits become 4x4x4 latents, as many numbers as
# the 8x8 original. A UNet step on 4x4 latents costs a third of one on 8x8 ones.
VAE_BLOCKS = (16, 32, 64)
LATENT_SIDE = RESOLUTION // 2 ** (len(VAE_BLOCKS) - 1)
VAE_STEPS = 200
VAE_BATCH = 128
VAE_LR = 2e-3
SCALE_SAMPLE = 512  # digits used to set the latent scale and to check reconstructions
VAE_KL_WEIGHT = 1e-5  # small: the latents must keep the digit; a little KL keeps them smooth
# At CLIP's usual init scale the random encoder gives the ten captions 99.6%-alike embeddings
# (the word's signal fades in the residual stream) and the UNet ignored the prompt after 1,000
# steps (11%); at 5x they differ (cosine 0.85) and the same run follows the prompt (100%).
TEXT_INIT_SCALE = 5.0
# Captions are about 22 byte-level tokens: a 32-token context (CLIP has 77) makes a UNet step
# a third cheaper, since cross-attention no longer reads 45 more padding tokens.
TEXT_TOKENS = 32
JUDGE_IMAGES_PER_DIGIT = 10
JUDGE_STEPS = 25
JUDGE_GUIDANCE = 5.0  # random text embeddings of the ten captions are close: guidance separates them
BASE_MARKER = "sdkit_quickstart_base.json"  # the design the base was built with
REPORT_FILE = "quickstart.json"
GRID_FILE = "quickstart-grid.png"

Log = Callable[[str], None]


def _shipped(name: str) -> Path:
    """NAME among the shipped recipes (installed with sdkit, or this checkout's recipes/)."""
    from sdkit.shipped import recipes_dir

    path = recipes_dir() / name
    if not path.is_file():
        from sdkit.errors import UserError

        raise UserError(f"{path} is missing from this sdkit install (reinstall it)")
    return path


def recipe_path() -> Path:
    return _shipped("quickstart.yaml")


def digit_prompts_path() -> Path:
    """The ten prompts the quickstart is judged on ("a handwritten digit zero" ... "nine")."""
    return _shipped("prompts-digits.txt")


# ---------------------------------------------------------------- the base model

def train_digit_vae(pixels, *, steps: int = VAE_STEPS, seed: int = 0, log: Log = print):
    """An AutoencoderKL (VAE_BLOCKS channels, 4 latent channels) trained on the digits.

    pixels: float tensor [N, 3, H, W] in [-1, 1]. Its scaling_factor is set to 1/std of the
    latents, so the UNet trains on unit-variance latents as in Stable Diffusion.

    Its own short loop, on purpose: it fits a fixture of the demo (the miniature base model's
    VAE), not a denoiser, so it is not a second sdkit training loop; `sdkit train` trains denoisers
    through sdkit.training.step alone.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from sdkit.quickstart.tiny import seeded

    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
            block_out_channels=VAE_BLOCKS,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=VAE_BLOCKS[0],
            sample_size=pixels.shape[-1],
        )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=VAE_LR, total_steps=steps, pct_start=0.1)
    vae.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = pixels[torch.randint(0, len(pixels), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, batch) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"  vae step {step}/{steps}  loss {loss.item():.4f}  ({time.perf_counter() - started:.0f} s)")
    vae.eval()
    with torch.no_grad():  # a sample of the digits is plenty to estimate the latents' spread
        latents = vae.encode(pixels[:SCALE_SAMPLE]).latent_dist.sample(generator)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def digit_tensor(size: int = RESOLUTION):
    """(pixels [N, 3, size, size] in [-1, 1], labels): the digits as the trainer's data loader sees them."""
    import torch
    from PIL import Image

    from sdkit.training.samples import to_tensor
    from sdkit.quickstart.digits import load_digit_pixels

    pixels, labels = load_digit_pixels(size)
    # Grey PNGs load as RGB; `to_tensor` is the loader's own conversion.
    return torch.stack([to_tensor(Image.fromarray(p).convert("RGB")) for p in pixels]), labels


def reconstruction_share(vae, pixels, labels) -> float:
    """Share of the digits whose VAE reconstruction the judge still labels correctly."""
    import numpy as np
    import torch

    from sdkit.quickstart.digits import DigitJudge

    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return float(np.mean(DigitJudge().labels(tensor_to_images(recon)) == labels))


def tensor_to_images(x) -> list:
    from PIL import Image

    arrays = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def build_base(path, *, seed: int = 0, vae_steps: int = VAE_STEPS, log: Log = print) -> Path:
    """The untrained base: digit VAE + random tiny CLIP text encoder + random UNet, as a
    StableDiffusionPipeline folder with a DDIM scheduler (SD 1.5's noise schedule)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from sdkit.quickstart.tiny import SMALL_UNET, clip_text_model, seeded, tiny_clip_tokenizer

    path = Path(path)
    started = time.perf_counter()
    pixels, labels = digit_tensor()
    log(f"training the digit VAE ({vae_steps} steps at batch {VAE_BATCH})")
    vae = train_digit_vae(pixels, steps=vae_steps, seed=seed, log=log)
    share = reconstruction_share(vae, pixels[:SCALE_SAMPLE], labels[:SCALE_SAMPLE])
    log(f"  VAE reconstructions labelled correctly by the judge: {share:.1%}")
    with seeded(seed + 1):
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIDE, in_channels=4, out_channels=4, cross_attention_dim=32, **SMALL_UNET
        )
    text_encoder = clip_text_model(
        seed + 2, max_position_embeddings=TEXT_TOKENS, initializer_factor=TEXT_INIT_SCALE
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = TEXT_TOKENS
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    from sdkit.atomic import atomic_dir
    from sdkit.inference.sampling import quiet_loading

    quiet_loading()  # no "Writing model shards" bar between the quickstart's lines
    with atomic_dir(path, overwrite=True) as tmp:  # a crash mid-save leaves the old base or none
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"design": base_design(seed=seed, vae_steps=vae_steps), "vae_reconstruction_share": share,
                "seconds": round(time.perf_counter() - started, 1)}
        (tmp / BASE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return path


def base_design(*, seed: int, vae_steps: int) -> dict:
    """Everything that makes the base model what it is: a base built otherwise is rebuilt."""
    return {"seed": seed, "vae_steps": vae_steps, "resolution": RESOLUTION, "vae_blocks": list(VAE_BLOCKS),
            "vae_kl_weight": VAE_KL_WEIGHT, "text_tokens": TEXT_TOKENS, "text_init_scale": TEXT_INIT_SCALE}


def base_is_current(path: Path, *, seed: int, vae_steps: int) -> bool:
    marker = Path(path) / BASE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("design") == base_design(seed=seed, vae_steps=vae_steps)


# ---------------------------------------------------------------- the command

def _data_and_base(run: Path, data_dir: Path, base_dir: Path, *, seed: int, vae_steps: int, log: Log) -> None:
    """Steps 1 and 2: the digits folder and the miniature base model, each reused when current."""
    from sdkit.quickstart.digits import write_digits_folder

    if not (data_dir / "metadata.jsonl").is_file():
        write_digits_folder(data_dir, size=RESOLUTION)
    log(f"[bold]1/5[/] data: 1,797 scikit-learn digits as {RESOLUTION}px PNGs with captions in {data_dir}")
    if base_is_current(base_dir, seed=seed, vae_steps=vae_steps):
        log(f"[bold]2/5[/] base model: reusing {base_dir}")
        return
    log(f"[bold]2/5[/] base model: digit VAE + random text encoder + random UNet -> {base_dir}")
    build_base(base_dir, seed=seed, vae_steps=vae_steps, log=log)
    # Checkpoints and cached latents of an earlier base belong to another model.
    for stale in ("checkpoints", "cache"):
        shutil.rmtree(run / stale, ignore_errors=True)


def _judge(run: Path, base_dir: Path, export_dir: Path, eval_dir: Path, *, seed: int, images_per_digit: int,
           log: Log) -> tuple[dict, dict]:
    """Step 5: the digits judge over the base, the trained model and its export; the grid and
    the numbers of quickstart.json (without the timings)."""
    from PIL import Image

    from sdkit.inference.evaluate import eval_command
    from sdkit.quickstart.digits import DIGIT_WORDS, image_grid, prompted_digit

    log(f"[bold]5/5[/] eval: {images_per_digit} images per digit from the base, the trained model and its "
        f"export (DDIM {JUDGE_STEPS} steps, guidance {JUDGE_GUIDANCE:g}), labelled by a digits classifier")
    models = {"base": base_dir, "trained": run, "export": export_dir}
    report = eval_command(
        prompts=digit_prompts_path(), models=[str(m) for m in models.values()], metric="digits",
        images_per_prompt=images_per_digit, batch_size=images_per_digit, steps=JUDGE_STEPS,
        guidance=JUDGE_GUIDANCE, seed=seed, out=eval_dir,
    )
    share = {name: entry["mean"] / 100 for name, entry in zip(models, report["models"])}
    trained_label = report["models"][1]["label"]
    rows = [[image["file"] for image in p["scores"][trained_label]["images"]] for p in report["prompts"]]
    grid_path = run / GRID_FILE
    image_grid([[Image.open(f) for f in row] for row in rows], scale=4, gap=4).save(grid_path)
    summary = {
        "prompt_share": share["trained"],
        "prompt_share_base": share["base"],
        "prompt_share_export": share["export"],
        "per_digit": {DIGIT_WORDS[prompted_digit(p["prompt"])]: p["scores"][trained_label]["score"] / 100
                      for p in report["prompts"]},
        "images_per_digit": images_per_digit,
        "grid": str(grid_path),
        "eval": str(eval_dir),
    }
    return summary, share


def quickstart_command(out: str = "runs/quickstart", steps: Optional[int] = None, seed: int = 0, *,
                       vae_steps: int = VAE_STEPS, images_per_digit: int = JUDGE_IMAGES_PER_DIGIT,
                       log: Optional[Log] = None) -> Path:
    """Data, base model, training (`recipes/quickstart.yaml`), export and a judged evaluation.

    Returns the run folder, a diffusers pipeline that `sdkit generate --model` loads. A rerun
    reuses the digits folder, the base model and the latent cache, and resumes training from
    the newest checkpoint (an interrupted quickstart loses at most `train.checkpoint_every` steps).
    """
    from rich.console import Console

    from sdkit.export.run import export_command
    from sdkit.recipe import load_recipe
    from sdkit.training.run_folder import mark_run_folder, refuse_foreign_folder
    from sdkit.training.trainer import train

    log = log or Console(stderr=True).print
    started = time.perf_counter()
    run = Path(out)
    data_dir, base_dir, export_dir, eval_dir = run / "digits", run / "base", run / "export", run / "eval"
    refuse_foreign_folder(run, "--out")
    mark_run_folder(run)  # the run folder holds its own data and base model: it is sdkit's
    _data_and_base(run, data_dir, base_dir, seed=seed, vae_steps=vae_steps, log=log)

    overrides = [f"model.pretrained={base_dir}", f"data.dataset={data_dir}", f"output_dir={run}",
                 f"train.seed={seed}", "train.resume=auto"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    recipe = load_recipe(recipe_path(), overrides)
    log(f"[bold]3/5[/] training the UNet with the sdkit trainer ({recipe_path().name}): "
        f"{recipe.train.max_steps} steps at batch {recipe.train.batch_size}")
    t_train = time.perf_counter()
    train(recipe)
    train_seconds = time.perf_counter() - t_train

    log(f"[bold]4/5[/] export: fp16 safetensors diffusers folder -> {export_dir}")
    export_command(format="safetensors", model=str(run), out=str(export_dir), dtype="fp16", force=True)

    summary, share = _judge(run, base_dir, export_dir, eval_dir, seed=seed, images_per_digit=images_per_digit, log=log)
    grid_path = Path(summary["grid"])
    summary.update(steps=recipe.train.max_steps, train_seconds=round(train_seconds, 1),
                   total_seconds=round(time.perf_counter() - started, 1))
    (run / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"images the classifier labels as the prompted digit: trained [bold]{share['trained']:.0%}[/] "
        f"(its fp16 export {share['export']:.0%}), untrained base {share['base']:.0%} (chance is 10%)")
    log(f"image grid (a row per digit, zero to nine): [bold]{grid_path}[/]")
    log(f"every image, the scores and a labelled grid: {eval_dir}")
    log(f"model: {run}  (try: sdkit generate \"a handwritten digit three\" --model {run})")
    log(f"done in {summary['total_seconds'] / 60:.1f} min")
    return run
