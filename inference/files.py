"""File checksums, for exports keyed by their source weights and for verified downloads, and a
cheap look at weights files before anything loads them."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (weights run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_problem(path: Path) -> str | None:
    """Why `path` cannot hold model weights, found without loading them (a read of the file, no
    model library); None when it may. Catches the missing, the unreadable, the empty, and PyTorch
    or TFLite files that are truncated or corrupt; what only loading can tell is left to loading."""
    if not path.exists():
        return "not found"
    if path.is_dir():  # an OpenVINO export is a folder
        return None if any(path.iterdir()) else "an empty folder"
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not head:
        return "an empty file"
    if path.suffix in (".pt", ".pth"):
        return _torch_archive_problem(path, head)
    if path.suffix == ".tflite" and head[4:8] != b"TFL3":
        return "not a TFLite model (no TFL3 identifier)"
    return None


def _torch_archive_problem(path: Path, head: bytes) -> str | None:
    if head.startswith(b"\x80"):
        return None  # a legacy (pre-1.6) pickle: no checksums to verify
    if not zipfile.is_zipfile(path):
        return "corrupt or truncated: not a PyTorch archive"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"corrupt or truncated: {error}"
    return f"corrupt: {damaged} fails its checksum" if damaged else None
