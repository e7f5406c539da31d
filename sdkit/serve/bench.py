"""Latency of a split model (`sdkit serve --split`) per part and whole, and its overhead against in-process
generation (`sdkit generate`'s load_pipeline + make_images) with the same settings, in one command:

    python -m sdkit.serve.bench --endpoint http://127.0.0.1:8080/v2/models/tiny --model TINY_FOLDER \\
        -n 10 -k 4 --steps 25 --width 64 --height 64

N sequential rounds (a chain, the whole model and in-process generation in turn), then N chains and
N whole-model requests from K threads; p50/p95 seconds per part (as the client sees it: HTTP and
JSON included), for the chain, for the whole model NAME in one request (when one URL serves every part) and
for in-process generation (when --model is given). The overhead compares the sequential p50s.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from sdkit.serve.client import SPLIT_PARTS, SplitChain, infer, latency_summary, split_endpoints, timed


def bench_split(endpoints: dict, prompt: str, *, model: Optional[str] = None, whole_url: Optional[str] = None,
                n: int = 10, concurrency: int = 1, **settings) -> dict:
    """{row: {"sequential": {p50, p95}, "concurrency K": {p50, p95}}} for each part, "chain", "whole model"
    (with `whole_url`, the server's base URL + model name as `(url, name)`) and "in-process" (with `model`);
    plus "overhead": the chain's and the whole model's sequential p50 over the in-process one, minus 1.

    The sequential requests are interleaved, one of each way per round (in turn first), so that a machine
    slowing down or speeding up during the bench weighs on every way alike: on a shared machine the
    speed drifts by tens of percent over minutes, more than the overhead measured."""
    chain = SplitChain(endpoints, model)

    def one_chain(i: int) -> dict:
        started = time.perf_counter()
        _, _, seconds = chain.run(prompt, **{**settings, "seed": i})
        return {**seconds, "chain": time.perf_counter() - started}

    ways = {"chain": one_chain}
    if whole_url:
        url, name = whole_url
        request = lambda i: infer(url, name, prompt, **{**settings, "seed": i}, image_format="uint8")  # noqa: E731
        ways["whole model"] = lambda i: {"whole model": timed(request, i)}
    if model:
        ways["in-process"] = in_process_runner(model, prompt, **settings)
    for way in ways.values():
        way(0)  # warm-up: first-request costs are not latency
    sequential: dict = {label: [] for label in ways}
    labels = list(ways)
    for i in range(n):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            sequential[label].append(ways[label](i))

    rows: dict = {}
    label = f"concurrency {concurrency}"
    for way, samples in sequential.items():
        for row in samples[0]:
            rows.setdefault(row, {})["sequential"] = latency_summary([s[row] for s in samples])
        if way == "in-process":  # one pipeline in this process: concurrency is the server's business
            continue
        with ThreadPoolExecutor(concurrency) as pool:
            concurrent = list(pool.map(ways[way], range(n)))
        for row in concurrent[0]:
            rows[row][label] = latency_summary([s[row] for s in concurrent])
    if model:
        base = rows["in-process"]["sequential"]["p50"]
        rows["overhead"] = {row: rows[row]["sequential"]["p50"] / base - 1 for row in ("chain", "whole model")
                            if row in rows}
    return rows


def in_process_runner(model: str, prompt: str, *, steps: int, guidance: float, width: Optional[int] = None,
                      height: Optional[int] = None, num_images: int = 1, negative_prompt: Optional[str] = None):
    """i -> {"in-process": seconds} for one `sdkit generate` image (its own loading and sampling code)."""
    import torch

    from sdkit.inference.sampling import load_pipeline, make_images

    pipe, _, info = load_pipeline(model)
    width, height = info.image_size(width, height)

    def one(i: int) -> None:
        with torch.inference_mode():
            make_images(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=i,
                        num_images=num_images, width=width, height=height)

    return lambda i: {"in-process": timed(one, i)}


def format_report(rows: dict, *, n: int, concurrency: int, settings: dict) -> str:
    label = f"concurrency {concurrency}"
    lines = [f"{n} sequential rounds (one request each way, interleaved), then {n} from {concurrency} threads; "
             + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None),
             f"| {'':<14} | sequential p50 | sequential p95 | {label} p50 | {label} p95 |",
             "|---|---|---|---|---|"]
    for row in (*SPLIT_PARTS, "chain", "whole model", "in-process"):
        if row in rows:
            cells = [rows[row].get(k) for k in ("sequential", label)]
            values = [f"{c[q]:.3f} s" if c else "-" for c in cells for q in ("p50", "p95")]
            lines.append(f"| {row:<14} | " + " | ".join(values) + " |")
    for row, overhead in rows.get("overhead", {}).items():
        lines.append(f"overhead of the {row} against in-process generation at concurrency 1 (p50): {overhead:+.1%}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdkit.serve.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", action="append", required=True,
                        help="http://HOST:PORT/v2/models/NAME for every part, or PART=URL (repeat)")
    parser.add_argument("--model", help="the model folder: parts without a URL run here, and the in-process baseline")
    parser.add_argument("--prompt", default="a red circle on a blue square")
    parser.add_argument("-n", type=int, default=10, help="requests per phase")
    parser.add_argument("-k", "--concurrency", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    args = parser.parse_args(argv)
    try:
        endpoints = split_endpoints(args.endpoint)
    except ValueError as e:
        parser.error(f"--endpoint: {e}")
    whole = None
    if len(args.endpoint) == 1 and "=" not in args.endpoint[0].split("://")[0]:
        base, _, name = args.endpoint[0].rstrip("/").partition("/v2/models/")
        whole = (base, name)
    settings = {"steps": args.steps, "guidance": args.guidance, "width": args.width, "height": args.height}
    rows = bench_split(endpoints, args.prompt, model=args.model, whole_url=whole, n=args.n,
                       concurrency=args.concurrency, **settings)
    print(format_report(rows, n=args.n, concurrency=args.concurrency, settings=settings))


if __name__ == "__main__":
    main()
