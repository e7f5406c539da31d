"""Where a run's numbers and validation images go: TensorBoard (OUTPUT_DIR/logs) and, when asked,
Weights & Biases (OUTPUT_DIR/wandb), through accelerate's trackers.

Scalars go through `accelerator.log`; images are written here, because accelerate's `log_images`
gives neither tracker a caption: TensorBoard gets one image per prompt under a tag that holds the
prompt, wandb one list of `wandb.Image`s captioned with their prompts. wandb is imported only when
`logging.wandb` is on, and only by accelerate's tracker and by `log_images` below.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdkit.errors import UserError, shorten

EXTRA = "wandb"  # the pyproject extra that installs wandb


def tracker_names(logging_cfg) -> list[str]:
    """The accelerate trackers the recipe asks for (`log_with`)."""
    names = ["tensorboard"] if logging_cfg.tensorboard else []
    if logging_cfg.wandb:
        try:
            import wandb  # noqa: F401  (asked for: accelerate's tracker imports it next anyway)
        except ImportError:
            raise UserError(f"logging.wandb: needs the wandb package: pip install 'sdkit-recipes[{EXTRA}]' "
                            f"(or pip install wandb)") from None
        names.append("wandb")
    return names


def start(accelerator, recipe, run_dir: Path, config: dict) -> None:
    """Open the trackers (main process only, as accelerate does) with the recipe as their config."""
    cfg = recipe.logging
    if not tracker_names(cfg):
        return
    init_kwargs = {}
    if cfg.wandb:
        # dir: the run's files stay in the run folder; WANDB_MODE=offline then needs no network.
        init_kwargs["wandb"] = {"name": cfg.wandb_run_name or run_dir.resolve().name, "entity": cfg.wandb_entity,
                                "dir": str(run_dir)}
    project = cfg.wandb_project if cfg.wandb else "sdkit"
    accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)


def log_images(accelerator, recipe, step: int, images: list[tuple[str, object]]) -> None:
    """Validation images as image logs captioned with their prompt: `images` is (prompt, PIL image)."""
    if not images or not accelerator.is_main_process:
        return
    import numpy as np

    cfg = recipe.logging
    if cfg.tensorboard:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for i, (prompt, image) in enumerate(images):
            writer.add_image(f"validation/{i:02d} {_tag_text(prompt)}", np.asarray(image.convert("RGB")), step,
                             dataformats="HWC")
        writer.flush()
    if cfg.wandb:
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log({"validation": [wandb.Image(image, caption=prompt) for prompt, image in images]}, step=step)


def _tag_text(prompt: str) -> str:
    """The prompt as part of a TensorBoard tag (its UI groups tags by '/'; long ones are cut)."""
    text = re.sub(r"\s+", " ", prompt.replace("/", " ")).strip()
    return shorten(text, 80)
