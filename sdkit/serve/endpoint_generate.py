"""`sdkit generate --endpoint`: images through the parts of a split model (`sdkit serve --split`), any part
remote and the others in this process; PNGs written as `sdkit generate` writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sdkit.errors import UserError


def endpoint_generate_command(*, prompts: list, endpoints: list, model_ref, negative_prompt: Optional[str],
                              steps: int, guidance: float, seed: int, width: Optional[int], height: Optional[int],
                              num_images: int, out: Path, local_only: Optional[dict] = None) -> list:
    """`model_ref()` gives the model for the parts without a URL; it is asked only when there is one.
    `local_only`: flags of in-process generation that were set (an error: the served model decides those)."""
    from sdkit.inference.generate import save_png
    from sdkit.serve.client import SPLIT_PARTS, ServerError, SplitChain, split_endpoints

    for flag, value in (local_only or {}).items():
        if value:
            raise UserError(f"{flag}: not with --endpoint (the served parts load the model as `sdkit serve` set it)")
    try:
        urls = split_endpoints(endpoints)
    except ValueError as e:
        raise UserError(f"--endpoint: {e}") from None
    local = [part for part in SPLIT_PARTS if part not in urls]
    chain = SplitChain(urls, model_ref() if local else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt in prompts:
        try:
            images, seeds, _ = chain.run(prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                         seed=seed, width=width, height=height, num_images=num_images)
        except ServerError as e:
            raise UserError(f"--endpoint: {e}") from None
        except OSError as e:  # refused, unreachable, timed out
            raise UserError(f"--endpoint: {type(e).__name__}: {e}") from None
        for image, image_seed in zip(images, seeds):
            text = {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": str(image_seed),
                    "steps": str(steps), "guidance": str(guidance), "width": str(image.width),
                    "height": str(image.height), "endpoints": ", ".join(f"{p}={u}" for p, u in urls.items()),
                    "local_parts": ", ".join(local)}
            path = save_png(image, out, prompt, image_seed, text)
            written.append(path)
            print(f"wrote {path}", flush=True)
    return written
