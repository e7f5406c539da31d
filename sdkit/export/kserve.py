"""`sdkit export --format kserve`: what a cluster needs to run `sdkit serve` as a custom predictor.

    OUT/model/               the diffusers folder (safetensors only; a LoRA fused in)
    OUT/app/                 sdkit's source and pyproject.toml, installed with its `serve` extra
    OUT/Dockerfile           entrypoint `sdkit serve /models/NAME --host 0.0.0.0 --port 8080` (--split: the parts too)
    OUT/inference-service.yaml  a KServe InferenceService with that image as its predictor container

Build and push the image (`docker build -t REGISTRY/NAME OUT`), set the image in the YAML, apply it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from sdkit.atomic import atomic_dir
from sdkit.errors import UserError

BASE_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"  # torch built for the GPU driver, as KServe images do


def export_kserve(model, out: Path, *, name: str, lora: Optional[str], lora_scale: float, dtype: Optional[str],
                  max_steps: int, max_size: int, max_batch: int, image_format: str = "png",
                  force: bool = False, split: bool = False) -> list[Path]:
    from sdkit.export.mar import stage_pipeline

    source = _sdkit_source()
    with atomic_dir(out, overwrite=force) as stage:
        stage_pipeline(model.base, stage / "model", link=False, lora_file=lora, lora_scale=lora_scale, dtype=dtype)
        app = stage / "app"
        shutil.copytree(source / "sdkit", app / "sdkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copyfile(source / "pyproject.toml", app / "pyproject.toml")
        (app / "README.md").write_text("sdkit, as shipped by `sdkit export --format kserve`.\n")
        args = ["--max-steps", str(max_steps), "--max-size", str(max_size), "--max-batch", str(max_batch),
                "--image-format", image_format, *(["--split"] if split else [])]
        (stage / "Dockerfile").write_text(dockerfile(name, args))
        (stage / "inference-service.yaml").write_text(inference_service(name))
    return [Path(out), Path(out) / "Dockerfile", Path(out) / "inference-service.yaml"]


def _sdkit_source() -> Path:
    import sdkit

    root = Path(sdkit.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UserError("--format kserve: ships sdkit's source and needs a source checkout (pyproject.toml beside sdkit/)")
    return root


def dockerfile(name: str, serve_args: list) -> str:
    entry = ["sdkit", "serve", f"/models/{name}", "--name", name, "--host", "0.0.0.0", "--port", "8080", *serve_args]
    quoted = ", ".join(f'"{a}"' for a in entry)
    return (
        f"# Written by `sdkit export --format kserve`: docker build -t REGISTRY/{name}:latest .\n"
        f"FROM {BASE_IMAGE}\n"
        "WORKDIR /app\n"
        "COPY app /app\n"
        "# torch comes with the base image; the rest from sdkit's pyproject (serve extra: kserve).\n"
        'RUN pip install --no-cache-dir "/app[serve]"\n'
        f"COPY model /models/{name}\n"
        "ENV HF_HUB_OFFLINE=1\n"
        "EXPOSE 8080\n"
        f"ENTRYPOINT [{quoted}]\n"
    )


def inference_service(name: str) -> str:
    return f"""# Written by `sdkit export --format kserve`. Replace the image with the one you pushed, then:
#   kubectl apply -f inference-service.yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name.lower().replace('_', '-').replace('.', '-')}
spec:
  predictor:
    containers:
      - name: kserve-container
        image: REGISTRY/{name}:latest
        ports:
          - containerPort: 8080
            protocol: TCP
        readinessProbe:
          httpGet:
            path: /v2/models/{name}/ready
            port: 8080
          initialDelaySeconds: 10
          periodSeconds: 10
          failureThreshold: 120  # loading SDXL takes minutes
        livenessProbe:
          httpGet:
            path: /v2/health/live
            port: 8080
        resources:
          limits:
            nvidia.com/gpu: "1"
"""
