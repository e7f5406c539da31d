"""`sdkit serve --split`: the text encoder, denoiser and decoder as models of their own, chained by the
client (every part remote, or some in this process) into the whole pipeline's images, for SD 1.x, SDXL and SD 3."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("kserve")
from serve_helpers import post, sdkit_serve  # noqa: E402

from sdkit.serve.client import ServerError, SplitChain, generate, generate_split, split_endpoints  # noqa: E402

pytestmark = pytest.mark.slow  # servers start in ~10 s on an idle machine
PARTS = ("text-encoder", "denoiser", "decoder")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def assert_same_images(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.size == b.size and np.abs(pixels(a) - pixels(b)).max() <= 1  # at most one grey level apart


def test_chain_equals_the_whole_model_sd(server, tiny_sd, tmp_path):
    url, log = server
    model_url = f"{url}/v2/models/tiny"
    settings = dict(seed=11, steps=2, num_images=2)
    whole, seeds = generate(url, "tiny", "a red circle", negative_prompt="blurry", **settings)
    remote, remote_seeds = generate_split(split_endpoints([model_url]), "a red circle", negative_prompt="blurry",
                                          **settings)
    assert seeds == remote_seeds == [11, 12]
    assert_same_images(remote, whole)
    # Only the denoiser remote (the text encoder and decoder in this process), and its part URL named itself.
    mixed, _ = generate_split({"denoiser": f"{url}/v2/models/tiny-denoiser"}, "a red circle", model=str(tiny_sd),
                              negative_prompt="blurry", **settings)
    assert_same_images(mixed, whole)
    parts = [line for line in log.read_text().splitlines() if "sdkit serve: tiny-" in line]
    for part in PARTS:  # each part's time, per request
        assert any(f"tiny-{part} request: {part} " in line and "whole" in line for line in parts), parts

    # sdkit generate --endpoint: one URL for every part; the same pixels, written as generate writes them.
    from typer.testing import CliRunner

    from sdkit.cli import app

    result = CliRunner().invoke(app, ["generate", "a red circle", "--negative-prompt", "blurry", "--seed", "11",
                                      "--steps", "2", "--guidance", "7.5", "--endpoint", model_url, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [written] = sorted(tmp_path.glob("*.png"))
    from PIL import Image

    [whole_at_guidance], _ = generate(url, "tiny", "a red circle", negative_prompt="blurry", seed=11, steps=2, guidance=7.5)
    assert_same_images([Image.open(written)], [whole_at_guidance])


def test_parts_answer_bad_requests_with_the_whole_models_400s(server):
    url, _ = server
    infer = f"{url}/v2/models/tiny-%s/infer"
    chain = SplitChain(split_endpoints([f"{url}/v2/models/tiny"]))
    embeddings = chain.call("text-encoder", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                                                          "data": ["a"]}]})["outputs"]
    assert [(e["name"], e["datatype"], e["shape"]) for e in embeddings] == [
        ("prompt_embeds", "FP32", [1, 77, 32]), ("negative_prompt_embeds", "FP32", [1, 77, 32])]
    short = {**embeddings[0], "shape": [1, 76, 32], "data": embeddings[0]["data"][:76 * 32]}
    cases = [
        ("text-encoder", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [" "]}]},
         "'prompt' is empty"),
        ("denoiser", {"inputs": embeddings, "parameters": {"steps": 9}},
         "'steps' must be between 1 and 3 (this model's limit), got 9"),
        ("denoiser", {"inputs": embeddings, "parameters": {"width": 96}}, "'width' must be a multiple of 8 between 8 and 64"),
        ("denoiser", {"inputs": embeddings, "parameters": {"image_format": "png"}}, "parameter 'image_format' is not one"),
        ("denoiser", {"inputs": [short, embeddings[1]]}, "input 'prompt_embeds' has shape [1, 76, 32]; this model takes [N, 77, 32]"),
        ("denoiser", {"inputs": embeddings[:1]}, "input 'negative_prompt_embeds' is missing"),
        ("denoiser", {"inputs": [{**embeddings[0], "data": embeddings[0]["data"][:5]}, embeddings[1]]}, "does not fit shape"),
        ("denoiser", {"inputs": [*embeddings, {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         "unknown input \"x\""),
        ("decoder", {"inputs": [{"name": "latents", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0.0] * 48}]},
         "this model takes [N, 4, H/2, W/2]"),  # the tiny VAE halves each side
        ("decoder", {"inputs": [{"name": "latents", "datatype": "FP32", "shape": [1, 4, 40, 40], "data": [0.0] * 6400}]},
         "decode to 80x80 pixels: 'width' must be a multiple of 8 between 8 and 64 (this model's limit), got 80"),
    ]
    for part, body, message in cases:
        status, answer = post(infer % part, body)
        assert status == 400 and message in answer["error"], (part, message, answer)
    status, answer = post(f"{url}/v1/models/tiny-denoiser:predict", {"instances": ["a"]})
    assert status == 400 and "v2 protocol only" in answer["error"]
    with pytest.raises(ServerError, match="'steps' must be between 1 and 3"):
        chain.run("a", steps=9)


def test_bench_reports_each_part_and_the_overhead(server, tiny_sd):
    from sdkit.serve.bench import bench_split, format_report

    url, _ = server
    rows = bench_split(split_endpoints([f"{url}/v2/models/tiny"]), "a red circle", model=str(tiny_sd),
                       whole_url=(url, "tiny"), n=2, concurrency=2, steps=1, guidance=7.5)
    for row in (*PARTS, "chain", "whole model"):
        assert 0 < rows[row]["sequential"]["p50"] <= rows[row]["sequential"]["p95"]
        assert rows[row]["concurrency 2"]["p50"] > 0
    assert rows["in-process"]["sequential"]["p50"] > 0 and set(rows["overhead"]) == {"chain", "whole model"}
    report = format_report(rows, n=2, concurrency=2, settings={"steps": 1})
    assert "| denoiser" in report and "overhead of the chain against in-process generation" in report


@pytest.fixture(scope="module")
def xl_and_sd3(tiny_sdxl, tiny_sdxl_refiner, tiny_sd3, tmp_path_factory):
    """SDXL (its whole model with the refiner) and SD 3, split, on two servers started side by side."""
    with sdkit_serve({"xl": tiny_sdxl}, tmp_path_factory.mktemp("xl"), "--max-steps", "3", "--max-size", "64",
                     "--split", "--refiner", str(tiny_sdxl_refiner)) as xl, \
            sdkit_serve({"sd3": tiny_sd3}, tmp_path_factory.mktemp("sd3"), "--max-steps", "3", "--max-size", "64",
                        "--split") as sd3:
        yield {**xl, **sd3}


def test_chain_equals_the_whole_model_sdxl_and_sd3(xl_and_sd3, tiny_sdxl):
    from sdkit.export.handler import DiffusionService
    from sdkit.export.handler_requests import Job
    from sdkit.serve.server import pipeline_config

    settings = dict(seed=5, steps=2, guidance=5.0)
    url, _ = xl_and_sd3["sd3"]
    whole, _ = generate(url, "sd3", "a red circle", **settings)
    chained, _ = generate_split(split_endpoints([f"{url}/v2/models/sd3"]), "a red circle", **settings)
    assert_same_images(chained, whole)

    # The SDXL refiner runs on the whole model only; the parts chain the base model, as the base alone draws it.
    url, _ = xl_and_sd3["xl"]
    refined, _ = generate(url, "xl", "a red circle", **settings)
    chained, _ = generate_split(split_endpoints([f"{url}/v2/models/xl"]), "a red circle", **settings)
    base = DiffusionService()
    base.load("/", {**pipeline_config(str(tiny_sdxl)), "warmup": False})
    expected, _ = base.generate(Job(["a red circle"], None, 2, 5.0, 5, base.defaults.width, base.defaults.height, 1))
    assert_same_images(chained, expected)
    assert refined[0].size == chained[0].size
    status, answer = post(f"{url}/v2/models/xl-text-encoder/infer",
                          {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]})
    assert status == 200 and [o["shape"] for o in answer["outputs"]][2:] == [[1, 32], [1, 32]]  # pooled
