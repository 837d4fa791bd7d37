"""Shared fixtures: the offline weights, real photos, and real servers on loopback."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "photos"
# CI and every developer machine have the project's shared folder beside the checkout.
SHARED_WEIGHTS = Path(os.environ.get("IMAGETAG_TEST_WEIGHTS_DIR", REPO.parent / "shared" / "weights"))
DETECTOR_WEIGHTS = SHARED_WEIGHTS / "yolov8n-w8.pt"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo_base64(name: str) -> str:
    return base64.b64encode((PHOTOS / name).read_bytes()).decode()


def ultralytics_asset(name: str) -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / name


class RunningServer:
    def __init__(self, process: subprocess.Popen, base_url: str, log: Path, log_handle) -> None:
        self.process = process
        self.log_handle = log_handle
        self.base_url = base_url
        self.log = log

    def url(self, path: str) -> str:
        return self.base_url + path


def start_server(
    tmp_dir: Path, *args: str, env: dict[str, str | None] | None = None, ca_cert: Path | None = None
) -> RunningServer:
    """`imagetag serve` in a subprocess; an `env` value of None removes that variable."""
    port = free_port()
    scheme = "https" if "--certfile" in args else "http"
    log = tmp_dir / f"server-{port}.log"
    environment = {
        **os.environ,
        "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS),
        "IMAGETAG_URL_ALLOWED_NETWORKS": "127.0.0.1/32",
        "IMAGETAG_TORCH_THREADS": "2",
        # One engine: a second only adds start-up time here (replicas side by side are tested in
        # tests/inference/test_batching.py).
        "IMAGETAG_MODEL_REPLICAS": "1",
        "IMAGETAG_AUTH_MODE": "none",
        "IMAGETAG_DATA_DIR": str(tmp_dir / f"data-{port}"),
        **(env or {}),
    }
    environment = {name: value for name, value in environment.items() if value is not None}
    log_handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
        env=environment,
        stdout=log_handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    server = RunningServer(process, f"{scheme}://127.0.0.1:{port}", log, log_handle)
    try:
        wait_until_ready(server, verify=str(ca_cert) if ca_cert else True)
    except Exception:
        stop_server(server)
        raise
    return server


def wait_until_ready(server: RunningServer, verify: str | bool = True, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited: {server.log.read_text()[-3000:]}")
        try:
            if requests.get(server.url("/readyz"), timeout=2, verify=verify).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready in {timeout_s}s: {server.log.read_text()[-3000:]}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.log_handle.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def engine():
    from inference.engine import EngineConfig, TaggingEngine

    return TaggingEngine.build(EngineConfig(detector_weights=(DETECTOR_WEIGHTS,), torch_threads=2))


class RedisProcess:
    """A real redis-server on loopback, owned by the tests; can be stopped and started again."""

    def __init__(self, directory: Path, port: int | None = None, persistent: bool = False) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session; tests use distinct keys or flush what they own."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
