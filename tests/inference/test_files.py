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


def test_weights_problem_finds_what_is_wrong_without_loading(tmp_path):
    from inference.classifier import default_weights_path
    from inference.files import weights_problem
    from tests.conftest import DETECTOR_WEIGHTS, SHARED_WEIGHTS

    sound = DETECTOR_WEIGHTS.read_bytes()
    flipped = bytearray(sound)
    flipped[len(sound) // 2] ^= 0xFF
    files = {
        "truncated.pt": sound[: len(sound) // 2],
        "flipped.pt": bytes(flipped),
        "text.pt": b"<html>404 Not Found</html>",  # what a failed download often saves
        "empty.onnx": b"",
        "renamed.tflite": b"\x00" * 64,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "openvino").mkdir()
    problems = {name: weights_problem(tmp_path / name) for name in [*files, "openvino", "absent.pt"]}
    assert problems == {
        "truncated.pt": "corrupt or truncated: not a PyTorch archive",
        "flipped.pt": problems["flipped.pt"],
        "text.pt": "corrupt or truncated: not a PyTorch archive",
        "empty.onnx": "an empty file",
        "renamed.tflite": "not a TFLite model (no TFL3 identifier)",
        "openvino": "an empty folder",
        "absent.pt": "not found",
    }
    assert problems["flipped.pt"].startswith("corrupt: ") and "fails its checksum" in problems["flipped.pt"]
    # Sound files of every kind the project ships pass.
    for sound_file in (DETECTOR_WEIGHTS, SHARED_WEIGHTS / "yolov8n_int8.tflite", default_weights_path()):
        assert weights_problem(sound_file) is None, sound_file
