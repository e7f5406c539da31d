"""What a run shows a person: the progress bar (loss, lr, it/s, ETA) and flattened hyper-parameters."""

from __future__ import annotations


def progress_bar(console, enabled: bool):
    """A rich progress bar with fields `loss` and `lr`; disabled on every rank but the main one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        SpeedColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
        console=console,
        disable=not enabled,
    )


def flat(d: dict, prefix: str = "") -> dict:
    """Nested recipe values as dotted scalars (what TensorBoard's hparams take)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
