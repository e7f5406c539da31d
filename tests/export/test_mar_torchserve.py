"""`sdkit export --format mar`: the archive, the config KServe reads, and a real TorchServe serving it.

The first half checks what the export writes (no server). The second half starts TorchServe
on 127.0.0.1 (skipped without `torchserve` or Java) and talks to it as a client would.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdkit.errors import UserError
from sdkit.export import handler as H
from sdkit.export.mar import export_mar, read_properties, response_bytes
from sdkit.inference.loading import resolve_model

from test_handler import HOSTILE, SEED_BODY, assert_v2_response, make_context, pngs, seed_client_image


def export(model, out, **kwargs):
    return export_mar(resolve_model(str(model)), out=out, **kwargs)


def snapshot(config: Path) -> dict:
    return json.loads(read_properties(config)["model_snapshot"])


def make_lora(model: Path, out_dir: Path) -> Path:
    """A small random LoRA on the UNet attention, saved as `sdkit train` saves one."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # seeded weights (B is zero at init): a LoRA with a clear, repeatable effect
        for name, param in sorted(pipe.unet.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"


def image_from(model_dir: Path, seed: int = 3) -> np.ndarray:
    service = H.DiffusionService()
    service.handle(None, make_context(model_dir))
    context = make_context(model_dir)
    [answer] = service.handle([{"body": {"prompt": "a red circle", "steps": 2, "seed": seed}}], context)
    return pngs(answer["images"])[0].astype(int)


# ------------------------------------------------------------------------ what the export writes


def test_archive_layout_and_kserve_config(tiny_sd, tmp_path):
    out = tmp_path / "bucket" / "sd"  # parents do not exist yet
    archive, config = export(tiny_sd, out, name="tiny", max_steps=20, max_size=512, max_batch=2)
    assert archive == out / "model-store" / "tiny.mar" and config == out / "config" / "config.properties"

    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        serve = json.loads(z.read("sdkit_serve.json"))
        handler_source = z.read("sdkit_handler.py").decode()
        requests_source = z.read("sdkit_requests.py").decode()
        answers_source = z.read("sdkit_answers.py").decode()
    assert manifest["model"] == {"modelName": "tiny", "handler": "sdkit_handler.py", "modelVersion": "1.0",
                                 "configFile": "model-config.yaml", "requirementsFile": "requirements.txt"}
    # The pipeline folder is in the archive as files: no model.zip inside the .mar, no pickles.
    assert {"pipeline/model_index.json", "pipeline/unet/diffusion_pytorch_model.safetensors",
            "pipeline/vae/diffusion_pytorch_model.safetensors", "pipeline/text_encoder/model.safetensors",
            "pipeline/tokenizer/tokenizer.json", "model-config.yaml"} <= names
    assert not [n for n in names if n.endswith((".zip", ".bin", ".pt", ".ckpt"))]
    assert serve["limits"] == {"max_steps": 20, "max_size": 512, "max_batch": 2} and serve["lora"] is None
    assert handler_source == Path(H.__file__).read_text()
    assert requests_source == Path(H.__file__).with_name("handler_requests.py").read_text()
    # Self-contained: it imports where neither sdkit nor TorchServe can be imported.
    (tmp_path / "unpacked").mkdir()
    (tmp_path / "unpacked" / "sdkit_handler.py").write_text(handler_source)
    (tmp_path / "unpacked" / "sdkit_requests.py").write_text(requests_source)
    (tmp_path / "unpacked" / "sdkit_answers.py").write_text(answers_source)
    code = "import sys; sys.modules['sdkit'] = sys.modules['ts'] = None; import sdkit_handler; print(sdkit_handler.handle)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "unpacked", capture_output=True, text=True)
    assert result.returncode == 0 and "function handle" in result.stdout, result.stderr

    props = read_properties(config)
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"] == "http://0.0.0.0:8085" and props["management_address"]
    assert props["enable_envvars_config"] == "true" and props["install_py_dep_per_model"] == "true"
    assert int(props["default_response_timeout"]) >= 600 and int(props["default_startup_timeout"]) >= 600
    assert int(props["max_response_size"]) >= response_bytes(512, 2) > 2 * 512 * 512 * 3
    assert props["load_models"] == "tiny=tiny.mar"
    entry = snapshot(config)["models"]["tiny"]["1.0"]
    assert entry["marName"] == "tiny.mar" and entry["defaultVersion"] and entry["startupTimeout"] >= 600


def test_requirements_dtype_defaults_and_timeouts_are_set_at_export(tiny_sd, tmp_path):
    from importlib import metadata

    from sdkit.export.run import export_command
    from sdkit.export.serve_settings import ServeSettings

    settings = ServeSettings(steps=4, width=48, height=40, guidance=3.5, negative_prompt="blurry",
                             image_format="uint8-hwc", startup_timeout=2400, response_timeout=2400)
    [fp16, config] = export_command(format="mar", model=str(tiny_sd), out=str(tmp_path / "a"), name="half",
                                    dtype="fp16", max_steps=8, settings=settings)
    [fp32, _] = export_command(format="mar", model=str(tiny_sd), out=str(tmp_path / "b"), name="full",
                               archive_format="default")
    assert 0.4 < fp16.stat().st_size / fp32.stat().st_size < 0.6  # the weights really are half precision
    with zipfile.ZipFile(fp16) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        requirements = z.read("requirements.txt").decode().splitlines()
        serve = json.loads(z.read("sdkit_serve.json"))
        model_config = z.read("model-config.yaml").decode()
    assert manifest["model"]["requirementsFile"] == "requirements.txt"
    assert f"diffusers=={metadata.version('diffusers')}" in requirements
    assert f"transformers=={metadata.version('transformers')}" in requirements
    assert not any(line.startswith(("torch", "peft")) for line in requirements)  # the image's own torch; no LoRA
    assert serve["defaults"] == {"steps": 4, "width": 48, "height": 40, "guidance": 3.5, "negative_prompt": "blurry",
                                 "image_format": "uint8-hwc"}
    assert "responseTimeout: 2400" in model_config and "startupTimeout: 2400" in model_config
    props = read_properties(config)
    assert props["default_startup_timeout"] == "2400" and props["install_py_dep_per_model"] == "true"
    assert int(props["max_request_size"]) < 2 * 1024 * 1024

    [bare, config] = export_command(format="mar", model=str(tiny_sd), out=str(tmp_path / "c"), name="bare",
                                    settings=ServeSettings(requirements=False))
    with zipfile.ZipFile(bare) as z:
        assert "requirements.txt" not in z.namelist()
        assert "requirementsFile" not in json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
    assert read_properties(config)["install_py_dep_per_model"] == "false"


def test_exported_defaults_are_what_requests_get(tiny_sd, tmp_path):
    from sdkit.export.serve_settings import ServeSettings

    settings = ServeSettings(steps=2, width=48, height=40, negative_prompt="blurry", image_format="uint8")
    [archive, _] = export(tiny_sd, tmp_path, name="d", archive_format="no-archive", max_steps=3, settings=settings)
    service = H.DiffusionService()
    service.handle(None, make_context(archive))
    assert service.defaults == H.Defaults(steps=2, width=48, height=40, guidance=None, negative_prompt="blurry",
                                          image_format="uint8")
    [answer] = service.handle([{"body": "a red circle"}], make_context(archive, content_type="text/plain"))
    assert np.array(answer["images"], dtype="uint8").shape == (1, 40, 48, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=9), "--steps: must be between 1 and --max-steps (3)"),
    (dict(width=50), "--width: must be a multiple of 8"),
    (dict(image_format="jpeg"), "--image-format: 'jpeg' is not one of"),
    (dict(refiner_steps=2), "only used with --refiner"),
    (dict(startup_timeout=0), "--startup-timeout: must be a positive number"),
])
def test_bad_serving_settings(tiny_sd, tmp_path, kwargs, message):
    from sdkit.export.serve_settings import ServeSettings

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(tiny_sd, tmp_path, max_steps=3, settings=ServeSettings(**kwargs))


def test_existing_output_needs_force(tiny_sd, tmp_path):
    export(tiny_sd, tmp_path, name="tiny")
    with pytest.raises(UserError, match=r"tiny\.mar already exists; pass --force"):
        export(tiny_sd, tmp_path, name="tiny")
    with pytest.raises(UserError, match=r"tiny\.mar already exists; pass --force"):
        export(tiny_sd, tmp_path, name="tiny", archive_format="tgz")  # same name, other format
    export(tiny_sd, tmp_path, name="tiny", archive_format="tgz", force=True)
    assert sorted(p.name for p in (tmp_path / "model-store").iterdir()) == ["tiny.tar.gz"]  # nothing half-written
    assert snapshot(tmp_path / "config" / "config.properties")["models"]["tiny"]["1.0"]["marName"] == "tiny.tar.gz"


def test_tgz_and_no_archive_formats(tiny_sd, tmp_path):
    [tgz, _] = export(tiny_sd, tmp_path / "t", name="big", archive_format="tgz")
    with tarfile.open(tgz) as t:
        names = set(t.getnames())
    assert {"big/MAR-INF/MANIFEST.json", "big/sdkit_handler.py", "big/pipeline/unet/diffusion_pytorch_model.safetensors"} <= names
    [folder, config] = export(tiny_sd, tmp_path / "n", name="big", archive_format="no-archive")
    assert folder.is_dir() and (folder / "MAR-INF" / "MANIFEST.json").is_file()
    assert (folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_nlink == 1  # a copy
    assert snapshot(config)["models"]["big"]["1.0"]["marName"] == "big"


def test_zip_store_is_torch_model_archivers_stored_zip(tiny_sd, tmp_path):
    from model_archiver.model_packaging_utils import archiving_options

    from sdkit.export.mar import ARCHIVE_FORMATS
    from sdkit.export.run import export_command

    assert ARCHIVE_FORMATS == archiving_options  # each --archive-format and the file it writes, as the archiver has them
    [archive, _] = export_command(format="mar", model=str(tiny_sd), out=str(tmp_path), name="stored",
                                  archive_format="zip-store")
    assert archive == tmp_path / "model-store" / "stored.mar"
    with zipfile.ZipFile(archive) as z:
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}
        assert "pipeline/unet/diffusion_pytorch_model.safetensors" in z.namelist()


def test_models_share_one_store(tiny_sd, tmp_path):
    export(tiny_sd, tmp_path, name="first")
    export(tiny_sd, tmp_path, name="second")
    models = snapshot(tmp_path / "config" / "config.properties")["models"]
    assert sorted(models) == ["first", "second"]
    assert read_properties(tmp_path / "config" / "config.properties")["load_models"] == "first=first.mar,second=second.mar"


def test_only_the_pipeline_is_shipped_and_pickles_are_refused(tiny_sd, tmp_path):
    """A full fine-tune's run folder also holds checkpoints and logs; .bin weights are never loaded:
    beside safetensors they are left out, alone they are refused in one line."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_sd, run)
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-10" / "optimizer.bin").write_bytes(b"x" * 1000)
    (run / "samples").mkdir()
    (run / "samples" / "step-10.png").write_bytes(b"png")
    torch.save({"x": torch.zeros(1)}, run / "unet" / "diffusion_pytorch_model.bin")
    [archive, _] = export(run, tmp_path / "a", name="run", archive_format="no-archive")
    assert sorted(p.name for p in archive.iterdir()) == sorted(
        ["MAR-INF", "model-config.yaml", "pipeline", "requirements.txt", "sdkit_answers.py", "sdkit_handler.py",
         "sdkit_requests.py", "sdkit_serve.json"])
    assert not list(archive.rglob("*.bin"))

    (run / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"only pickled weights for unet \(unet/diffusion_pytorch_model.bin\)"):
        export(run, tmp_path / "b", name="run", archive_format="no-archive")


def test_lora_shipped_or_fused_gives_the_same_image(tiny_sd, tmp_path):
    lora = make_lora(tiny_sd, tmp_path / "lora")
    [shipped, _] = export(tiny_sd, tmp_path / "out", name="shipped", lora=str(lora), archive_format="no-archive")
    [fused, _] = export(tiny_sd, tmp_path / "out", name="fused", lora=str(lora), fuse_lora=True, archive_format="no-archive")
    [plain, _] = export(tiny_sd, tmp_path / "out", name="plain", archive_format="no-archive")
    assert (shipped / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((shipped / "sdkit_serve.json").read_text())["lora"] == "lora/pytorch_lora_weights.safetensors"
    assert not (fused / "lora").exists() and json.loads((fused / "sdkit_serve.json").read_text())["lora"] is None

    with_lora, fused_image, base = image_from(shipped), image_from(fused), image_from(plain)
    assert np.abs(with_lora - base).mean() > 5  # the LoRA is really applied
    np.testing.assert_allclose(fused_image, with_lora, atol=2)


def test_lora_run_folder_brings_its_lora(tiny_sd, tmp_path):
    from sdkit.inference.loading import ResolvedModel

    lora = make_lora(tiny_sd, tmp_path / "lora")
    model = ResolvedModel(base=str(tiny_sd), lora=str(lora), run_dir=str(tmp_path / "my-run"))
    [archive, _] = export_mar(model, out=tmp_path / "out", archive_format="no-archive")
    assert archive.name == "my-run"  # named after the run
    assert (archive / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="bad name"), "--name: 'bad name' may hold only letters"),
        (dict(archive_format="zip"), "--archive-format: 'zip' is not one of"),
        (dict(max_steps=0), "--max-steps: must be an integer of at least 1"),
        (dict(max_size=4), "--max-size: must be an integer of at least 8"),
        (dict(fuse_lora=True), "--fuse-lora: there is no LoRA to fuse"),
        (dict(refiner="/nonexistent/refiner"), "--refiner: only sdxl base models take a refiner"),
    ],
)
def test_bad_arguments(tiny_sd, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(tiny_sd, tmp_path, **kwargs)
    assert not (tmp_path / "model-store").exists()


# ------------------------------------------------------------------------ a real TorchServe

torchserve_mod = pytest.importorskip("sdkit.export.torchserve")


def _needs_torchserve():
    try:
        torchserve_mod.find_torchserve()
    except UserError as e:
        pytest.skip(f"TorchServe cannot run here: {e}")


@pytest.fixture(scope="module")
def store(tiny_sd, tmp_path_factory):
    """One store, two models, one server per test: `tiny` (2 steps at 32x32 by default, PNG answers)
    and `seeds`, exported for the seeds' client (UINT8 [H, W, 3] answers) and batching 3 requests."""
    from sdkit.export.serve_settings import ServeSettings

    out = tmp_path_factory.mktemp("store")
    export(tiny_sd, out, name="tiny", max_steps=2, max_size=64, max_batch=4)
    export(tiny_sd, out, name="seeds", max_steps=2, max_size=64, max_batch=4,
           settings=ServeSettings(image_format="uint8-hwc"))
    config = out / "config" / "config.properties"
    props = read_properties(config)
    models = json.loads(props["model_snapshot"])
    models["models"]["seeds"]["1.0"].update(batchSize=3, maxBatchDelay=1500)  # TorchServe batches rows together
    props["model_snapshot"] = json.dumps(models, separators=(",", ":"))
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return out


def _post_many(server, path: str, bodies: list) -> list:
    """All at once, so that TorchServe puts them into the same batches; returns the HTTP statuses and answers."""
    from concurrent.futures import ThreadPoolExecutor

    def post(body):
        if isinstance(body, str) and not body.startswith("{"):
            return server.request("POST", server.inference_url + path, body.encode(), "text/plain")[:2]
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return server.request("POST", server.inference_url + path, data, "application/json")[:2]

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _json(body: bytes):
    return json.loads(body)


def _own_processes(home: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(home in part for part in process.info["cmdline"] or []):
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_torchserve_serves_every_request_shape(store):
    _needs_torchserve()
    server = torchserve_mod.LocalTorchServe(store)
    with server:
        home = str(server.home)
        server.wait_ready("tiny", timeout_s=600)

        status, body, _ = server.post_text("/predictions/tiny", "a red circle")
        assert status == 200, body
        [image] = pngs(_json(body)["images"])
        assert image.shape == (32, 32, 3)

        v1 = {"instances": ["a red circle", {"prompt": "a blue square", "seed": 4}]}
        for path in ("/predictions/tiny", "/v1/models/tiny:predict"):
            status, body, _ = server.post_json(path, v1)
            assert status == 200, body
            assert [len(pngs(p["images"])) for p in _json(body)["predictions"]] == [1, 1]

        status, body, _ = server.post_json("/v2/models/tiny/infer", torchserve_mod.v2_request("a cat", request_id="r-1", seed=9))
        assert status == 200, body
        answer = _json(body)
        outputs = assert_v2_response(answer)
        assert answer["model_name"] == "tiny" and answer["id"] == "r-1"
        assert len(pngs(outputs["images"]["data"])) == 1 and outputs["seeds"]["data"] == [9]

        for payload, message in (({"prompt": "a", "steps": 99}, "'steps' must be between 1 and 2"),
                                 ({"inputs": []}, "'inputs' must be a non-empty list")):
            status, body, _ = server.post_json("/v2/models/tiny/infer" if "inputs" in payload else "/predictions/tiny", payload)
            assert status == 400 and message in _json(body)["message"], body
        status, body, _ = server.request("POST", server.inference_url + "/predictions/tiny", b'{"prompt": ', "application/json")
        assert status == 400 and "not valid JSON" in _json(body)["message"]
        status, body, _ = server.request("POST", server.inference_url + "/predictions/tiny", b"a cat")  # form-encoded
        assert status == 400 and "Content-Type: text/plain" in _json(body)["message"]

        # The seeds' exact body, raw (their runtime sets no envelope), and their client's decoding line.
        status, body, _ = server.post_json("/v2/models/seeds/infer", SEED_BODY)
        assert status == 200, body
        answer = _json(body)
        image = seed_client_image(answer)
        assert image.shape == (32, 32, 3) and answer["id"] == "42"
        status, body, _ = server.post_json("/predictions/tiny", {"prompt": "Photo of a dog", "seed": answer["outputs"][1]["data"][0]})
        np.testing.assert_array_equal(image, pngs(_json(body)["images"])[0])  # the same pixels as sdkit's PNG

        # Hostile rows batched with good ones (batchSize 3): 400 for each bad row only, 200 for the good.
        hostile = [b for b, _ in HOSTILE if len(b if isinstance(b, str) else json.dumps(b)) < 1024 * 1024]
        good = [{"prompt": "good", "steps": 1}, "good text"]
        for start in range(0, len(hostile), 4):  # 6 at a time: TorchServe's job queue holds 10
            chunk = hostile[start:start + 4]
            results = _post_many(server, "/predictions/seeds", good[:1] + chunk + good[1:])
            codes = [code for code, _ in results]
            assert codes == [200] + [400] * len(chunk) + [200], [r[1][:200] for r in results]
            assert all(len(answer) < 1000 for _, answer in results[1:-1])  # echoed values cut short
        # Over max_request_size: TorchServe's frontend answers 413 before any worker sees it. It may close the
        # connection while the client still sends the 2 MB, and the reset can swallow the answer (status 0, seen
        # once in CI); the 413 is asserted on the first attempt that reads an answer.
        for _ in range(5):
            status, body, _ = server.post_text("/predictions/seeds", "a" * 2_000_000)
            if status:
                break
        assert status == 413

        status, body, _ = server.post_text("/predictions/tiny", "still serving")  # the worker survived
        assert status == 200 and len(pngs(_json(body)["images"])) == 1
        assert _own_processes(home)  # sanity: the search below does find TorchServe while it runs
    assert server.leftovers == [] and _own_processes(home) == []


@pytest.mark.slow
def test_torchserve_with_kservev2_envelope(store):
    """KServe's runtime sets TS_SERVICE_ENVELOPE=kservev2 for v2: TorchServe's envelope wraps the handler."""
    _needs_torchserve()
    with torchserve_mod.LocalTorchServe(store, envelope="kservev2") as server:
        server.wait_ready("tiny", timeout_s=600)
        request = {"id": "env-1", "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
            {"name": "num_images", "datatype": "INT32", "shape": [1], "data": [2]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]},
        ]}
        status, body, _ = server.post_json("/v2/models/tiny/infer", request)
        assert status == 200, body
        answer = _json(body)
        outputs = assert_v2_response(answer)
        assert answer["id"] == "env-1" and len(pngs(outputs["images"]["data"])) == 2
        assert outputs["seeds"]["data"] == [1, 2]
        # The seeds' body through the envelope: 200; UINT8 pixels come back flat (the envelope flattens).
        status, body, _ = server.post_json("/v2/models/seeds/infer", SEED_BODY)
        assert status == 200, body
        [images, seeds] = _json(body)["outputs"]
        assert images["datatype"] == "UINT8" and images["shape"] == [32 * 32 * 3]
        tensor_image = np.array(images["data"], dtype="uint8").reshape(32, 32, 3)
        # The envelope drops v2 `parameters`: settings go as input tensors.
        seed = {"name": "seed", "datatype": "INT64", "shape": [1], "data": [seeds["data"][0]]}
        status, body, _ = server.post_json("/v2/models/tiny/infer", {**SEED_BODY, "inputs": SEED_BODY["inputs"] + [seed]})
        assert status == 200, body
        np.testing.assert_array_equal(tensor_image, pngs(_json(body)["outputs"][0]["data"])[0])
        bad = {"inputs": [request["inputs"][0], {"name": "steps", "datatype": "INT32", "shape": [1], "data": [50]}]}
        status, body, _ = server.post_json("/v2/models/tiny/infer", bad)
        assert status == 400 and "'steps' must be between 1 and 2" in _json(body)["message"]
    assert server.leftovers == []


@pytest.mark.slow
def test_check_archive_reports_timings(store):
    _needs_torchserve()
    from rich.console import Console

    timings = torchserve_mod.check_archive(store, "tiny", console=Console(file=io.StringIO(), width=100))
    assert timings["image_size"] == [32, 32]
    assert timings["ready_s"] > 0 and timings["v2_s"] > 0 and timings["plain_s"] > 0


def test_check_archive_needs_an_export(tmp_path):
    with pytest.raises(UserError, match="export with --format mar first"):
        torchserve_mod.check_archive(tmp_path, "tiny")


def test_decode_images_rejects_non_png():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="expected a PNG"):
        torchserve_mod.decode_images([base64.b64encode(buffer.getvalue()).decode()])
