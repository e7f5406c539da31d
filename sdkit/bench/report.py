"""`sdkit bench`'s table: variants as columns, phases as shares, and the ratios."""

from __future__ import annotations

from sdkit.training.step import PHASES
from sdkit.units import format_bytes


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    load = report["load_average"]
    loads = " -> ".join(f"{x[0]:.1f}" for x in (load["before"], load["after"]) if x) or "n/a"
    blocks = f" in {report['rounds']} alternating blocks" if report["rounds"] > 1 else ""
    console.print(
        f"{report['device']}; {report['warmup']} warm-up + {report['steps']} timed steps per variant"
        f"{blocks}; {report['clock']} clock; load average {loads}"
    )
    # Variants as columns: three variants and a dozen numbers fit an 80-column terminal.
    table = Table(title="sdkit bench: steady state")
    table.add_column("")
    for s in report["variants"]:
        table.add_column(s["label"], justify="right")
    other = "cpu" if report["clock"] == "wall" else "wall"
    on_cpu = report["device"].startswith("cpu")
    rows = [
        ("steps/s", lambda s: f"{s['steps_per_s']:.2f}"),
        *([(f"  by {other} clock", lambda s: f"{s[f'steps_per_s_{other}']:.2f}")] if on_cpu else []),
        ("samples/s", lambda s: f"{s['samples_per_s']:.1f}"),
        ("ms/step", lambda s: f"{1000 * s['seconds'] / s['steps']:.0f}"),
        *((f"  {k}", lambda s, k=k: f"{100 * s['shares'][k]:.0f}%") for k in (*PHASES, "other")),
        (f"peak, {report['memory']}", lambda s: format_bytes(s["peak_memory_bytes"])),
        ("set-up s", lambda s: f"{s['setup_s']:.1f}"),
        ("  cache build s", lambda s: f"{s['cache_build_s']:.1f}"),
        ("first step s", lambda s: f"{s['first_step_s']:.2f}"),
        ("  compile s", lambda s: f"{s['compile_s']:.1f}"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in report["variants"]))
    console.print(table)
    first = report["variants"][0]["label"]
    for label, r in report["ratios"].items():
        console.print(
            f"[bold]{first}[/] runs [bold]{r['steps_per_s']:.2f}x[/] the steps/s of [bold]{label}[/] "
            f"({r['steps_per_s_median']:.2f}x by median step"
            + (f", {r[f'steps_per_s_{other}']:.2f}x by {other} clock)" if on_cpu else ")")
        )
