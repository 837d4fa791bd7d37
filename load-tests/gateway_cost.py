"""What a gateway process costs per request: its CPU, with the models taken out of the way.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/gateway_cost.py

At GPU rates the gateways' CPU decides how many cores one GPU needs in front of it. Measured
here apart from the models: one real `imagetag serve --processes 1` gateway (`IMAGETAG_INFERENCE=
remote`) on a redis-server of its own, a real `Worker` in this process answering from the real
pipeline's answers computed beforehand (as `worker_loop.py` does), and a closed loop of base64
photos from generator processes of their own. Prints the gateway's CPU per request (its process
tree, user and system) and the requests answered per second, per run.

    ... load-tests/gateway_cost.py --against d88e0e0

adds the gateway of an earlier commit (a git worktree, this checkout's .venv) on the same Redis
and worker, measured in turns with this one, so that both see the same machine at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from redis.asyncio import Redis

from benchmark import PHOTOS, REPO, LoadGenerators, ProcessTree, free_port, request_bodies, service_env, spawn, stop, \
    wait_ready
from worker_loop import AnswersComputedBefore, answering_from


class WorkerThread:
    """A real worker on its own event loop in a thread of this process, answering from `engine`."""

    def __init__(self, url: str, engine: AnswersComputedBefore, batch: int) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(url, engine, batch),), daemon=True)

    async def _serve(self, url: str, engine: AnswersComputedBefore, batch: int) -> None:
        client = Redis.from_url(url)
        self._loop = asyncio.get_running_loop()
        self._worker = answering_from(engine, client, batch)
        self._ready.set()
        await self._worker.run()
        await client.aclose()

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._worker.stop)
        self._thread.join(timeout=10)


@contextlib.contextmanager
def checkout(commit: str):
    """A worktree of `commit`, removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / commit
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes")
    parser.add_argument("--batch", type=int, default=64, help="the worker's IMAGETAG_BATCH_MAX_SIZE")
    parser.add_argument("--against", metavar="COMMIT", help="also measure this commit's gateway, in turns")
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    engine = AnswersComputedBefore(photos, args.batch)
    bodies = request_bodies()
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as trees:
        workdir = Path(scratch)
        sources = {"now": REPO} | ({f"at {args.against}": trees.enter_context(checkout(args.against))}
                                   if args.against else {})
        redis = spawn(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], {},
                      workdir / "redis.log")
        env = {**service_env(args.concurrency), "IMAGETAG_REDIS_URL": redis_url, "IMAGETAG_MASTER_KEY": "benchmark",
               "IMAGETAG_INFERENCE": "remote", "IMAGETAG_DATA_DIR": str(workdir / "data")}
        gateways: dict[str, tuple[str, subprocess.Popen]] = {}
        for name, tree in sources.items():
            port = free_port()
            gateways[name] = (f"http://127.0.0.1:{port}", spawn(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--processes", "1"],
                {**env, "PYTHONPATH": str(tree)}, workdir / f"gateway{len(gateways)}.log", cwd=tree))
        try:
            time.sleep(0.5)
            with WorkerThread(redis_url, engine, args.batch), LoadGenerators(args.generators) as generators:
                for url, gateway in gateways.values():
                    wait_ready(url, [gateway])
                    generators.run(url, bodies, args.concurrency, 3.0)  # warm-up, discarded
                print(f"{psutil.cpu_count()} cores, concurrency {args.concurrency}, {args.generators} generator "
                      f"processes, {args.duration:g} s a run", flush=True)
                per_request: dict[str, list[float]] = {name: [] for name in gateways}
                for _ in range(args.runs):
                    for name, (url, gateway) in gateways.items():
                        with ProcessTree([gateway]) as tree:
                            before = tree.cpu_seconds()
                            load = generators.run(url, bodies, args.concurrency, args.duration)
                            cpu = tree.cpu_seconds() - before
                        answered = len(load.latencies)
                        per_request[name].append(1000 * cpu / max(1, answered))
                        print(f"{name:>12}: {answered} requests, {load.errors} errors; the gateway's CPU "
                              f"{per_request[name][-1]:.2f} ms a request; {answered / load.elapsed_s:.0f} "
                              f"requests/s, p50 {load.percentile_ms(0.5):.1f} ms; generators' busiest "
                              f"{max(load.generator_cpu):.2f} cores", flush=True)
                for name, figures in per_request.items():
                    print(f"{name:>12}: median {statistics.median(figures):.2f} ms of gateway CPU a request")
        finally:
            stop([gateway for _, gateway in gateways.values()] + [redis])


if __name__ == "__main__":
    main()
