"""Starting `sdkit serve` for real on 127.0.0.1 and talking to it (tests/serve/conftest.py's fixtures use it)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sdkit.export.torchserve import free_ports


def post(url: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def without_nulls(value):
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return [without_nulls(v) for v in value] if isinstance(value, list) else value


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0


@contextlib.contextmanager
def sdkit_serve(models: dict, log_dir: Path, *args: str):
    """`sdkit serve MODEL --name NAME --port P *args` for each NAME -> MODEL, started side by side;
    yields {NAME: (url, log path)} once every server is ready."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    started = {}
    try:
        for (name, model), port in zip(models.items(), free_ports(len(models))):
            log = log_dir / f"serve-{name}.log"
            cmd = [sys.executable, "-m", "sdkit", "serve", str(model), "--name", name, "--port", str(port), *args]
            with open(log, "wb") as out:
                process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            started[name] = (process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 600
        for name, (process, url, log) in started.items():
            while get(f"{url}/v2/models/{name}/ready") != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sdkit serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield {name: (url, log) for name, (_, url, log) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.terminate()
        for process, _, _ in started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
