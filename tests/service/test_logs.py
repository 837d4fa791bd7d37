"""The process's log and the request's identity, from a real `imagetag serve` over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import requests

from service.weights import packaged_classifier
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, REPO, start_server, stop_server


def access_lines(log: Path) -> dict[str, dict]:
    """The access lines of a JSON log, by request id; every line must be JSON."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {line["request_id"]: line for line in lines if line["logger"] == "imagetag.access"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_json_line_per_request_with_its_id_and_never_a_secret(tmp_path):
    data = tmp_path / "data"
    made = subprocess.run(
        [sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"],
        env={**os.environ, "IMAGETAG_DATA_DIR": str(data)}, capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    credentials = json.loads(made.stdout)
    server = start_server(tmp_path, env={"IMAGETAG_AUTH_MODE": "iam", "IMAGETAG_DATA_DIR": str(data)})
    try:
        login = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": credentials["domain"]}, "name": credentials["user"],
            "password": credentials["password"]}}}, "scope": {"project": {"name": credentials["project_name"]}}}}
        logged_in = requests.post(server.url("/v3/auth/tokens"), json=login, timeout=30)
        token = logged_in.headers["X-Subject-Token"]
        image = base64.b64encode((PHOTOS / "cat_chelsea.jpg").read_bytes()).decode()
        tagged = requests.post(
            server.url(f"/v2/{credentials['project_id']}/image/tagging"), json={"image": image},
            headers={"X-Auth-Token": token, "X-Request-Id": "client.id_42-A"}, timeout=60,
        )
        refused = requests.post(server.url("/v2.0/image/tagging"), json={"image": image, "limit": 0},
                                headers={"X-Auth-Token": token, "X-Request-Id": "x" * 65}, timeout=60)
        unknown = requests.get(server.url("/nowhere"), headers={"X-Request-Id": "bad id"}, timeout=10)
        batch = requests.post(server.url("/v2.0/image/tagging/batch"), json={"images": [{"image": image}] * 3},
                              headers={"X-Auth-Token": token, "X-Request-Id": "batch-of-3"}, timeout=120)
        metrics = requests.get(server.url("/metrics"), timeout=10).text
        time.sleep(0.5)  # the log is written as the response goes
    finally:
        stop_server(server)

    # The client's id when well-formed; a fresh one otherwise.
    assert tagged.status_code == 200 and tagged.headers["X-Request-Id"] == "client.id_42-A"
    assert refused.status_code == 400 and len(refused.headers["X-Request-Id"]) == 32
    assert unknown.status_code == 404 and unknown.headers["X-Request-Id"] not in ("bad id", "")

    lines = access_lines(server.log)
    line = lines["client.id_42-A"]
    assert line["route"] == "/v2/{project_id}/image/tagging" and line["method"] == "POST"
    assert (line["status"], line["error_code"], line["images"]) == (200, "", 1)
    assert line["project"] == credentials["project_id"]
    assert 0 < line["latency_ms"] < 60_000 and line["time"].endswith("+00:00")
    failed = lines[refused.headers["X-Request-Id"]]
    assert (failed["status"], failed["error_code"], failed["project"]) == (400, "AIS.0501", credentials["project_id"])
    assert lines[unknown.headers["X-Request-Id"]]["route"] == "unmatched"
    assert batch.status_code == 200, batch.text
    assert (lines["batch-of-3"]["route"], lines["batch-of-3"]["images"]) == ("/v2.0/image/tagging/batch", 3)
    login_line = lines[logged_in.headers["X-Request-Id"]]
    assert (login_line["route"], login_line["status"]) == ("/v3/auth/tokens", 201)

    text = server.log.read_text()
    for secret in (credentials["password"], token, credentials["sk"], image[:64]):
        assert secret not in text

    # The version and the weights that answered, on the response and in the metrics.
    models = f"detector=sha256:{sha256(DETECTOR_WEIGHTS)},classifier=sha256:{sha256(packaged_classifier())}"
    assert tagged.headers["X-Imagetag-Models"] == models
    version = tagged.headers["X-Imagetag-Version"]
    assert f'imagetag_build_info{{models="{models}",version="{version}"}} 1.0' in metrics


def first_log_line(log_format: str | None) -> str:
    """The first line `imagetag serve` logs when its stderr is a terminal."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "IMAGETAG_AUTH_MODE": "none", "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS),
           "IMAGETAG_PORT": "1"}  # never bound: stopped once it has logged
    env.pop("IMAGETAG_LOG_FORMAT", None)
    if log_format:
        env["IMAGETAG_LOG_FORMAT"] = log_format
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    received = b""
    try:
        deadline = time.monotonic() + 120
        while b"\n" not in received and time.monotonic() < deadline:
            if select.select([controller], [], [], 1)[0]:
                received += os.read(controller, 4096)
    finally:
        process.kill()
        process.wait()
        os.close(controller)
    return received.decode().splitlines()[0]


def test_plain_text_on_a_terminal_unless_json_is_asked_for():
    text = first_log_line(None)
    assert " WARNING service.assembly: IMAGETAG_AUTH_MODE=none" in text and not text.startswith("{")
    line = json.loads(first_log_line("json"))
    assert line["level"] == "warning" and line["logger"] == "service.assembly"
    assert line["message"].startswith("IMAGETAG_AUTH_MODE=none")
