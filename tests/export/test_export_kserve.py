"""`sdkit export --format kserve`: the model folder, a Dockerfile running `sdkit serve`, an InferenceService."""

from __future__ import annotations

import pytest
import yaml

from sdkit.export.run import export_command


def test_kserve_export_writes_what_a_cluster_needs(tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "kserve"
    written = export_command(format="kserve", model=str(tiny_sd), out=str(out), name="tiny", dtype="fp16",
                             max_steps=20, max_size=512)
    assert written[0] == out
    from safetensors import safe_open

    DiffusionPipeline.from_pretrained(out / "model")  # a loadable diffusers folder ...
    with safe_open(out / "model" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"  # ... stored in fp16, as asked
    assert (out / "app" / "sdkit" / "serve" / "server.py").is_file() and (out / "app" / "pyproject.toml").is_file()
    dockerfile = (out / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["sdkit", "serve", "/models/tiny", "--name", "tiny", "--host", "0.0.0.0", "--port", "8080"' in dockerfile
    assert '"--max-steps", "20"' in dockerfile and 'pip install --no-cache-dir "/app[serve]"' in dockerfile
    service = yaml.safe_load((out / "inference-service.yaml").read_text())
    assert service["kind"] == "InferenceService"
    [container] = service["spec"]["predictor"]["containers"]
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/tiny/ready"


def test_kserve_export_with_split_serves_the_parts_too(tiny_sd, tmp_path):
    out = tmp_path / "kserve-split"
    export_command(format="kserve", model=str(tiny_sd), out=str(out), name="tiny", split=True)
    assert '"--image-format", "png", "--split"]' in (out / "Dockerfile").read_text()
    from sdkit.errors import UserError

    with pytest.raises(UserError, match="--split: only used with --format kserve"):
        export_command(format="safetensors", model=str(tiny_sd), out=str(tmp_path / "st"), split=True)
