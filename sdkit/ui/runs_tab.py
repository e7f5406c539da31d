"""The Runs tab: a training run's curves, sample images, recipe and figures, refreshed while it trains."""

from __future__ import annotations

from sdkit.ui import runs

REFRESH_SECONDS = 5.0


def build_runs_tab(run_roots: list[str]):
    """The tab's components and events, inside the current gr.Blocks / gr.Tab; returns the run
    picker and the outputs, for the page to fill them when it opens."""
    import gradio as gr

    found = runs.find_runs(run_roots)
    with gr.Row():
        run = gr.Dropdown(found, value=found[-1] if found else None, allow_custom_value=True, scale=4,
                          label="Run folder", elem_id="run")
        refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
        live = gr.Checkbox(True, label=f"Refresh every {REFRESH_SECONDS:g} s", scale=1)
    status = gr.Markdown("", elem_id="run-status")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="value", title="loss", y_title="loss", height=260, elem_id="loss-plot")
        lr = gr.LinePlot(x="step", y="value", title="learning rate", y_title="lr", height=260, elem_id="lr-plot")
    samples = gr.Gallery(label="Validation samples (row: step, column: prompt)", columns=1, height="auto",
                         elem_id="samples")
    with gr.Row():
        recipe = gr.Code(label="Resolved recipe", language="yaml", max_lines=30, elem_id="recipe")
        figures = gr.JSON(label="plan / bench figures", visible=False, elem_id="figures")

    outputs = [status, loss, lr, samples, recipe, figures]

    def show(run_dir):
        return show_run(run_dir)

    def rescan(current):
        choices = runs.find_runs(run_roots)
        return gr.update(choices=choices, value=current or (choices[-1] if choices else None))

    run.change(show, run, outputs)
    refresh.click(rescan, run, run).then(show, run, outputs)
    timer = gr.Timer(REFRESH_SECONDS)
    timer.tick(show, run, outputs, show_progress="hidden")
    live.change(lambda on: gr.Timer(active=on), live, timer)
    return run, outputs


def show_run(run_dir):
    """The Runs tab's outputs for one run folder (all empty, with a line saying why, when it is not one)."""
    import gradio as gr

    from sdkit.inference.loading import is_run_dir

    if not run_dir:
        return ["pick a run folder (`sdkit ui --run runs/NAME` or `--run runs`)", None, None, [], "",
                gr.update(visible=False)]
    if not is_run_dir(run_dir):
        return [f"'{run_dir}' is not a training run folder (no recipe.yaml)", None, None, [], "",
                gr.update(visible=False)]
    curves = runs.read_curves(run_dir)
    items, width = runs.sample_grid(run_dir)
    figures = runs.read_figures(run_dir)
    done = (curves[curves.curve == "loss"].step.max() if len(curves) else 0) or 0
    line = f"{run_dir}: {int(done)} steps logged, {len(items)} sample images"
    return [
        line,
        curves[curves.curve == "loss"],
        curves[curves.curve == "lr"],
        gr.Gallery(value=items, columns=width),
        runs.read_recipe_text(run_dir),
        gr.update(value=figures, visible=figures is not None),
    ]
