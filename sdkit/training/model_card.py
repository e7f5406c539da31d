"""README.md model card for a training run (the Hugging Face hub reads its YAML header)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sdkit.recipe import Recipe


def write_model_card(recipe: Recipe, run_dir: Path, *, family: str, steps: int, final_loss: Optional[float],
                     lr: Optional[float] = None, adapter=None, precision: Optional[str] = None) -> Path:
    """`adapter` (sdkit.training.adapters) says what the method is and how its result is used;
    `precision` is the mixed precision the run really used (fp16 falls back to fp32 without CUDA)."""
    if adapter is None:
        from sdkit.training.adapters import make_adapter

        adapter = make_adapter(recipe.method)
    prompt = (recipe.validation.prompts or [recipe.data.instance_prompt or "a photo"])[0]
    method = recipe.method.type
    lines = [
        "---",
        f"base_model: {recipe.model.pretrained}",
        "library_name: diffusers",
        "tags: [sdkit, text-to-image, stable-diffusion" + (f", {method}" if method != "full" else "") + "]",
        "---",
        "",
        f"# {Path(run_dir).name}",
        "",
        f"{adapter.title} of `{recipe.model.pretrained}` ({family}) "
        f"trained with sdkit for {steps} steps on `{recipe.data.dataset_names()}` at {recipe.data.resolution} px.",
        "",
        f"- learning rate {lr or recipe.optim.lr} ({recipe.optim.name}, {recipe.optim.lr_scheduler})",
        f"- batch size {recipe.train.batch_size} x {recipe.train.gradient_accumulation} accumulation",
        f"- mixed precision {precision or recipe.train.mixed_precision}",
    ]
    lines += adapter.card_lines()
    if final_loss is not None:
        lines.append(f"- final training loss {final_loss:.4f}")
    lines += ["", "## Use", "", adapter.usage.format(run=run_dir, base=recipe.model.pretrained, prompt=prompt), "",
              "The full recipe is in `recipe.yaml`; rerun it with `sdkit train recipe.yaml`.", ""]
    path = Path(run_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
