"""The Generate tab: the settings of `sdkit generate`, one column of images per model.

Every column uses the same seed (unless "same seed for all" is off), so the columns differ
only by the model: the base next to its fine-tune, several LoRA runs side by side, or (with
"Compare checkpoints of a run") a run's checkpoints and its final result. A checkpoint's column
loads `RUN/checkpoints/checkpoint-N` as `sdkit generate --model` does (the model it stands for,
built once by sdkit.training.checkpoint_model).
"""

# No `from __future__ import annotations`: Gradio finds the `gr.Request` parameter of a handler
# by its annotation, which must be the class, not a string.
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError, first_line
from sdkit.ui.generation import Settings, StopFlags, Stopped, check_settings, command, generate_column

MODEL_SCHEDULER = "the model's own"
MODELS_CHOICE = "the --model columns"
MAX_SEED = 2**32 - 1


@dataclass
class GenerateContext:
    """What the handlers share: the page's models and the things that outlive one click."""

    models: list[str]
    labels: list[str]
    cache: object  # sdkit.ui.models.ModelCache
    out: Path
    refiner: Optional[str] = None
    scorer_factory: Optional[object] = None  # () -> a scorer with score(images, prompt), built on first use
    stops: StopFlags = None
    run_roots: list[str] = field(default_factory=list)  # runs whose checkpoints can be compared
    _scorer: Optional[object] = None

    @property
    def slots(self) -> int:
        """Columns on the page: the models', or a run's checkpoints when there are runs to compare."""
        from sdkit.ui.runs import MAX_RUN_COLUMNS

        return max(len(self.models), MAX_RUN_COLUMNS if self.run_roots else 0, 1)

    def columns(self, compare: Optional[str]) -> tuple[list[tuple[str, str]], str]:
        """(model, label) per column and a line about them: the --model columns, or the checkpoints
        (and final result) of the run picked in "Compare checkpoints of a run", read now."""
        from sdkit.ui.runs import find_runs, run_columns

        if compare and compare != MODELS_CHOICE and compare in find_runs(self.run_roots):
            return run_columns(compare, self.slots)
        return list(zip(self.models, self.labels)), ""

    def scorer(self):
        if self.scorer_factory is not None and self._scorer is None:
            self._scorer = self.scorer_factory()
        return self._scorer


def build_generate_tab(ctx: GenerateContext) -> None:
    """The tab's components and events, inside the current gr.Blocks / gr.Tab."""
    import gradio as gr

    from sdkit.inference.sampling import SCHEDULERS

    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", lines=2, scale=2, elem_id="negative-prompt")
    with gr.Row():
        steps = gr.Slider(1, 150, value=30, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance", elem_id="guidance")
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
        with gr.Column(min_width=120):
            dice = gr.Button("Random seed", elem_id="dice", size="sm")
            same_seed = gr.Checkbox(True, label="Same seed for all", elem_id="same-seed")
    with gr.Row():
        width = gr.Number(value=0, precision=0, label="Width (0: the model's own)", elem_id="width")
        height = gr.Number(value=0, precision=0, label="Height (0: the model's own)", elem_id="height")
        num_images = gr.Slider(1, 8, value=1, step=1, label="Images per model", elem_id="num-images")
        scheduler = gr.Dropdown([MODEL_SCHEDULER, *SCHEDULERS], value=MODEL_SCHEDULER, label="Scheduler")
        lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale (LoRA runs)")
        use_refiner = gr.Checkbox(False, label=f"SDXL refiner ({ctx.refiner})" if ctx.refiner else "SDXL refiner",
                                  visible=ctx.refiner is not None, elem_id="use-refiner")
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    compare = _compare_picker(ctx)
    status = gr.Markdown("", elem_id="status")
    outputs, slots, headers = [status], [], []
    start, _ = ctx.columns(compare.value)
    with gr.Row(equal_height=False):
        for i in range(ctx.slots):
            label = start[i][1] if i < len(start) else ""
            with gr.Column(min_width=200, visible=i < len(start)) as slot:
                headers.append(gr.Markdown(f"**{label}**", elem_id=f"label-{i}"))
                outputs.append(gr.Gallery(label=label, type="filepath", columns=2, height="auto",
                                          elem_id=f"gallery-{i}", buttons=["download", "fullscreen"]))
                outputs.append(gr.Markdown("", elem_id=f"note-{i}"))
                outputs.append(gr.Textbox(label="Same images from the command line", interactive=False,
                                          buttons=["copy"], elem_id=f"command-{i}"))
            slots.append(slot)
    layout = [*slots, *headers]

    def show_columns(compare):
        """The columns' layout for what is compared, their images cleared."""
        columns, line = ctx.columns(compare)
        return [line, *[part for i in range(ctx.slots) for part in _cleared(columns, i)], *_layout(ctx, columns)]

    compare.change(show_columns, compare, outputs + layout, queue=False)

    inputs = [prompt, negative, steps, guidance, seed, same_seed, width, height, num_images, scheduler, lora_scale,
              use_refiner, compare]

    def run(prompt, negative, steps, guidance, seed, same_seed, width, height, num_images, scheduler, lora_scale,
            use_refiner, compare, request: gr.Request, progress=gr.Progress()):
        columns, _ = ctx.columns(compare)  # read at each click: a run that trains gains checkpoints
        keep_layout = _layout(ctx, columns)
        for update in generate_all(ctx, prompt, negative, steps, guidance, seed, same_seed, width, height, num_images,
                                   scheduler, lora_scale, use_refiner, session=request.session_hash if request else "",
                                   progress=progress, columns=columns):
            yield [*update, *keep_layout]
            keep_layout = [gr.update()] * len(layout)

    go.click(run, inputs, outputs + layout, concurrency_id="generate")
    prompt.submit(run, inputs, outputs + layout, concurrency_id="generate")
    dice.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False)

    def request_stop(request: gr.Request):
        ctx.stops.stop(request.session_hash if request else "")

    stop.click(request_stop, None, None, queue=False)  # outside the queue: it must not wait behind the run


def _compare_picker(ctx: GenerateContext):
    """The "Compare checkpoints of a run" picker: the runs under --run (only those: a page user does not
    choose folders on the server), and the --model columns when there are models."""
    import gradio as gr

    from sdkit.ui.runs import find_runs

    found = find_runs(ctx.run_roots)
    choices = ([MODELS_CHOICE] if ctx.models else []) + found
    return gr.Dropdown(choices, value=choices[0] if ctx.models else (found[-1] if found else None),
                       label="Compare checkpoints of a run", visible=bool(ctx.run_roots), elem_id="compare")


def _layout(ctx: GenerateContext, columns: list) -> list:
    """Visibility of every column slot, then its header."""
    import gradio as gr

    shown = [gr.Column(visible=i < len(columns)) for i in range(ctx.slots)]
    return shown + [gr.Markdown(f"**{columns[i][1]}**" if i < len(columns) else "") for i in range(ctx.slots)]


def _cleared(columns: list, i: int) -> list:
    import gradio as gr

    return [gr.Gallery(value=[], label=columns[i][1] if i < len(columns) else ""), "", ""]


def generate_all(ctx: GenerateContext, prompt, negative, steps, guidance, seed, same_seed, width, height,
                 num_images, scheduler, lora_scale, use_refiner, *, session: str, progress,
                 columns: Optional[list] = None):
    """Yields the tab's outputs: the status line, then per column its images, note and command,
    after each column (they fill in as they finish). `columns`: (model, label) pairs, by default
    the page's models."""
    import gradio as gr

    columns = list(zip(ctx.models, ctx.labels)) if columns is None else columns
    n = len(columns)
    keep = [gr.update()] * (3 * ctx.slots)  # leave a column as it is
    try:
        s = Settings(
            prompt=prompt or "", negative_prompt=negative or None, steps=int(steps), guidance=float(guidance),
            seed=int(seed or 0), width=_size(width), height=_size(height), num_images=int(num_images),
            scheduler=None if scheduler == MODEL_SCHEDULER else scheduler, lora_scale=float(lora_scale),
            refiner=ctx.refiner if use_refiner else None,
        )
        check_settings(s)
    except UserError as e:
        yield ["error: " + str(e), *keep]
        return
    stop = ctx.stops.start(session)
    total = n * s.num_images * s.steps
    done = [0]

    def on_step():
        done[0] += 1
        progress((min(done[0], total), total), desc="denoising", unit="steps")

    progress((0, total), desc="loading", unit="steps")
    shown = list(keep)
    started = time.perf_counter()
    for j, (model, label) in enumerate(columns):
        column = replace(s, seed=s.seed if same_seed else s.seed + j * s.num_images)
        shown[3 * j: 3 * j + 3] = _column(ctx, model, column, j, on_step, stop)
        if stop.is_set():
            yield [f"stopped: {label} did not finish", *shown]
            return
        yield [f"{label} done", *shown]
    yield [f"done in {time.perf_counter() - started:.1f} s", *shown]


def _column(ctx: GenerateContext, model: str, s: Settings, j: int, on_step, stop) -> list:
    """[gallery items, note, command] of one model; a failure is the note, in one line."""
    from sdkit.families import family_class

    refiner = s.refiner
    try:
        if refiner:
            from sdkit.families import detect_family
            from sdkit.inference.loading import resolve_model

            if not family_class(detect_family(resolve_model(model).base, key="--model")).refiner_capable:
                refiner = None  # the refiner stays off for families that cannot take it
        s = replace(s, refiner=refiner)
        files, info = generate_column(ctx.cache, model, s, ctx.out / f"{j:02d}", on_step=on_step, stop=stop)
    except Stopped:
        return [[], "stopped", ""]
    except UserError as e:
        return [[], f"error: {first_line(e)}", ""]
    except Exception as e:  # a broken model must not take the page down: its column says why
        return [[], f"error: {type(e).__name__}: {first_line(e)}", ""]
    width, height = int(info.width if s.width is None else s.width), int(info.height if s.height is None else s.height)
    captions = [f"seed {s.seed + k}" for k in range(len(files))]
    scorer = ctx.scorer()
    if scorer is not None:
        from PIL import Image

        _, scores = scorer.score([Image.open(f) for f in files], s.prompt)
        captions = [f"{c} · CLIP {score:.2f}" for c, score in zip(captions, scores)]
    note = f"{info.family}, {info.scheduler}, {width}x{height}" + (" + refiner" if refiner else "")
    return [list(zip(map(str, files), captions)), note, command(model, s, width, height, bool(info.loras))]


def _size(value) -> Optional[int]:
    """0 or an empty box is the model's own size; anything else goes to check_size as typed."""
    return None if value in (None, "", 0) else int(value)
