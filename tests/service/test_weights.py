"""The official-weights manifest (package data) and the verified download."""

from __future__ import annotations

import hashlib

import pytest

from service.weights import FetchError, WeightsEntry, fetch, read_manifest
from tests.conftest import PHOTOS


def entry_for(url: str, data: bytes, **overrides) -> WeightsEntry:
    values = dict(
        name="test", kind="detector", file="test.pt", url=url, sha256=hashlib.sha256(data).hexdigest(),
        size=len(data), license="test", classes="coco80", description="test",
    )
    return WeightsEntry(**{**values, **overrides})


def test_the_packaged_manifest_pins_every_download():
    manifest = read_manifest()
    assert {"yolo11n", "efficientnet-lite2"} <= set(manifest)
    for entry in manifest.values():
        assert entry.url.startswith("https://") and len(entry.sha256) == 64, entry.name


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


def test_an_unreachable_url_is_explained_and_leaves_nothing(tmp_path, files_server):
    with pytest.raises(FetchError, match="cannot download|HTTP 404"):
        fetch(entry_for(f"{files_server}/missing.pt", b"x"), tmp_path)
    assert list(tmp_path.iterdir()) == []
