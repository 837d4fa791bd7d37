"""What is running: the package's version and the digests of the model weights it serves with.

Both travel with every answer (the `X-Imagetag-Version` and `X-Imagetag-Models` headers) and in
the `imagetag_build_info` metric, so that a result can be traced to the weights that made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inference.files import file_sha256
from service.settings import Settings
from service.weights import packaged_classifier

VERSION_HEADER = "X-Imagetag-Version"
MODELS_HEADER = "X-Imagetag-Models"


def version() -> str:
    try:
        return metadata.version("imagetag")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def weights_digests(settings: Settings) -> str:
    """`detector=sha256:HEX,...,classifier=sha256:HEX` of the configured weights, in the order the
    models use them; a file that cannot be read is named `unreadable` (the preflight says why)."""
    classifier = settings.classifier_weights or packaged_classifier()
    parts = [("detector", path) for path in settings.detector_weights]
    parts += [("classifier", classifier)] if classifier is not None else []
    return ",".join(f"{role}={_digest(path)}" for role, path in parts)


def _digest(path: Path) -> str:
    try:
        if path.is_dir():  # an OpenVINO export: every file in it, in a fixed order
            return "sha256:" + _tree_sha256(path)
        return "sha256:" + file_sha256(path)
    except OSError:
        return "unreadable"


def _tree_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


class BuildInfo(Collector):
    """A constant 1 whose labels say what runs; read at each scrape, as remote workers may change."""

    def __init__(self, version: str, models: Callable[[], str]) -> None:
        self.version = version
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "imagetag_build_info", "The version, and the digests of the model weights that answer",
            labels=["version", "models"],
        )
        info.add_metric([self.version, self.models()], 1.0)
        yield info
