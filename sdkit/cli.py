"""The `sdkit` command line.

Thin on purpose: each command checks its input, then imports its runner lazily, so
`sdkit --help` never pays for torch, diffusers or peft.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from sdkit.errors import UserError, shorten

# The everyday loop, as users type it: train, then score, look at and ship the model just trained
# (generate, eval and export default to the newest complete run in ./runs).
EVERYDAY = (
    "sdkit train recipes/sdxl-lora.yaml\n"
    "sdkit eval --prompts prompts.txt\n"
    'sdkit generate "photo of a dog"\n'
    "sdkit export --format mar"
)
MODEL_HELP = "Hub id, diffusers folder, training run folder or one of its checkpoints (RUN/checkpoints/checkpoint-N) (default: $SDKIT_MODEL, else the newest complete run in ./runs)."


def with_loop(summary: str) -> str:
    """A help text: its summary, then the everyday loop as the first example."""
    lines = "\n".join(f"[bold]$[/bold] {line}" for line in EVERYDAY.splitlines())
    return (f"{summary}\n\nThe everyday loop (eval, generate and export take the newest complete run in ./runs):"
            f"\n\n{lines}")


app = typer.Typer(
    help=with_loop("Fine-tune, generate with, evaluate and export Stable Diffusion models."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OverridesArg = typer.Argument(None, help="Recipe overrides as dotted KEY=VALUE, e.g. train.max_steps=500.")


@app.command(help=with_loop("Train from a recipe (full fine-tune or LoRA), through accelerate."))
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe file, or a shipped recipe's name (sdkit recipes)."),
    overrides: Optional[List[str]] = OverridesArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and what would run; load nothing."),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", help="accelerate config (default: ./accelerate_config.yaml when present)."
    ),
):
    from sdkit.recipe import load_recipe
    from sdkit.shipped import resolve_recipe
    from sdkit.training.launch import launch_or_run

    recipe = resolve_recipe(recipe)
    resolved = load_recipe(recipe, overrides or [])
    launch_or_run(resolved, recipe, overrides or [], accelerate_config, dry_run=dry_run)


recipes_app = typer.Typer(help="The recipes that ship with sdkit: list them, copy one to edit.", no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context):
    """List the shipped recipes: family, method, GPU memory target (train one with `sdkit train NAME`)."""
    if ctx.invoked_subcommand is None:
        from sdkit.shipped import table

        typer.echo(table())


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., help="A shipped recipe's name (see `sdkit recipes`)."),
    path: Optional[Path] = typer.Argument(None, help="File or folder to copy to (default: ./NAME.yaml)."),
):
    """Copy a shipped recipe to edit."""
    from sdkit.shipped import copy_recipe

    typer.echo(f"wrote {copy_recipe(name, path)}")


@app.command(help=with_loop("Generate images from a base model, a fine-tune, a LoRA, or SDXL base + refiner."))
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    lora: Optional[str] = typer.Option(None, "--lora", help="LoRA file, folder or run folder."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA strength."),
    embedding: Optional[List[str]] = typer.Option(
        None, "--embedding", help="Textual-inversion embedding (.safetensors or run folder); repeatable."
    ),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="SDXL refiner (hub id or folder)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    steps: int = typer.Option(30, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", min=0.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same image."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels (multiple of 8)."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels (multiple of 8)."),
    num_images: int = typer.Option(1, "--num-images", min=1, help="Images per prompt."),
    batch_size: int = typer.Option(
        1, "--batch-size", min=1, help="Images per pipeline call, each from its own seed (not with --refiner)."
    ),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scheduler: ddim, euler, euler-a, dpm++, pndm, ..."),
    out: Path = typer.Option(Path("outputs"), "--out", help="Folder for the PNG files."),
    device: Optional[str] = typer.Option(None, "--device", help="Force a device (cuda, cpu, mps)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Force a dtype (fp16, bf16, fp32)."),
    profile: bool = typer.Option(False, "--profile", help="Time text encoding, denoising and decoding; report peak memory."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser (pays off over many images)."),
    endpoint: Optional[List[str]] = typer.Option(
        None, "--endpoint", help="Use `sdkit serve --split` parts: one URL http://HOST:PORT/v2/models/NAME for all, "
        "or PART=URL (text-encoder, denoiser, decoder; repeat); parts without one run here from --model.",
    ),
):
    from sdkit.inference.default_model import use_model
    from sdkit.inference.generate import check_size, generate_command

    check_size(width, height)
    if endpoint:
        from sdkit.serve.endpoint_generate import endpoint_generate_command

        endpoint_generate_command(
            prompts=prompts, endpoints=endpoint, model_ref=lambda: use_model(model).ref, negative_prompt=negative_prompt,
            steps=steps, guidance=guidance, seed=seed, width=width, height=height, num_images=num_images, out=out,
            local_only={"--lora": lora, "--lora-scale": lora_scale != 1.0, "--embedding": embedding,
                        "--refiner": refiner, "--scheduler": scheduler, "--device": device, "--dtype": dtype,
                        "--profile": profile, "--compile": compile, "--batch-size": batch_size > 1},
        )
        return
    generate_command(
        prompts=prompts, model=use_model(model).ref, lora=lora, lora_scale=lora_scale, refiner=refiner,
        negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed, width=width,
        height=height, num_images=num_images, batch_size=batch_size, scheduler=scheduler, out=out,
        device=device, dtype=dtype, profile=profile, compile=compile, embeddings=tuple(embedding or ()),
    )


@app.command("eval", help=with_loop("CLIP score (or the digits judge) per prompt and overall, for one or more models."))
def evaluate(
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt a line (# comments ignored)."),
    model: Optional[List[str]] = typer.Option(
        None, "--model", "-m",
        help="Model to score; repeat to compare several (default: $SDKIT_MODEL, else the newest complete run in "
        "./runs, each beside the base model it was trained from).",
    ),
    lora: Optional[str] = typer.Option(None, "--lora", help="LoRA applied to every model."),
    metric: str = typer.Option(
        "clip", "--metric", help="clip (CLIP score) or digits (share the quickstart's digits classifier labels as prompted)."
    ),
    clip_model: str = typer.Option(
        "openai/clip-vit-large-patch14", "--clip-model", envvar="SDKIT_CLIP_MODEL", help="CLIP hub id or local folder."
    ),
    images_per_prompt: int = typer.Option(2, "--images-per-prompt", min=1, help="Images per prompt and model."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per pipeline call, each from its own seed."),
    steps: int = typer.Option(30, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", min=0.0, help="Guidance scale."),
    seed: int = typer.Option(0, "--seed", help="First seed; image k of a prompt uses seed + k."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels (multiple of 8)."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels (multiple of 8)."),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for report.json, scores.csv and grid.png."),
    device: Optional[str] = typer.Option(None, "--device", help="Force a device."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Force a dtype (fp16, bf16, fp32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser (pays off over many images)."),
):
    from sdkit.inference.default_model import models_to_compare
    from sdkit.inference.evaluate import eval_command

    eval_command(
        prompts=prompts, models=models_to_compare(model), lora=lora, metric=metric, clip_model=clip_model,
        images_per_prompt=images_per_prompt, batch_size=batch_size, steps=steps, guidance=guidance, seed=seed,
        width=width, height=height, out=out, device=device, dtype=dtype, compile=compile,
    )


@app.command(help=with_loop("Export a TorchServe archive (.mar, KServe v2) or safetensors files other SD tools load."))
def export(
    format: str = typer.Option(..., "--format", help="mar (TorchServe/KServe), kserve (sdkit serve image) or safetensors."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (or file with --single-file; default: export/NAME/)."
    ),
    lora: Optional[str] = typer.Option(None, "--lora", help="LoRA to ship, fuse or convert."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="mar: SDXL refiner to ship."),
    name: Optional[str] = typer.Option(None, "--name", help="Export name (default: the run or model folder's name)."),
    archive_format: str = typer.Option("default", "--archive-format", help="mar: default, no-archive, tgz or zip-store (uncompressed .mar)."),
    check: bool = typer.Option(False, "--check", help="mar: start TorchServe locally and send test requests."),
    max_steps: int = typer.Option(50, "--max-steps", help="mar: cap on steps per request."),
    max_size: int = typer.Option(1024, "--max-size", help="mar: cap on width/height per request."),
    max_batch: int = typer.Option(4, "--max-batch", help="mar: cap on images per request."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="fp16, bf16 or fp32 (safetensors default fp16; mar default: local safetensors as stored)."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="mar: default steps of a request (30)."),
    width: Optional[int] = typer.Option(None, "--width", help="mar: default width (the model's native size)."),
    height: Optional[int] = typer.Option(None, "--height", help="mar: default height."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="mar: default guidance scale."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="mar: default negative prompt."),
    image_format: str = typer.Option("png", "--image-format", help="mar: default answer: png, uint8 or uint8-hwc."),
    refiner_start: float = typer.Option(0.8, "--refiner-start", help="mar: share of the steps before the refiner."),
    refiner_steps: Optional[int] = typer.Option(None, "--refiner-steps", help="mar: refiner steps (default: the request's)."),
    refiner_device: str = typer.Option("same", "--refiner-device", help="mar: same or cpu (keep the refiner off the GPU)."),
    startup_timeout: int = typer.Option(1200, "--startup-timeout", help="mar: seconds TorchServe waits for the model to load."),
    response_timeout: int = typer.Option(600, "--response-timeout", help="mar: seconds one request may take."),
    no_requirements: bool = typer.Option(
        False, "--no-requirements", help="mar: no requirements.txt / per-model pip install (the image has diffusers)."
    ),
    split: bool = typer.Option(False, "--split", help="kserve: serve the text encoder, denoiser and decoder too."),
    single_file: bool = typer.Option(False, "--single-file", help="safetensors: one original-layout checkpoint."),
    lora_format: str = typer.Option("peft", "--lora-format", help="safetensors LoRA: peft (diffusers) or kohya."),
    fuse_lora: bool = typer.Option(False, "--fuse-lora", help="Merge the LoRA into the base weights."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Strength when fusing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
):
    from sdkit.export.run import export_command
    from sdkit.export.serve_settings import ServeSettings
    from sdkit.inference.default_model import use_model

    settings = ServeSettings(
        steps=steps, width=width, height=height, guidance=guidance, negative_prompt=negative_prompt,
        image_format=image_format, refiner_start=refiner_start, refiner_steps=refiner_steps,
        refiner_device=refiner_device, startup_timeout=startup_timeout, response_timeout=response_timeout,
        requirements=not no_requirements,
    )
    written = export_command(
        format=format, model=use_model(model).ref, out=str(out) if out else None, lora=lora, refiner=refiner, name=name, dtype=dtype,
        single_file=single_file, lora_format=lora_format, fuse_lora=fuse_lora, lora_scale=lora_scale,
        force=force, archive_format=archive_format, check=check, max_steps=max_steps, max_size=max_size,
        max_batch=max_batch, settings=settings, split=split,
    )
    for path in written or []:
        typer.echo(f"wrote {path}")


@app.command()
def ui(
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="A model to generate with; repeat for side-by-side columns."),
    run: Optional[List[str]] = typer.Option(None, "--run", help="A training run folder, or a folder of runs: the Runs tab, and Generate compares its checkpoints."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="SDXL refiner the page can switch on."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="Show each image's CLIP score (as sdkit eval)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="Port."),
    share: str = typer.Option("no", "--share", help="yes: a public gradio.live link (needs the internet)."),
    max_loaded: Optional[int] = typer.Option(None, "--max-loaded", help="Models kept loaded (default: all of --model)."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="GiB of weights kept loaded; least recently used leave first."),
    concurrency: int = typer.Option(1, "--concurrency", help="Generations running at once; other users wait in the queue."),
    out: Path = typer.Option(Path("outputs/ui"), "--out", help="Folder for the generated PNGs."),
    device: Optional[str] = typer.Option(None, "--device", help="Force a device (cuda, cpu, mps)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Force a dtype (fp16, bf16, fp32)."),
):
    """A web page: generate with several models side by side, and watch training runs (needs the ui extra)."""
    from sdkit.ui.app import ui_command

    if not model and not run:  # the model just trained, as generate/eval/export choose it
        from sdkit.inference.default_model import use_model

        model = [use_model(None).ref]
    ui_command(models=model or [], runs=run or [], refiner=refiner, clip_model=clip_model, host=host, port=port,
               share=share, max_loaded=max_loaded, max_memory=max_memory, concurrency=concurrency, out=out,
               device=device, dtype=dtype)


@app.command()
def serve(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    lora: Optional[str] = typer.Option(None, "--lora", help="LoRA file, folder or run folder (fused at load)."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="SDXL refiner (hub id or folder)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the URLs (default: from the model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8080, "--port", help="HTTP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads the model)."),
    max_steps: int = typer.Option(50, "--max-steps", help="Cap on steps per request."),
    max_size: int = typer.Option(1024, "--max-size", help="Cap on width/height per request."),
    max_batch: int = typer.Option(4, "--max-batch", help="Cap on images per request."),
    image_format: str = typer.Option("png", "--image-format", help="Default answer: png, uint8 or uint8-hwc."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser before the warm-up request."),
    split: bool = typer.Option(False, "--split", help="Also serve NAME-text-encoder, NAME-denoiser and NAME-decoder."),
):
    """Serve a model over KServe's v1/v2 REST protocol (KServe's own Python model server, no Kubernetes)."""
    from sdkit.export.serve_settings import ServeSettings
    from sdkit.inference.default_model import use_model
    from sdkit.serve.server import serve_command

    serve_command(use_model(model).ref, lora=lora, refiner=refiner, name=name, host=host, port=port, workers=workers,
                  max_steps=max_steps, max_size=max_size, max_batch=max_batch, compile=compile,
                  settings=ServeSettings(image_format=image_format), split=split)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[List[str]] = OverridesArg,
    gpu_memory: float = typer.Option(24.0, "--gpu-memory", help="GPU memory in GiB to check against."),
):
    """Estimate the peak GPU memory of a training step, without a GPU or the weights."""
    from sdkit.plan.report import plan_command

    plan_command(str(recipe), overrides or [], gpu_memory=gpu_memory)


@app.command()
def bench(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[List[str]] = OverridesArg,
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed warm-up steps."),
    compare: Optional[List[str]] = typer.Option(
        None, "--compare", help="KEY=VALUE for a second variant (repeat: all together form one variant)."
    ),
    baseline: bool = typer.Option(
        False, "--baseline", help="Also time a plain hand-written diffusers loop on the same model and data (SD 1.x/2.x)."
    ),
    rounds: int = typer.Option(
        1, "--rounds", min=1, help="Time the variants in R alternating blocks (shared machines; all stay in memory)."
    ),
    clock: str = typer.Option("wall", "--clock", help="wall, or cpu: this process's CPU time (steady on a shared CPU)."),
):
    """Time training steps of a recipe; --compare runs a variant and prints the ratio."""
    from sdkit.bench.run import bench_command

    bench_command(str(recipe), overrides or [], steps=steps, warmup=warmup, compare=compare or [],
                  baseline=baseline, rounds=rounds, clock=clock)


data_app = typer.Typer(help="Check a recipe's training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[List[str]] = OverridesArg,
):
    """Images, captions, unreadable files, sizes, buckets and samples per epoch of each dataset."""
    from sdkit.recipe import load_recipe
    from sdkit.training.datacheck import check_data

    typer.echo(check_data(load_recipe(recipe, overrides or [])))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run folder (data, base model, result, eval)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (default: the recipe's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the base model, training and judged images."),
    images_per_digit: int = typer.Option(10, "--images-per-digit", min=1, help="Judged images per digit."),
    vae_steps: Optional[int] = typer.Option(None, "--vae-steps", min=1, help="Training steps of the digit VAE (default 200; a smoke test: 2)."),
):
    """Offline, on a CPU, in minutes: train a miniature SD model on handwritten digits, export and judge it."""
    from sdkit.quickstart.run import quickstart_command

    quickstart_command(out=str(out), steps=steps, seed=seed, images_per_digit=images_per_digit,
                       **({"vae_steps": vae_steps} if vae_steps else {}))


@app.command()
def tiny(
    out: Path = typer.Argument(..., help="Folder to write the model into."),
    family: str = typer.Option("sd", "--family", help="sd, sd2, sd-struct, sdxl, sdxl-refiner, sd3 or clip."),
    seed: int = typer.Option(0, "--seed"),
):
    """Build a tiny random-weight model, for trying recipes offline and in tests."""
    from sdkit.quickstart.tiny import build_by_name

    typer.echo(f"wrote {build_by_name(family, out, seed=seed)}")


def main() -> None:
    try:
        app()
    except UserError as e:
        for line in one_line(str(e)).splitlines()[:50]:  # a recipe's problems: one line each
            typer.echo(f"error: {shorten(line, 1000)}", err=True)  # never megabytes of someone's input
        sys.exit(e.exit_code)


def one_line(message: str) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped in the worker's traceback."""
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        return last.split("UserError: ", 1)[-1]
    return message


if __name__ == "__main__":
    main()
