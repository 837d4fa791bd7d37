"""File checksums, read in chunks."""

from __future__ import annotations

import hashlib

from inference.files import _CHUNK, file_sha256


def test_the_digest_of_a_file_longer_than_a_chunk_is_that_of_its_bytes(tmp_path):
    data = bytes(range(256)) * (_CHUNK // 256 * 2 + 3)
    (tmp_path / "weights.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert len(data) > 2 * _CHUNK
    assert file_sha256(tmp_path / "weights.bin") == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
