"""The `imagetag` command: serve the API, tag local files, manage weights."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from service.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_TAG_BATCH = 8


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"IMAGETAG_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors(include_url=False)
        )
        print(f"imagetag: invalid settings: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.run(args, settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagetag", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP API (settings from IMAGETAG_* variables)")
    serve.add_argument("--host", help="address to listen on (IMAGETAG_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (IMAGETAG_PORT)")
    serve.add_argument("--certfile", type=Path, help="TLS certificate (PEM): serve HTTPS")
    serve.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker", help="serve inference jobs from Redis for remote gateways (needs IMAGETAG_REDIS_URL)"
    )
    worker.set_defaults(run=_worker)

    tag = commands.add_parser("tag", help="tag image files or folders; one JSON line per image")
    tag.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    tag.add_argument("--lang", choices=("zh", "en"), default="zh")
    tag.add_argument("--threshold", type=float, default=60.0, help="0..100 (default 60)")
    tag.add_argument("--limit", type=int, default=50, help="1..150 (default 50)")
    tag.set_defaults(run=_tag)

    weights = commands.add_parser("weights", help="official weights: list or fetch")
    weights_commands = weights.add_subparsers(required=True, metavar="ACTION")
    weights_commands.add_parser("list", help="show the manifest").set_defaults(run=_weights_list)
    fetch = weights_commands.add_parser("fetch", help="download and verify weights by name")
    fetch.add_argument("name")
    fetch.add_argument("--dir", type=Path, help="destination (default IMAGETAG_WEIGHTS_DIR)")
    fetch.set_defaults(run=_weights_fetch)

    from service.admin import add_commands

    add_commands(commands)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from inference.batching import BatchingConfig, BatchingInference
    from service.app import create_app
    from service.assembly import ConfigurationError, build_backends
    from service.metrics import Metrics

    overrides = {
        "host": args.host,
        "port": args.port,
        "tls_certfile": args.certfile,
        "tls_keyfile": args.keyfile,
    }
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if bool(settings.tls_certfile) != bool(settings.tls_keyfile):
        print("imagetag: HTTPS needs both a certificate and a key", file=sys.stderr)
        return 2
    if settings.inference == "remote" and not settings.redis_url:
        print("imagetag: IMAGETAG_INFERENCE=remote needs IMAGETAG_REDIS_URL", file=sys.stderr)
        return 2
    try:
        backends = build_backends(settings)
    except ConfigurationError as error:
        print(f"imagetag: {error}", file=sys.stderr)
        return 2
    if settings.auth_mode == "none":
        logging.getLogger("imagetag").warning(
            "IMAGETAG_AUTH_MODE=none: every request is accepted without credentials; "
            "use this only on a trusted network"
        )
    batching = BatchingConfig(
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_s,
        max_queue=settings.queue_max,
        default_timeout_s=settings.request_timeout_s,
        replicas=settings.model_replicas,
    )
    if settings.inference == "remote":
        from inference.remote import RemoteInference

        assert backends.redis is not None  # built from IMAGETAG_REDIS_URL, checked above
        remote = RemoteInference(
            backends.redis, queue_max=settings.queue_max, default_timeout_s=settings.request_timeout_s
        )
        inference, metrics = remote, Metrics.from_settings(settings, workers_alive=lambda: remote.workers_alive)
    else:
        metrics = Metrics.from_settings(settings)
        inference = BatchingInference(lambda: _build_engine(settings), batching, on_batch=metrics.observe_batch)
    app = create_app(settings, inference, backends, metrics)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        log_level=settings.log_level,
    )
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("imagetag: `imagetag worker` needs IMAGETAG_REDIS_URL", file=sys.stderr)
        return 2
    import asyncio

    from inference.detector import DetectorLoadError
    from inference.worker import Worker, WorkerConfig, run_until_signalled
    from service.assembly import redis_client
    from service.worker_metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.serve(settings.host, settings.metrics_port)
    config = WorkerConfig(
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_s,
        heartbeat_s=settings.worker_heartbeat_s,
        visibility_timeout_s=settings.job_visibility_timeout_s,
    )

    async def work() -> None:
        client = redis_client(settings)
        try:
            await run_until_signalled(Worker(client, lambda: _build_engine(settings), config, metrics))
        finally:
            await client.aclose()

    try:
        asyncio.run(work())
    except DetectorLoadError as error:
        print(f"imagetag: {error}", file=sys.stderr)
        return 1
    return 0


def _build_engine(settings: Settings):
    from inference.engine import TaggingEngine

    return TaggingEngine.build(settings.engine_config())


def _tag(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from inference.detector import DetectorLoadError
    from inference.engine import ModelError
    from service.errors import ServiceError, status_and_code
    from service.images import ImageRules, load_image
    from service.tagging import render

    if not 0 <= args.threshold <= 100 or not 1 <= args.limit <= 150:
        print("imagetag: --threshold must be 0..100 and --limit 1..150", file=sys.stderr)
        return 2
    files = list(_image_files(args.paths))
    if not files:
        print("imagetag: no JPG, PNG, BMP or WEBP files found", file=sys.stderr)
        return 2
    try:
        engine = _build_engine(settings)
    except DetectorLoadError as error:
        print(f"imagetag: {error}", file=sys.stderr)
        return 1
    rules = ImageRules(settings.min_image_side, settings.max_image_side)
    failures = 0
    with tqdm(total=len(files), unit="image", disable=len(files) < 2, file=sys.stderr) as progress:
        for start in range(0, len(files), _TAG_BATCH):
            batch, images = files[start : start + _TAG_BATCH], []
            lines: dict[Path, dict] = {}
            for path in batch:
                try:
                    images.append((path, load_image(path.read_bytes(), rules)))
                except ServiceError as error:
                    lines[path] = _error_line(path, status_and_code(error)[1], error.message)
                except OSError as error:
                    lines[path] = _error_line(path, "AIS.0506", f"cannot read file: {error.strerror}")
            results = engine.predict([image for _, image in images]) if images else []
            for (path, _), result in zip(images, results):
                if isinstance(result, ModelError):
                    lines[path] = _error_line(path, "AIS.0505", str(result))
                    continue
                response = render(result, language=args.lang, threshold=args.threshold, limit=args.limit)
                lines[path] = {"file": str(path), **response.model_dump()}
            for path in batch:
                failures += "error_code" in lines[path]
                print(json.dumps(lines[path], ensure_ascii=False), flush=True)
            progress.update(len(batch))
    return 1 if failures else 0


def _error_line(path: Path, code: str, message: str) -> dict:
    return {"file": str(path), "error_code": code, "error_msg": message}


def _image_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def _weights_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.weights import read_manifest

    for entry in read_manifest(settings.weights_dir / "manifest.toml").values():
        present = "present" if (settings.weights_dir / entry.file).exists() else "-"
        print(f"{entry.name:20} {entry.kind:10} {entry.license:12} {present:8} {entry.description}")
    return 0


def _weights_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from service.weights import FetchError, fetch, read_manifest

    manifest = read_manifest(settings.weights_dir / "manifest.toml")
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
