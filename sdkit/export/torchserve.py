"""`sdkit export --format mar --check`: serve an exported store with a real TorchServe on loopback.

Starts TorchServe with the exported config (addresses moved to 127.0.0.1 and free ports),
waits for the model to load, sends one KServe v2 request and one plain-text request, decodes
the images, prints load time and latency, and stops TorchServe, leaving no process behind.
People find out here, not on the cluster.

Each server gets a private temp folder: TorchServe keeps its pid file and the worker's Unix
socket (`.ts.sock.<port>`) in the temp folder, so two servers sharing /tmp would collide.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError
from sdkit.export.mar import read_properties

CHECK_PROMPT = "a photo of a red circle on a white background"


class ArchiveCheckError(UserError):
    """TorchServe did not load or answer the exported model as expected."""


def find_torchserve() -> str:
    """The `torchserve` launcher next to this Python (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).parent / "torchserve"
    found = str(beside) if beside.is_file() else shutil.which("torchserve")
    if not found:
        raise UserError("--check needs TorchServe: pip install 'sdkit-recipes[serve]' (torchserve, torch-model-archiver)")
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise UserError("--check needs Java 17+ for TorchServe (no `java` on PATH and no JAVA_HOME)")
    return found


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


class LocalTorchServe:
    """One TorchServe on 127.0.0.1 serving an exported OUT folder; a context manager that always stops it."""

    def __init__(self, out_dir: str | Path, *, models: Optional[list[str]] = None, envelope: Optional[str] = None):
        self.out_dir = Path(out_dir).resolve()
        self.store = self.out_dir / "model-store"
        self.config = self.out_dir / "config" / "config.properties"
        if not self.config.is_file():
            raise UserError(f"{self.config} does not exist: export with --format mar first")
        self.models = models
        self.envelope = envelope
        self.home: Optional[Path] = None
        self.launcher: Optional[subprocess.Popen] = None
        self.processes: list = []
        self.leftovers: list[int] = []

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "LocalTorchServe":
        torchserve = find_torchserve()
        self.home = Path(tempfile.mkdtemp(prefix="sdkit-ts-"))
        (self.home / "tmp").mkdir()
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.management_url = f"http://127.0.0.1:{management}"

        props = read_properties(self.config)
        snapshot = json.loads(props.get("model_snapshot") or "{}")
        models = snapshot.get("models") or {}
        wanted = self.models or list(models)
        missing = [m for m in wanted if m not in models]
        if missing or not wanted:
            raise UserError(f"{self.config}: no model named {', '.join(missing) or '(none)'} in model_snapshot")
        snapshot = {**snapshot, "modelCount": len(wanted), "models": {m: models[m] for m in wanted}}
        props.pop("load_models", None)  # the snapshot lists the models, as on KServe
        props.update(
            inference_address=self.inference_url,
            management_address=self.management_url,
            metrics_address=f"http://127.0.0.1:{metrics}",
            grpc_inference_address="127.0.0.1",
            grpc_management_address="127.0.0.1",
            grpc_inference_port=str(grpc_inference),
            grpc_management_port=str(grpc_management),
            model_store=str(self.store),
            # Per-model installs run `pip install -t` from an index; this Python already has the
            # packages requirements.txt names (and a loopback check must not need the internet).
            install_py_dep_per_model="false",
            model_snapshot=json.dumps(snapshot, separators=(",", ":")),
        )
        config = self.home / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

        env = dict(os.environ)
        env.update(
            TMPDIR=str(self.home / "tmp"), TEMP=str(self.home / "tmp"),
            LOG_LOCATION=str(self.home / "logs"), METRICS_LOCATION=str(self.home / "logs"),
        )
        env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
        if self.envelope:
            env["TS_SERVICE_ENVELOPE"] = self.envelope
        else:
            env.pop("TS_SERVICE_ENVELOPE", None)
        self.env = env
        self.torchserve = torchserve
        cmd = [
            torchserve, "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--model-store", str(self.store), "--ts-config", str(config),
        ]
        self.started = time.perf_counter()
        # --foreground keeps Java a child of the launcher we own, so nothing is orphaned.
        with open(self.home / "launcher.log", "wb") as log:
            self.launcher = subprocess.Popen(cmd, env=env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, name: str, timeout_s: float = 900.0) -> float:
        """Seconds from start until a worker of `name` is READY."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.launcher.poll() is not None:
                raise ArchiveCheckError(f"TorchServe exited (code {self.launcher.returncode}) before the model loaded:\n{self.log_tail()}")
            status, body, _ = self.request("GET", f"{self.management_url}/models/{name}", timeout=5)
            if status == 200:
                workers = [w for entry in json.loads(body) for w in entry.get("workers", [])]
                if any(w.get("status") == "READY" for w in workers):
                    return time.perf_counter() - self.started
            if "Load model failed" in self.read_log("ts_log.log"):
                raise ArchiveCheckError(f"TorchServe could not load '{name}':\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ArchiveCheckError(f"'{name}' was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """`torchserve --stop`, then make sure Java and its workers are gone (killed if they linger)."""
        import psutil

        if self.launcher is None:
            return
        try:
            root = psutil.Process(self.launcher.pid)
            self.processes = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            self.processes = []
        if self.launcher.poll() is None:
            subprocess.run([self.torchserve, "--stop"], env=self.env, cwd=self.home, capture_output=True, timeout=120)
        try:
            self.launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(self.processes, timeout=30)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait(timeout=10)
        self.leftovers = [p.pid for p in self.processes if _running(p)]
        self.launcher = None
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "LocalTorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- requests and logs
    def request(self, method: str, url: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
                timeout: float = 600.0) -> tuple[int, bytes, float]:
        """(HTTP status, body, seconds); connection errors give status 0."""
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read(), time.perf_counter() - started
        except urllib.error.HTTPError as e:
            return e.code, e.read(), time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return 0, b"", time.perf_counter() - started

    def post_json(self, path: str, payload) -> tuple[int, bytes, float]:
        return self.request("POST", self.inference_url + path, json.dumps(payload).encode(), "application/json")

    def post_text(self, path: str, text: str) -> tuple[int, bytes, float]:
        return self.request("POST", self.inference_url + path, text.encode(), "text/plain")

    def read_log(self, name: str) -> str:
        path = self.home / "logs" / name if self.home else None
        return path.read_text(errors="replace") if path and path.is_file() else ""

    def log_tail(self, lines: int = 30) -> str:
        text = self.read_log("model_log.log") or self.read_log("ts_log.log")
        if not text and self.home and (self.home / "launcher.log").is_file():
            text = (self.home / "launcher.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def decode_images(encoded: list) -> list:
    """PIL images from base64 PNG strings (raises on anything that is not a PNG)."""
    from PIL import Image

    images = []
    for item in encoded:
        image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
        image.load()
        if image.format != "PNG":
            raise ValueError(f"expected a PNG, got {image.format}")
        images.append(image)
    return images


def v2_request(prompt: str, *, request_id: str = "sdkit-check", **parameters) -> dict:
    return {
        "id": request_id,
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
        "parameters": parameters,
    }


def check_archive(out_dir: str | Path, name: Optional[str], *, timeout_s: float = 900.0, steps: Optional[int] = None,
                  console=None) -> dict:
    """Serve OUT with TorchServe on loopback, send a v2 and a plain request; returns the timings (seconds)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    server = LocalTorchServe(out_dir, models=[name] if name else None)
    if name is None:
        snapshot = json.loads(read_properties(server.config).get("model_snapshot") or "{}")
        names = list(snapshot.get("models") or {})
        if len(names) != 1:
            raise UserError(f"{server.config} serves {len(names)} models; name the one to check")
        name = names[0]
    parameters = {"seed": 0}
    if steps is not None:
        parameters["steps"] = steps
    with console.status(f"starting TorchServe for '{name}' on 127.0.0.1..."):
        with server:
            ready_s = server.wait_ready(name, timeout_s)
            status, body, v2_s = server.post_json(f"/v2/models/{name}/infer", v2_request(CHECK_PROMPT, **parameters))
            v2_images = _images_from(status, body, "v2", lambda r: next(o for o in r["outputs"] if o["name"] == "images")["data"])
            status, body, plain_s = server.post_text(f"/predictions/{name}", CHECK_PROMPT)
            plain_images = _images_from(status, body, "plain-text", lambda r: r["images"])
    if server.leftovers:
        raise ArchiveCheckError(f"TorchServe left processes running: {server.leftovers}")
    table = Table(title=f"TorchServe check: {name}", show_header=False)
    table.add_row("model ready after start", f"{ready_s:.1f} s")
    size = "x".join(map(str, v2_images[0].size))
    table.add_row("KServe v2 request", f"{v2_s:.2f} s, {len(v2_images)} PNG {size}")
    table.add_row("plain-text request", f"{plain_s:.2f} s, {len(plain_images)} PNG")
    console.print(table)
    return {"ready_s": ready_s, "v2_s": v2_s, "plain_s": plain_s, "image_size": list(v2_images[0].size)}


def _images_from(status: int, body: bytes, what: str, pick) -> list:
    if status != 200:
        raise ArchiveCheckError(f"the {what} request got HTTP {status}: {body[:500].decode(errors='replace')}")
    try:
        images = decode_images(pick(json.loads(body)))
    except Exception as e:
        raise ArchiveCheckError(f"the {what} answer holds no decodable PNG ({type(e).__name__}: {e})") from None
    if not images:
        raise ArchiveCheckError(f"the {what} answer holds no image")
    return images
