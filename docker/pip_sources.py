#!/usr/bin/env python3
"""This machine's pip configuration, for a container build that must install from the same sources.

    python3 docker/pip_sources.py OUT_DIR

Writes OUT_DIR/pip.conf: pip's effective settings here (its configuration files and PIP_*
variables, merged as pip merges them, variables last) in one [global] section, and prints one
host path per line that those settings read: find-links folders, `file://` indexes (the folder
above each index root, where such mirrors keep their files), constraint files and CA bundles.

docker/build-local.sh bind-mounts the file at /etc/pip.conf and every path at the same place,
read-only, into each RUN of the build, so they never land in a layer. Remote indexes (PyPI) need
nothing: the build's RUN steps share the host's network.
"""

from __future__ import annotations

import configparser
import io
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# Settings that name local files or folders, and how many of them a value holds.
PATH_KEYS = {"find-links", "constraint", "requirement", "cert", "client-cert"}
URL_KEYS = {"index-url", "extra-index-url"}
# Settings of the host that make no sense in a build (or would break it).
DROPPED = {"user", "target", "prefix", "root", "src", "cache-dir", "log", "require-virtualenv"}


def effective_settings(listing: str) -> dict[str, str]:
    """`pip config list` output -> one value per key: [global] first, then [install], then the
    environment (pip's own order of precedence)."""
    order = {"global": 0, "install": 1, ":env:": 2}
    found: list[tuple[int, str, str]] = []
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section in order and key and key not in DROPPED:
            found.append((order[section], key, value.strip().strip("'\"")))
    return {key: value for _, key, value in sorted(found, key=lambda item: item[0])}


def local_paths(settings: dict[str, str]) -> list[Path]:
    paths: set[Path] = set()
    for key, value in settings.items():
        for word in value.split():
            if key in URL_KEYS or word.startswith("file:"):
                url = urlparse(word)
                if url.scheme != "file":
                    continue
                path = Path(unquote(url.path))
                # a PEP 503 index root (.../simple) links to files beside it (../../files/...)
                paths.add(path.parent if key in URL_KEYS else path)
            elif key in PATH_KEYS and word.startswith("/"):
                paths.add(Path(word))
    return sorted(p for p in paths if p.exists())


def render(settings: dict[str, str]) -> str:
    config = configparser.ConfigParser(interpolation=None)
    config["global"] = settings
    out = io.StringIO()
    config.write(out)
    return "# pip settings of the build machine, mounted read-only during the build only\n" + out.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings = effective_settings(listing)
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pip.conf").write_text(render(settings))
    for path in local_paths(settings):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
