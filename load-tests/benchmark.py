"""One command, one machine, one run: the models' ceiling, the service, and the naive baseline.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/benchmark.py

1. models alone: `TaggingEngine.predict` on decoded photos at several batch sizes (the ceiling,
   and the single-image latency);
2. the service end to end over HTTP: embedded (`imagetag serve`), and with two `imagetag worker`
   processes behind a gateway over Redis, at each concurrency;
3. the naive baseline (`naive_app.py`: the same models called once per request) at the same
   concurrencies.

Each configuration runs alone, as separate processes, with a closed-loop HTTP load of base64
photos from `tests/photos`. Reported: images/s, p50/p95/p99 latency, errors, CPU cores used by the
server processes and their peak resident memory. Writes `results/benchmark.json` and
`results/benchmark.md` under `load-tests/`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "photos"
RESULTS = REPO / "load-tests" / "results"
TAGGING = "/v1.0/image/tagging"


@dataclass
class Run:
    config: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_cores: float
    peak_rss_mb: float
    peak_process_rss_mb: float


@dataclass
class Ceiling:
    batch_size: int
    images_per_s: float
    median_batch_ms: float


@dataclass
class Report:
    machine: str
    command: str
    duration_s: float
    ceilings: list[Ceiling] = field(default_factory=list)
    single_image_ms: float = 0.0
    models_peak_rss_mb: float = 0.0
    runs: list[Run] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcessTree:
    """CPU seconds and peak resident memory of a set of processes and their children."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.roots = [psutil.Process(p.pid) for p in processes]
        self.peak_rss = 0
        self.peak_process_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def members(self) -> list[psutil.Process]:
        found = []
        for root in self.roots:
            try:
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.members():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            rss = 0
            for process in self.members():
                try:
                    resident = process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                rss += resident
                self.peak_process_rss = max(self.peak_process_rss, resident)
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> ProcessTree:
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(args, env={**os.environ, **env}, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(url: str, processes: list[subprocess.Popen], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a process exited before {url} was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def request_bodies() -> list[bytes]:
    return [
        json.dumps({"image": base64.b64encode(p.read_bytes()).decode(), "language": "en"}).encode()
        for p in sorted(PHOTOS.glob("*.jpg"))
    ]


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> tuple[list[float], int]:
    """`concurrency` clients, each sending its next request as soon as the last is answered. A
    request still unanswered `duration_s` after the end counts as an error, so that a stalled
    service cannot hold a run for long."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def user(offset: int) -> None:
            nonlocal errors
            index = offset
            while time.monotonic() < stop_at:
                body = bodies[index % len(bodies)]
                index += concurrency
                started = time.monotonic()
                try:
                    response = await client.post(TAGGING, content=body, headers={"Content-Type": "application/json"})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.monotonic() - started)
                else:
                    errors += 1

        users = [asyncio.create_task(user(i)) for i in range(concurrency)]
        _, unanswered = await asyncio.wait(users, timeout=2 * duration_s + 10)
        for task in unanswered:
            task.cancel()
        await asyncio.gather(*unanswered, return_exceptions=True)
    return latencies, errors + len(unanswered)


@dataclass
class Load:
    """What the load generators saw of one measurement."""

    latencies: list[float]
    errors: int
    elapsed_s: float
    generator_cpu: list[float]  # CPU cores each generator process used; near 1.0, it was the limit

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _generate_share(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                    start_at: float) -> tuple[list[float], int, float, float]:
    """One generator process's part, begun at the wall-clock `start_at` shared by all of them:
    latencies, errors, CPU seconds, wall seconds."""
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before, started = time.process_time(), time.monotonic()
    latencies, errors = asyncio.run(closed_loop(url, bodies, concurrency, duration_s))
    return latencies, errors, time.process_time() - cpu_before, time.monotonic() - started


class LoadGenerators:
    """`count` load-generator processes, kept for a whole configuration: a closed loop of `c`
    clients is split among them, so that the client is never the limit (each reports its CPU).
    With one, the load runs in this process, as it always did here."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = ProcessPoolExecutor(count, mp_context=get_context("spawn")) if count > 1 else None

    def run(self, url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> Load:
        shares = [concurrency // self.count + (i < concurrency % self.count) for i in range(self.count)]
        shares = [share for share in shares if share]
        if self._pool is None:
            parts = [_generate_share(url, bodies, concurrency, duration_s, time.time())]
        else:
            start_at = time.time() + 0.5  # every process begins together
            parts = list(self._pool.map(_generate_share, *zip(*[(url, bodies, share, duration_s, start_at)
                                                                 for share in shares])))
        elapsed = max(part[3] for part in parts)
        return Load([latency for part in parts for latency in part[0]], sum(part[1] for part in parts), elapsed,
                    [part[2] / part[3] for part in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> LoadGenerators:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure(config: str, url: str, processes: list[subprocess.Popen], concurrency: int, duration_s: float,
            bodies: list[bytes], generators: LoadGenerators) -> Run:
    generators.run(url, bodies, concurrency, min(3.0, duration_s))  # warm-up, discarded
    with ProcessTree(processes) as tree:
        cpu_before = tree.cpu_seconds()
        load = generators.run(url, bodies, concurrency, duration_s)
        cpu = (tree.cpu_seconds() - cpu_before) / load.elapsed_s
    run = Run(config, concurrency, len(load.latencies) / load.elapsed_s, load.percentile_ms(0.5),
              load.percentile_ms(0.95), load.percentile_ms(0.99), len(load.latencies) + load.errors, load.errors,
              cpu, tree.peak_rss / 2**20, tree.peak_process_rss / 2**20)
    print(f"  {config:10} c={concurrency:<3} {run.images_per_s:6.2f} img/s  p50 {run.p50_ms:7.1f} ms  "
          f"p99 {run.p99_ms:7.1f} ms  errors {load.errors}  cpu {cpu:4.2f}  rss {run.peak_rss_mb:6.0f} MB  "
          f"client cpu {max(load.generator_cpu):4.2f}", flush=True)
    return run


def models_alone(report: Report, duration_s: float, env: dict[str, str]) -> None:
    """Runs in a child process of its own, so its memory and threads stay out of the rest."""
    script = REPO / "load-tests" / "models_alone.py"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "models.json"
        process = spawn([sys.executable, str(script), "--duration", str(duration_s), "--out", str(out)], env,
                        Path(scratch) / "log")
        with ProcessTree([process]) as tree:
            process.wait()
        if process.returncode != 0:
            raise RuntimeError((Path(scratch) / "log").read_text()[-3000:])
        result = json.loads(out.read_text())
    report.ceilings = [Ceiling(**c) for c in result["ceilings"]]
    report.single_image_ms = result["single_image_ms"]
    report.models_peak_rss_mb = tree.peak_rss / 2**20
    for c in report.ceilings:
        print(f"  models    batch {c.batch_size:<3} {c.images_per_s:6.2f} img/s  ({c.median_batch_ms:.1f} ms a batch)")


@dataclass
class Service:
    """A configuration's processes: all of them are stopped at the end and measured."""

    url: str
    processes: list[subprocess.Popen]
    models: list[subprocess.Popen]  # those holding the models
    gateways: list[subprocess.Popen]  # the HTTP front (with the processes it spawns)


def serve_embedded(workdir: Path, env: dict[str, str]) -> Service:
    port = free_port()
    gateway = spawn([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, workdir / "embedded.log")
    return Service(f"http://127.0.0.1:{port}", [gateway], [gateway], [gateway])


def serve_with_workers(workdir: Path, env: dict[str, str], workers: int = 2, gateway_processes: int = 1,
                       redis_server: str = "redis-server") -> Service:
    """`workers` x `imagetag worker` behind `imagetag serve --processes gateway_processes`, over a
    redis-server of their own."""
    redis_port, port = free_port(), free_port()
    redis = spawn([redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"], {},
                  workdir / "redis.log")
    shared = {**env, "IMAGETAG_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "IMAGETAG_MASTER_KEY": "benchmark"}
    # Workers sharing a machine's cores split them: their torch threads, and one engine each, so
    # that two workers hold the two engines the embedded service does (two workers of two
    # replicas each gave 97 % of the throughput with 600 MB more on the 2-core machine:
    # against_commit.sh 2e8ccfb --configs embedded "2 workers" --concurrency 32).
    threads = (
        {"IMAGETAG_TORCH_THREADS": str(max(1, psutil.cpu_count() // workers)), "IMAGETAG_MODEL_REPLICAS": "1"}
        if workers > 1
        else {}
    )
    started = [
        spawn([sys.executable, "-m", "service.cli", "worker"],
              {**shared, **threads, "IMAGETAG_METRICS_PORT": str(free_port())}, workdir / f"worker{i}.log")
        for i in range(workers)
    ]
    gateway = spawn([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                     "--processes", str(gateway_processes)],
                    {**shared, "IMAGETAG_INFERENCE": "remote"}, workdir / "gateway.log")
    return Service(f"http://127.0.0.1:{port}", [redis, *started, gateway], started, [gateway])


def serve_naive(workdir: Path, env: dict[str, str]) -> Service:
    port = free_port()
    app = spawn([sys.executable, "-m", "uvicorn", "--app-dir", str(REPO / "load-tests"), "naive_app:app",
                 "--port", str(port), "--log-level", "warning"], env, workdir / "naive.log")
    return Service(f"http://127.0.0.1:{port}", [app], [app], [app])


def service_env(max_concurrency: int) -> dict[str, str]:
    """The inference path is what is measured: credentials and per-project limits are lifted (they
    have tests of their own), so that concurrency 32 is not refused by the cap of 10, and the
    queue holds every request in flight."""
    return {
        "IMAGETAG_AUTH_MODE": "none",
        "IMAGETAG_LOG_LEVEL": "warning",
        "IMAGETAG_RATE_LIMIT_PER_S": "100000",
        "IMAGETAG_RATE_LIMIT_BURST": "100000",
        "IMAGETAG_MAX_CONCURRENT_PER_PROJECT": "100000",
        "IMAGETAG_QUEUE_MAX": str(max(256, 2 * max_concurrency)),
    }


def markdown(report: Report) -> str:
    best = max(report.ceilings, key=lambda c: c.images_per_s)
    lines = [
        f"Machine: {report.machine}. Command: `{report.command}`. {report.duration_s:g} s per measurement.",
        "",
        f"Models alone (the ceiling): best {best.images_per_s:.2f} images/s at batch {best.batch_size}; "
        f"single image {report.single_image_ms:.1f} ms; peak memory {report.models_peak_rss_mb:.0f} MB.",
        "",
        "| configuration | concurrency | images/s | p50 ms | p95 ms | p99 ms | requests | errors | CPU cores | peak memory MB, all processes | largest process MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        lines.append(f"| {r.config} | {r.concurrency} | {r.images_per_s:.2f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
                     f"{r.p99_ms:.0f} | {r.requests} | {r.errors} | {r.cpu_cores:.2f} | {r.peak_rss_mb:.0f} | "
                     f"{r.peak_process_rss_mb:.0f} |")
    lines += ["", *targets(report)]
    return "\n".join(lines) + "\n"


def targets(report: Report) -> list[str]:
    best = max(c.images_per_s for c in report.ceilings)
    runs = {(r.config, r.concurrency): r for r in report.runs}
    checks = []
    for config in ("embedded", "2 workers"):
        top = runs.get((config, max(r.concurrency for r in report.runs)))
        naive = runs.get(("naive", top.concurrency)) if top else None
        one = runs.get((config, 1))
        if top:
            checks.append(f"- {config}: throughput at concurrency {top.concurrency} is {top.images_per_s / best:.0%} "
                          f"of the ceiling (target 85%)" + (f", {top.images_per_s / naive.images_per_s:.2f}x the naive "
                          "baseline (target 1.5x)" if naive else ""))
        if one:
            checks.append(f"- {config}: p50 at concurrency 1 is {one.p50_ms - report.single_image_ms:+.0f} ms from the "
                          "models' single-image latency (target within 20 ms)")
    errors = sum(r.errors for r in report.runs if r.config != "naive")
    service = [r for r in report.runs if r.config != "naive"]
    embedded = max((r.peak_rss_mb for r in service if r.config == "embedded"), default=0)
    largest = max(r.peak_process_rss_mb for r in service)
    checks.append(f"- errors: {errors} (target 0); peak memory: embedded {embedded:.0f} MB, largest single "
                  f"process of any configuration {largest:.0f} MB (target under 2048)")
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--configs", nargs="+", default=["embedded", "2 workers", "naive"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    args = parser.parse_args()

    env = service_env(max(args.concurrency))
    report = Report(
        machine=f"{platform.machine()}, {psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.processor() or platform.platform()}",
        command="IMAGETAG_DETECTOR_WEIGHTS=... .venv/bin/python load-tests/benchmark.py " + " ".join(sys.argv[1:]),
        duration_s=args.duration,
    )
    print("models alone", flush=True)
    models_alone(report, args.duration, env)
    bodies = request_bodies()
    starters = {"embedded": serve_embedded, "2 workers": serve_with_workers, "naive": serve_naive}
    with tempfile.TemporaryDirectory() as scratch:
        for config in args.configs:
            print(config, flush=True)
            service = starters[config](Path(scratch), {**env, "IMAGETAG_DATA_DIR": str(Path(scratch) / config)})
            try:
                wait_ready(service.url, service.processes)
                with LoadGenerators(args.generators) as generators:
                    for concurrency in args.concurrency:
                        report.runs.append(measure(config, service.url, service.processes, concurrency,
                                                   args.duration, bodies, generators))
            finally:
                stop(service.processes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(asdict(report), indent=2))
    (args.out / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
