"""The GPU run, one command: every figure issue 9's targets name, measured together and checked.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/gpu_benchmark.py
    ... load-tests/gpu_benchmark.py --quick           # the CPU dry run: every part, small sizes

1. ceilings, in a process of their own (`gpu_pipeline.py --json`): the two models alone on
   batches already on the device (the compute ceiling), and `DevicePipeline.predict` from JPEG
   bytes in memory (the in-process pipeline ceiling);
2. the service over HTTP at each concurrency: `embedded` (`imagetag serve`, the models in the
   process) and `N gateways` (`imagetag serve --processes N` with `IMAGETAG_INFERENCE=remote`,
   one `imagetag worker`, or with `--workers 2` two sharing the GPU, a redis-server of their
   own); a closed loop of base64 photos from `tests/photos`, split over as many load-generator
   processes as it takes (`--generators`), each reporting its CPU so that a saturated client
   shows;
3. the naive app (`naive_app.py`) at a few concurrencies.

Sampled throughout: GPU utilisation and memory (NVML, else `nvidia-smi`; absent on a CPU), the
resident memory of the process holding the models and of each gateway process, the CPU of the
server, of its HTTP processes per image answered (for `embedded` that includes the models), of
the load generators, and of the models' process's event loop and busiest thread. Prints a table
and the targets met or missed, and writes `results/gpu_benchmark.json` and `.md` under
`load-tests/` (or `--out`), after every part, so that a run cut short leaves what it measured. A
full run should take about 6 minutes on one H200 with 16 cores (the second try there, with fewer
points, took 153 s), and `--budget` skips the points left past it; `--quick` takes about 55 s on
the 2-core development machine. README "On a GPU" has the command for the lent machine, with
`gpu_carry.sh` to prepare what it lacks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from benchmark import (
    REPO,
    RESULTS,
    LoadGenerators,
    ProcessTree,
    Service,
    request_bodies,
    serve_embedded,
    serve_naive,
    serve_with_workers,
    service_env,
    spawn,
    stop,
    wait_ready,
)

FULL_CONCURRENCY = [1, 4, 8, 16, 32, 64, 128, 256]
# A generator process near one full core is the limit, not the service.
SATURATED_CPU = 0.85
# Throughput measured at a higher concurrency may be this much under the best below it and still
# count as not falling: two runs of one point differ by about that much.
NOISE = 0.05


@dataclass
class Ceiling:
    stage: str
    batch_size: int
    images_per_s: float
    median_batch_ms: float
    peak_gpu_mb: float | None = None


@dataclass
class Point:
    config: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu: float  # cores, every process of the configuration
    gateway_cpu_ms: float  # CPU the HTTP processes spent per image answered: N of them serve N / this images/s
    models_rss_mb: float  # the largest process holding the models
    models_loop_cpu: float  # cores: that process's main thread, its event loop (HTTP embedded, Redis in a worker)
    models_busiest_thread_cpu: float  # cores: its busiest thread; near 1 that thread, or the GIL, is the wall
    gateway_rss_mb: float  # the largest HTTP process
    generators: int
    generator_cpu: float  # the busiest load-generator process, in cores
    gpu_util_mean: float | None
    gpu_util_max: float | None
    gpu_memory_mb: float | None  # peak memory used on the GPU, all processes


@dataclass
class Target:
    what: str
    figure: str
    met: bool | None  # None: not measured in this run


@dataclass
class Report:
    machine: str
    command: str
    device: str = ""
    gpu: str | None = None
    gpu_sampler: str | None = None
    ceilings: list[Ceiling] = field(default_factory=list)
    fusion_ms_per_image: float | None = None
    breakdown: dict | None = None  # the pipeline's steps on one batch of the largest size (gpu_pipeline.py)
    new_shape_ms: dict | None = None  # both networks on a shape never met: the first call, then again
    points: list[Point] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class GpuSampler:
    """GPU 0's utilisation (% of time a kernel ran) and memory in use, every 0.2 s, in a thread:
    through NVML when `pynvml` imports, else `nvidia-smi`; neither (a CPU machine): `source` None."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # monotonic time, util %, memory MB
        self._stop = threading.Event()
        self._smi: subprocess.Popen | None = None
        self.source = self._open()
        if self.source:
            threading.Thread(target=self._run, daemon=True).start()

    def _open(self) -> str | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), used

            self._read = read
            return "NVML"
        except Exception:  # no pynvml, no driver, no GPU: try the command line
            pass
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            return "nvidia-smi"
        return None

    def _run(self) -> None:
        if self._smi is not None:
            for line in self._smi.stdout:
                try:
                    util, memory = (float(part) for part in line.split(","))
                except ValueError:
                    continue
                self.samples.append((time.monotonic(), util, memory))
            return
        while not self._stop.wait(0.2):
            self.samples.append((time.monotonic(), *self._read()))

    def between(self, start: float, end: float) -> tuple[float | None, float | None, float | None]:
        """Mean and max utilisation, and peak memory, of the samples in [start, end]."""
        window = [sample for sample in self.samples if start <= sample[0] <= end]
        if not window:
            return None, None, None
        utils = [util for _, util, _ in window]
        return sum(utils) / len(utils), max(utils), max(memory for _, _, memory in window)

    def close(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()


def ceilings(report: Report, args: argparse.Namespace, env: dict[str, str]) -> None:
    sys.path.insert(0, str(REPO))
    from service.settings import Settings

    settings = Settings()
    weights = settings.detector_weights[0]
    with tempfile.TemporaryDirectory() as scratch:
        out, log = Path(scratch) / "ceilings.json", Path(scratch) / "ceilings.log"
        process = spawn([sys.executable, str(REPO / "load-tests" / "gpu_pipeline.py"), "--weights", str(weights),
                         "--batch-sizes", args.batch_sizes, "--seconds", str(args.ceiling_seconds),
                         "--skip-reference", "--breakdown", args.batch_sizes.split(",")[-1],
                         "--replicas", str(settings.model_replicas), "--json", str(out)],
                        env, log)
        if process.wait() != 0:
            raise RuntimeError(f"gpu_pipeline.py failed:\n{log.read_text()[-3000:]}")
        result = json.loads(out.read_text())
    report.device, report.gpu = result["device"], result["gpu"]
    report.fusion_ms_per_image = result["fusion_ms_per_image"]
    report.breakdown = result["breakdown"]
    report.new_shape_ms = result.get("new_shape_ms")
    report.ceilings = [Ceiling(**row) for row in result["rows"]]
    for c in report.ceilings:
        peak = f", peak GPU {c.peak_gpu_mb:.0f} MB" if c.peak_gpu_mb is not None else ""
        print(f"  {c.stage:20} batch {c.batch_size:<4} {c.images_per_s:8.1f} img/s ({c.median_batch_ms:.1f} ms a batch"
              f"{peak})", flush=True)


def thread_cpu_seconds(processes: list[psutil.Process]) -> dict[tuple[int, int], float]:
    """CPU seconds of each thread of `processes`, by (pid, thread id); the main thread's id is the pid."""
    seconds = {}
    for process in processes:
        try:
            seconds |= {(process.pid, t.id): t.user_time + t.system_time for t in process.threads()}
        except psutil.NoSuchProcess:
            pass
    return seconds


def measure(config: str, service: Service, concurrency: int, args: argparse.Namespace, bodies: list[bytes],
            generators: LoadGenerators, gpu: GpuSampler) -> Point:
    generators.run(service.url, bodies, concurrency, args.warm_up)  # discarded
    with ProcessTree(service.processes) as tree, ProcessTree(service.models) as models, \
            ProcessTree(service.gateways) as gateways:
        models_processes = [psutil.Process(p.pid) for p in service.models]
        cpu_before, gateway_before, started = tree.cpu_seconds(), gateways.cpu_seconds(), time.monotonic()
        threads_before = thread_cpu_seconds(models_processes)
        load = generators.run(service.url, bodies, concurrency, args.duration)
        threads = {key: seconds - threads_before.get(key, 0.0)
                   for key, seconds in thread_cpu_seconds(models_processes).items()}
        cpu = (tree.cpu_seconds() - cpu_before) / load.elapsed_s
        loop_cpu = max((seconds for (pid, tid), seconds in threads.items() if pid == tid), default=0.0)
        gateway_cpu_ms = 1000 * (gateways.cpu_seconds() - gateway_before) / max(1, len(load.latencies))
        util_mean, util_max, gpu_memory = gpu.between(started, time.monotonic())
    point = Point(config, concurrency, len(load.latencies) / load.elapsed_s, load.percentile_ms(0.5),
                  load.percentile_ms(0.99), len(load.latencies) + load.errors, load.errors, cpu, gateway_cpu_ms,
                  models.peak_process_rss / 2**20, loop_cpu / load.elapsed_s,
                  max(threads.values(), default=0.0) / load.elapsed_s, gateways.peak_process_rss / 2**20,
                  len(load.generator_cpu), max(load.generator_cpu), util_mean, util_max, gpu_memory)
    print("  " + ", ".join(f"{name} {value}" for name, value in zip(HEADER, row(point))), flush=True)
    return point


HEADER = ["configuration", "c", "images/s", "p50 ms", "p99 ms", "requests", "errors", "server CPU",
          "gateway CPU ms/image", "models RSS MB", "models loop / busiest thread, cores", "gateway RSS MB",
          "client processes (busiest CPU)", "GPU util % mean/max", "GPU MB"]


def row(p: Point) -> list[str]:
    util = f"{p.gpu_util_mean:.0f}/{p.gpu_util_max:.0f}" if p.gpu_util_mean is not None else "-"
    memory = f"{p.gpu_memory_mb:.0f}" if p.gpu_memory_mb is not None else "-"
    return [p.config, str(p.concurrency), f"{p.images_per_s:.1f}", f"{p.p50_ms:.1f}", f"{p.p99_ms:.1f}",
            str(p.requests), str(p.errors), f"{p.server_cpu:.2f}", f"{p.gateway_cpu_ms:.1f}", f"{p.models_rss_mb:.0f}",
            f"{p.models_loop_cpu:.2f} / {p.models_busiest_thread_cpu:.2f}", f"{p.gateway_rss_mb:.0f}",
            f"{p.generators} ({p.generator_cpu:.2f})", util, memory]


def best(ceilings: list[Ceiling], stage: str) -> Ceiling | None:
    """The fastest of `stage`'s rows, replicated or not ("pipeline from bytes, 2 replicas")."""
    rows = [c for c in ceilings if c.stage == stage or c.stage.startswith(f"{stage}, ")]
    return max(rows, key=lambda c: c.images_per_s, default=None)


def check_targets(report: Report, service_configs: list[str]) -> list[Target]:
    """Issue 9's targets (items 1, 3 and 5) on what this run measured."""
    targets: list[Target] = []
    pipeline = best(report.ceilings, "pipeline from bytes")
    compute = best(report.ceilings, "models alone")
    if compute:
        targets.append(Target("compute ceiling (models alone; no target)",
                              f"{compute.images_per_s:.0f} images/s at batch {compute.batch_size}", None))
    targets.append(Target("pipeline ceiling >= 2,000 images/s",
                          f"{pipeline.images_per_s:.0f} images/s at batch {pipeline.batch_size} ({pipeline.stage})"
                          if pipeline else
                          "not measured", pipeline.images_per_s >= 2000 if pipeline else None))
    for config in service_configs:
        points = [p for p in report.points if p.config == config]
        if not points:
            targets.append(Target(f"{config}: every target", "not measured", None))
            continue
        top = max(points, key=lambda p: p.images_per_s)
        targets.append(Target(f"{config}: >= 1,000 images/s over HTTP",
                              f"{top.images_per_s:.0f} images/s at concurrency {top.concurrency}",
                              top.images_per_s >= 1000))
        if pipeline:
            share = top.images_per_s / pipeline.images_per_s
            targets.append(Target(f"{config}: >= 70% of the pipeline ceiling", f"{share:.0%}", share >= 0.7))
        one = next((p for p in points if p.concurrency == 1), None)
        targets.append(Target(f"{config}: p50 at concurrency 1 <= 25 ms",
                              f"{one.p50_ms:.1f} ms" if one else "not measured", one.p50_ms <= 25 if one else None))
        errors = sum(p.errors for p in points)
        targets.append(Target(f"{config}: no errors", f"{errors} of {sum(p.requests for p in points)} requests",
                              errors == 0))
        falls = [(p.concurrency, p.images_per_s, max(q.images_per_s for q in points if q.concurrency < p.concurrency))
                 for p in points if any(q.concurrency < p.concurrency for q in points)]
        worst = min(falls, key=lambda f: f[1] / f[2], default=None)
        targets.append(Target(
            f"{config}: throughput never falls as concurrency rises (within {NOISE:.0%})",
            f"worst: {worst[1]:.1f} images/s at concurrency {worst[0]} against {worst[2]:.1f} below it"
            if worst else "one point only",
            all(now >= (1 - NOISE) * before for _, now, before in falls) if falls else None))
        ratio = max(points, key=lambda p: p.p99_ms / p.p50_ms)
        targets.append(Target(f"{config}: p99 under 3x p50 at every concurrency",
                              f"worst {ratio.p99_ms / ratio.p50_ms:.2f}x at concurrency {ratio.concurrency}",
                              all(p.p99_ms < 3 * p.p50_ms for p in points)))
        models_rss = max(p.models_rss_mb for p in points)
        targets.append(Target(f"{config}: GPU worker RSS <= 2 GB", f"{models_rss:.0f} MB", models_rss <= 2048))
        if config != "embedded":
            gateway_rss = max(p.gateway_rss_mb for p in points)
            targets.append(Target(f"{config}: each gateway process under 300 MB RSS", f"{gateway_rss:.0f} MB",
                                  gateway_rss < 300))
    service = [p for p in report.points if p.config != "naive"]
    busiest = max(service, key=lambda p: p.generator_cpu, default=None)
    if busiest:
        targets.append(Target(f"the load generators are not the limit (each under {SATURATED_CPU:.0%} of a core)",
                              f"busiest {busiest.generator_cpu:.2f} cores ({busiest.config}, concurrency "
                              f"{busiest.concurrency}, {busiest.generators} processes)",
                              busiest.generator_cpu < SATURATED_CPU))
    if service:
        loop = max(service, key=lambda p: p.models_busiest_thread_cpu)
        targets.append(Target("the busiest thread of the models' process (no target; near one core, it or the "
                              "GIL is the wall)",
                              f"{loop.models_busiest_thread_cpu:.2f} cores, the event loop {loop.models_loop_cpu:.2f} "
                              f"({loop.config}, concurrency {loop.concurrency})", None))
    memory = [p.gpu_memory_mb for p in report.points if p.gpu_memory_mb is not None]
    memory += [c.peak_gpu_mb for c in report.ceilings if c.peak_gpu_mb is not None]
    if memory:
        targets.append(Target("peak GPU memory (no target)", f"{max(memory):.0f} MB", None))
    return targets


def markdown(report: Report) -> str:
    device = (report.device or "not measured (no ceilings)") + (f" ({report.gpu})" if report.gpu else "")
    lines = [f"Machine: {report.machine}; device {device}; GPU sampled by {report.gpu_sampler or 'nothing (no GPU)'}.",
             f"Command: `{report.command}`.", "",
             "| stage | batch | images/s | ms per batch | peak GPU MB |", "|---|---|---|---|---|"]
    for c in report.ceilings:
        peak = f"{c.peak_gpu_mb:.0f}" if c.peak_gpu_mb is not None else "-"
        lines.append(f"| {c.stage} | {c.batch_size} | {c.images_per_s:.1f} | {c.median_batch_ms:.1f} | {peak} |")
    if report.fusion_ms_per_image is not None:
        lines += ["", f"Fusion alone: {report.fusion_ms_per_image:.3f} ms per image."]
    if report.new_shape_ms:
        lines += ["", f"Both networks on a shape never met before (batch 3, 544x640): the first call "
                  f"{report.new_shape_ms['first']:.1f} ms, the same call again {report.new_shape_ms['again']:.1f} ms."]
    if report.breakdown:
        lines += ["", f"The pipeline step by step, batch {report.breakdown['batch_size']} (median, synchronised after "
                  "each step):", "", "| step | ms per batch |", "|---|---|"]
        lines += [f"| {name} | {ms:.2f} |" for name, ms in report.breakdown["steps_ms"].items()]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(p)) + " |" for p in report.points]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    verdict = {True: "met", False: "**missed**", None: "-"}
    lines += [f"| {t.what} | {t.figure} | {verdict[t.met]} |" for t in report.targets]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU dry run: concurrency 1 and 4, 2 gateway processes, 2 load generators, 2 s a point, "
                        "batches 1 and 2")
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"default {FULL_CONCURRENCY}")
    parser.add_argument("--naive-concurrency", type=int, nargs="+", help="default 1 16 64")
    parser.add_argument("--duration", type=float, help="seconds a point (default 8)")
    parser.add_argument("--warm-up", type=float, help="seconds of discarded load before each point (default 2)")
    parser.add_argument("--batch-sizes", help="for the ceilings (default 32,128)")
    parser.add_argument("--ceiling-seconds", type=float, help="per stage and batch size (default 3)")
    parser.add_argument("--configs", nargs="+", default=["embedded", "gateways", "naive"],
                        choices=["embedded", "gateways", "naive"])
    parser.add_argument("--gateway-processes", type=int, nargs="+",
                        help="one `gateways` configuration for each (default half the cores, at least 2: a gateway "
                        "spent 4-5.5 ms of CPU an image on the H200's host)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="`imagetag worker` processes behind the gateways, one `gateways` configuration for each "
                        "count (default 1: one worker, its replicas on threads; 2 or more share the GPU as processes, "
                        "one replica each, should the models' process be bound by its GIL)")
    parser.add_argument("--generators", type=int,
                        help="load-generator processes, at most the concurrency (default a quarter of the cores)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"), help="for `gateways`")
    parser.add_argument("--skip-ceilings", action="store_true")
    parser.add_argument("--budget", type=float, default=600,
                        help="seconds: once past this, the points left are skipped (and said so); the results so far "
                        "are written after every configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = psutil.cpu_count()
    # The dry run takes every path the full run does: two generator processes, two gateways.
    sizes = {"concurrency": [1, 4], "naive_concurrency": [1], "duration": 2.0, "warm_up": 1.0, "batch_sizes": "1,2",
             "ceiling_seconds": 1.0, "gateway_processes": [2], "generators": 2} if args.quick else \
        {"concurrency": FULL_CONCURRENCY, "naive_concurrency": [1, 16, 64], "duration": 8.0, "warm_up": 2.0,
         "batch_sizes": "32,128", "ceiling_seconds": 3.0, "gateway_processes": [max(2, cores // 2)],
         "generators": max(1, cores // 4)}
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    started = time.monotonic()
    report = Report(
        machine=f"{platform.machine()}, {cores} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.processor() or platform.platform()}",
        command="load-tests/gpu_benchmark.py " + " ".join(sys.argv[1:]),
    )
    env = service_env(max(args.concurrency))
    gpu = GpuSampler()
    report.gpu_sampler = gpu.source
    try:
        if not args.skip_ceilings:
            print("ceilings (gpu_pipeline.py)", flush=True)
            try:
                ceilings(report, args, env)
            except RuntimeError as error:  # one try on a lent machine: the service is measured all the same
                print(error, file=sys.stderr)
                report.notes.append("the ceilings failed: " + str(error).splitlines()[-1])
            save(report, args.out)
        configs: list[tuple[str, list[int], object]] = []
        for config in args.configs:
            if config == "embedded":
                configs.append(("embedded", args.concurrency, serve_embedded))
            elif config == "naive":
                configs.append(("naive", args.naive_concurrency, serve_naive))
            elif not args.redis_server:
                report.notes.append("no redis-server (give --redis-server PATH): the gateways configuration was "
                                    "not measured")
            else:
                for n, workers in itertools.product(args.gateway_processes, args.workers):
                    name = f"{n} gateways" + (f", {workers} workers" if workers > 1 else "")
                    configs.append((name, args.concurrency, lambda workdir, env, n=n, workers=workers: serve_with_workers(
                        workdir, env, workers=workers, gateway_processes=n, redis_server=args.redis_server)))
        bodies = request_bodies()
        with tempfile.TemporaryDirectory() as scratch:
            for name, concurrencies, start in configs:
                print(name, flush=True)
                workdir = Path(scratch) / name.replace(" ", "-")
                workdir.mkdir()
                service = start(workdir, {**env, "IMAGETAG_DATA_DIR": str(workdir / "data")})
                try:
                    wait_ready(service.url, service.processes)
                    with LoadGenerators(min(args.generators, max(concurrencies))) as generators:
                        for concurrency in concurrencies:
                            if time.monotonic() - started > args.budget:
                                report.notes.append(f"{name} at concurrency {concurrency}: skipped, past the "
                                                    f"{args.budget:g} s budget")
                                continue
                            report.points.append(measure(name, service, concurrency, args, bodies, generators, gpu))
                except Exception as error:  # the next configuration is measured all the same
                    for log in sorted(workdir.glob("*.log")):
                        print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
                    report.notes.append(f"{name} failed: {error!r}")
                finally:
                    stop(service.processes)
                    save(report, args.out)
    finally:
        gpu.close()
    report.targets = check_targets(report, [name for name, _, _ in configs if name != "naive"])
    report.notes.append(f"run took {time.monotonic() - started:.0f} s")
    save(report, args.out)
    print(markdown(report))
    return 0


def save(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_benchmark.json").write_text(json.dumps(asdict(report), indent=2))
    (out / "gpu_benchmark.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
