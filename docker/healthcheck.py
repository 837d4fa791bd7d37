#!/usr/bin/env python3
"""Container HEALTHCHECK for the imagetag images (standard library only; slim images have no curl).

    imagetag-healthcheck [gateway|worker|auto]

gateway: GET /readyz on IMAGETAG_PORT (8080), over HTTPS when IMAGETAG_TLS_CERTFILE is set:
         healthy once the models are loaded (or, with remote inference, a worker is alive).
worker:  GET /readyz on IMAGETAG_METRICS_PORT (9100): healthy while the worker's models are
         loaded and Redis answers.
Readiness, not liveness: a container that is up but cannot serve is not healthy.
Both on IMAGETAG_HOST, or on 127.0.0.1 where that is a wildcard address.
auto (the default): `worker` when the container's main process is `imagetag worker`, else
`gateway`, so one image's HEALTHCHECK fits both commands.

Exit 0 on HTTP 200, 1 otherwise (Docker's healthy / unhealthy), 2 on a usage error.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from pathlib import Path

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
TIMEOUT_S = 4.0  # under the images' HEALTHCHECK --timeout


def target(mode: str, environ: dict[str, str]) -> str:
    # Both commands listen on IMAGETAG_HOST: reach a wildcard address through loopback.
    host = environ.get("IMAGETAG_HOST", "")
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if mode == "worker":
        return f"http://{host}:{environ.get('IMAGETAG_METRICS_PORT') or '9100'}/readyz"
    scheme = "https" if environ.get("IMAGETAG_TLS_CERTFILE") else "http"
    return f"{scheme}://{host}:{environ.get('IMAGETAG_PORT') or '8080'}/readyz"


def main_process_is_worker(cmdline: Path = Path("/proc/1/cmdline")) -> bool:
    """PID 1 is `imagetag worker` (`python -m service.cli worker`, or an init such as docker-init
    running either)."""
    try:
        words = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    names = [Path(word.decode(errors="replace")).name for word in words]
    return any(
        name in {"imagetag", "service.cli"} and names[i + 1 : i + 2] == ["worker"] for i, name in enumerate(names)
    )


def check(url: str, timeout_s: float) -> tuple[bool, str]:
    # Loopback only: no proxy (a proxy set for the app must not see its own health checks) and
    # no certificate check (the gateway's certificate names its public host, not 127.0.0.1).
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout_s) as response:
            return response.status == 200, f"{url}: HTTP {response.status}"
    except Exception as error:  # anything at all means unhealthy
        return False, f"{url}: {error}"


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    mode = args[0] if args else "auto"
    if len(args) > 1 or mode not in {"gateway", "worker", "auto"}:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    if mode == "auto":
        mode = "worker" if main_process_is_worker() else "gateway"
    healthy, detail = check(target(mode, environ), TIMEOUT_S)
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
