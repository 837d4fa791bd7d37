#!/usr/bin/env python3
"""Finishes the OCI archive that `buildah push ... oci-archive:` writes, so that `docker load` keeps
everything the Dockerfile says:

    python3 docker/oci_archive.py ARCHIVE INSPECT_JSON NAME:TAG

- The health check. The OCI image config has no HEALTHCHECK field, and containers/image drops it
  when it converts the image to OCI. Docker's own OCI exporter (BuildKit) keeps Docker's
  `Healthcheck` in the config, and `docker load` reads it there: it is put back, from
  `buildah inspect --type image` (INSPECT_JSON), which has the Docker form of the image.
- `manifest.json`, the index of `docker save` archives, beside the OCI layout's `index.json`,
  pointing at the same blobs (what `docker save` itself writes since Docker 25). Engines that read
  only one of the two find theirs; `podman load` reads the OCI layout.
- The name: `org.opencontainers.image.ref.name` (OCI) and `io.containerd.image.name` (containerd,
  and Docker's containerd image store), and `RepoTags` in manifest.json.

Every other blob, the layers included, is copied unchanged; the archive is rewritten in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _blob_name(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def finish(archive: Path, inspect: dict, reference: str) -> None:
    with tarfile.open(archive) as source:
        index = json.load(source.extractfile("index.json"))
        (entry,) = index["manifests"]
        manifest = json.load(source.extractfile(_blob_name(entry["digest"])))
        config = json.load(source.extractfile(_blob_name(manifest["config"]["digest"])))
        replaced = {"index.json", "manifest.json", _blob_name(entry["digest"]), _blob_name(manifest["config"]["digest"])}
        docker = inspect["Docker"]["config"]
        for name in ("Env", "Cmd", "User", "WorkingDir"):
            assert config["config"].get(name) == docker.get(name), f"{name}: the archive is not this image"
        if docker.get("Healthcheck"):
            config["config"]["Healthcheck"] = docker["Healthcheck"]

        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        manifest["config"] = {"mediaType": OCI_CONFIG, "digest": _digest(config_bytes), "size": len(config_bytes)}
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        name, _, tag = reference.rpartition(":")
        full_name = name if "/" in name else f"docker.io/library/{name}"
        entry.update(digest=_digest(manifest_bytes), size=len(manifest_bytes), annotations={
            "org.opencontainers.image.ref.name": reference,
            "io.containerd.image.name": f"{full_name}:{tag}",
        })
        docker_index = [{
            "Config": _blob_name(manifest["config"]["digest"]),
            "RepoTags": [reference],
            "Layers": [_blob_name(layer["digest"]) for layer in manifest["layers"]],
        }]

        partial = archive.with_name(archive.name + ".finishing")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as out:
            for member in source:
                if member.name in replaced:
                    continue
                out.addfile(member, source.extractfile(member) if member.isfile() else None)
            _add(out, _blob_name(manifest["config"]["digest"]), config_bytes)
            _add(out, _blob_name(entry["digest"]), manifest_bytes)
            _add(out, "index.json", json.dumps(index, separators=(",", ":")).encode())
            _add(out, "manifest.json", json.dumps(docker_index, separators=(",", ":")).encode())
    os.replace(partial, archive)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    archive, inspect, reference = Path(argv[0]), json.loads(Path(argv[1]).read_text()), argv[2]
    finish(archive, inspect, reference)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
