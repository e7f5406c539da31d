"""`sdkit ui`: the page (Gradio Blocks) and its server.

Offline by construction: Gradio's analytics and version check are off (GRADIO_ANALYTICS_ENABLED,
set before gradio is imported), the default theme uses the fonts Gradio ships, server-side rendering
(which needs Node) and share links (which download a tunnel client) are off unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError

SHARE_CHOICES = ("no", "yes")


def quiet_gradio() -> None:
    """Before `import gradio`: no analytics, no version check, no telemetry from the hub client."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_app(models: list[str], run_roots: list[str], *, cache, out: Path, refiner: Optional[str] = None,
              scorer_factory=None):
    """The gr.Blocks page: Generate (the models side by side, or a run's checkpoints) and Runs."""
    quiet_gradio()
    import gradio as gr

    from sdkit.inference.evaluate import model_labels
    from sdkit.ui.generate_tab import GenerateContext, build_generate_tab
    from sdkit.ui.generation import StopFlags
    from sdkit.ui.runs_tab import build_runs_tab, show_run

    ctx = GenerateContext(models=models, labels=model_labels(models), cache=cache, out=out, refiner=refiner,
                          scorer_factory=scorer_factory, stops=StopFlags(), run_roots=list(run_roots))
    with gr.Blocks(title="sdkit", analytics_enabled=False) as page:
        with gr.Tab("Generate", id="generate-tab", visible=bool(models or run_roots)):
            build_generate_tab(ctx)
        with gr.Tab("Runs", id="runs-tab"):
            run, outputs = build_runs_tab(run_roots)
        page.load(show_run, run, outputs)
    return page


def ui_command(*, models: list[str], runs: list[str], refiner: Optional[str] = None, clip_model: Optional[str] = None,
               host: str = "127.0.0.1", port: int = 7860, share: str = "no", max_loaded: Optional[int] = None,
               max_memory: Optional[float] = None, concurrency: int = 1, out: Path = Path("outputs/ui"),
               device: Optional[str] = None, dtype: Optional[str] = None) -> None:
    """Check what was typed, build the page and serve it until interrupted."""
    if share not in SHARE_CHOICES:
        raise UserError(f"--share must be one of {', '.join(SHARE_CHOICES)}, got '{share}'")
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    if max_memory is not None and max_memory <= 0:
        raise UserError(f"--max-memory must be a positive number of GiB, got {max_memory:g}")
    if not models and not runs:
        raise UserError("--model: give at least one model to generate with (or --run to watch a training run)")
    _check_models(models, refiner)
    from sdkit.ui.models import ModelCache
    from sdkit.units import GIB

    cache = ModelCache(max_loaded=max_loaded or max(len(models), 1), max_bytes=None if max_memory is None else int(max_memory * GIB),
                       device=device, dtype=dtype)
    scorer_factory = None
    if clip_model:
        from sdkit.inference.evaluate import ClipScorer
        from sdkit.inference.sampling import pick_device

        scorer_factory = lambda: ClipScorer(clip_model, pick_device(device))  # noqa: E731
        scorer_factory()  # a bad --clip-model fails now, in one line, not at the first image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = build_app(models, runs, cache=cache, out=out, refiner=refiner, scorer_factory=scorer_factory)
    page.queue(default_concurrency_limit=concurrency)
    allowed = [str(out.resolve()), *[str(Path(r).expanduser().resolve()) for r in runs]]
    print(f"sdkit ui: http://{host}:{port} (models: {', '.join(models) or 'none'}; runs: {', '.join(runs) or 'none'})",
          flush=True)
    page.launch(server_name=host, server_port=port, share=share == "yes", allowed_paths=allowed,
                ssr_mode=False, mcp_server=False, pwa=False, show_error=True, quiet=True, footer_links=[])


def _check_models(models: list[str], refiner: Optional[str]) -> None:
    """Every model folder exists and is a model, before the page starts (hub ids load later)."""
    from sdkit.families import detect_family
    from sdkit.inference.loading import resolve_model

    for ref in models:
        resolved = resolve_model(ref, "--model")
        if resolved.is_local:
            detect_family(resolved.base, key="--model")
    if refiner:
        resolve_model(refiner, "--refiner")

