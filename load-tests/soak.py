"""A soak: mixed traffic for a set time against a real `imagetag serve`, with its memory watched.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/soak.py --minutes 10

Starts `imagetag serve` (IAM auth on a fresh embedded store, the dev credentials, one token; rate
limits raised so that the service, not the limiter, is what is soaked; 127.0.0.1 allowed for
`url`) and a file server on loopback for `url` requests. Then `--concurrency` closed-loop clients
each send requests drawn at random (seeded) from a mix of four kinds:

    valid    photos from tests/photos in base64, random language, limit and threshold; logins
    invalid  bad base64, not an image, a truncated JPEG, too small, bad limit, unknown field, not
             JSON, no token, a wrong token, an unknown path
    hostile  deeply nested JSON (in the body and in `image`), a 5,000-digit limit, a PNG whose
             header claims 50,000 px, a body over 12 MB, URLs to cloud metadata, a private address
             and a file
    url      a photo by URL; a URL that 404s; a URL to a text file

Every answer is held against what the contract gives that request (status and error code; 429
APIG.0308 and 503 AIS.0506 with Retry-After, overload, are always within it). Reported: per case
and kind the answers by status and code, the unexpected ones, 5xx outside the contract (any 5xx
but 503 AIS.0506), lost requests (no answer: a connection error or no reply within 60 s),
latency; /healthz latency sampled every second; the server's resident memory every 5 s and its
growth after warm-up (median of the last window over median of the first window after
warm-up). Writes load-tests/results/soak.json, prints a table, exits 1 when a target is missed:
0 5xx outside the contract, 0 lost, RSS growth after warm-up under 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "photos"
RESULTS = REPO / "load-tests" / "results"
TAGGING = "/v1.0/image/tagging"
CLIENT_TIMEOUT_S = 60.0
RSS_EVERY_S = 5.0
OVERLOAD = {(429, "APIG.0308"), (503, "AIS.0506")}
TARGET_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    weight: float
    expected: frozenset[tuple[int, str | None]]
    build: Callable[[Traffic, random.Random], Request]


@dataclass(frozen=True)
class Request:
    path: str
    content: bytes
    headers: dict[str, str]
    method: str = "POST"


@dataclass
class Tally:
    answers: Counter = field(default_factory=Counter)  # "status code" -> count
    unexpected: Counter = field(default_factory=Counter)
    outside_contract_5xx: int = 0
    lost: Counter = field(default_factory=Counter)  # exception name -> count
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = sorted(self.latencies_ms)
        return {
            "requests": sum(self.answers.values()) + sum(self.lost.values()),
            "answers": dict(self.answers.most_common()),
            "unexpected": dict(self.unexpected.most_common()),
            "outside_contract_5xx": self.outside_contract_5xx,
            "lost": sum(self.lost.values()),
            "lost_by_error": dict(self.lost),
            "p50_ms": round(_quantile(latencies, 0.5), 1),
            "p99_ms": round(_quantile(latencies, 0.99), 1),
        }

    def add(self, other: Tally) -> None:
        self.answers += other.answers
        self.unexpected += other.unexpected
        self.outside_contract_5xx += other.outside_contract_5xx
        self.lost += other.lost
        self.latencies_ms += other.latencies_ms


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Traffic:
    """What the requests are made of: credentials, photos and the file server's address."""

    def __init__(self, token: str, files_url: str) -> None:
        self.token = token
        self.files_url = files_url
        self.photos = [base64.b64encode(p.read_bytes()).decode() for p in sorted(PHOTOS.glob("*.jpg"))]
        self.truncated_jpeg = base64.b64encode((PHOTOS / "bus.jpg").read_bytes()[:3000]).decode()
        self.too_small = base64.b64encode(_png(Image.new("RGB", (10, 10), (200, 30, 30)))).decode()
        self.claims_50000_px = base64.b64encode(_png_claiming(50_000, 50_000)).decode()
        self.login: bytes = b""

    def tagging(self, body: object, *, token: str | None = None, raw: bytes | None = None) -> Request:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Auth-Token"] = token
        return Request(TAGGING, raw if raw is not None else json.dumps(body).encode(), headers)

    def authed(self, body: object = None, raw: bytes | None = None) -> Request:
        return self.tagging(body, token=self.token, raw=raw)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A real 16 px PNG whose header (CRC fixed up) claims `width` x `height`: a bomb's signature."""
    data = bytearray(_png(Image.new("L", (16, 16))))
    ihdr = 8 + 4  # signature, then the IHDR chunk's length
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 4 + 13]))
    data[ihdr + 4 + 13 : ihdr + 4 + 17] = struct.pack(">I", crc)
    return bytes(data)


def _photo(traffic: Traffic, rng: random.Random) -> Request:
    return traffic.authed({"image": rng.choice(traffic.photos), "language": rng.choice(["zh", "en"]),
                           "limit": rng.randint(1, 50), "threshold": rng.choice([30.0, 60, 80.5])})


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_JSON = {(400, "AIS.0014"), (400, "AIS.0501")}  # unparsable, or parsed and of the wrong type


def cases() -> list[Case]:
    def case(name: str, kind: str, weight: float, expected: set, build: Callable) -> Case:
        return Case(name, kind, weight, frozenset(expected), build)

    return [
        case("photo", "valid", 45, {(200, None)}, _photo),
        case("login", "valid", 1, {(201, None)}, lambda t, r: Request("/v3/auth/tokens", t.login,
                                                                       {"Content-Type": "application/json"})),
        case("bad_base64", "invalid", 2, {(400, "AIS.0501")}, lambda t, r: t.authed({"image": "!!not base64!!"})),
        case("not_an_image", "invalid", 2, {(400, "AIS.0502")},
             lambda t, r: t.authed({"image": base64.b64encode(b"hello, world " * 40).decode()})),
        case("truncated_jpeg", "invalid", 2, {(400, "AIS.0503")}, lambda t, r: t.authed({"image": t.truncated_jpeg})),
        case("too_small", "invalid", 2, {(400, "AIS.0504")}, lambda t, r: t.authed({"image": t.too_small})),
        case("bad_limit", "invalid", 2, {(400, "AIS.0501")},
             lambda t, r: t.authed({"image": t.too_small, "limit": 0})),
        case("unknown_field", "invalid", 2, {(400, "AIS.0012")},
             lambda t, r: t.authed({"image": t.too_small, "colour": "red"})),
        case("not_json", "invalid", 2, {(400, "AIS.0014")}, lambda t, r: t.authed(raw=b"image=abc&limit=3")),
        case("no_token", "invalid", 2, {(401, "ModelArts.4101")}, lambda t, r: t.tagging({"image": t.too_small})),
        case("wrong_token", "invalid", 2, {(401, "APIG.0301")},
             lambda t, r: t.tagging({"image": t.too_small}, token="MII" + "x" * 200)),
        case("unknown_path", "invalid", 2, {(404, "APIG.0101")},
             lambda t, r: Request("/v1.0/image/tagging-x", b"{}", {"X-Auth-Token": t.token})),
        case("deep_array", "hostile", 2, BAD_JSON, lambda t, r: t.authed(raw=_nested(100_000))),
        case("deep_image", "hostile", 2, BAD_JSON,
             lambda t, r: t.authed(raw=b'{"image": ' + _nested(50_000) + b"}")),
        case("long_limit", "hostile", 2, BAD_JSON,
             lambda t, r: t.authed(raw=b'{"image": "%s", "limit": %s}' % (t.too_small.encode(), b"9" * 5000))),
        case("header_claims_50000_px", "hostile", 2, {(400, "AIS.0504")},
             lambda t, r: t.authed({"image": t.claims_50000_px})),
        case("body_over_12_mb", "hostile", 0.2, {(413, "APIG.0201")},
             lambda t, r: t.authed(raw=b'{"image": "' + b"A" * (13 * 2**20) + b'"}')),
        case("url_cloud_metadata", "hostile", 2, {(400, "ModelArts.4601")},
             lambda t, r: t.authed({"url": "http://169.254.169.254/latest/meta-data/"})),
        case("url_private", "hostile", 2, {(400, "ModelArts.4601")},
             lambda t, r: t.authed({"url": "http://10.0.0.1/photo.jpg"})),
        case("url_file", "hostile", 2, {(400, "ModelArts.4601")}, lambda t, r: t.authed({"url": "file:///etc/passwd"})),
        case("url_photo", "url", 10, {(200, None)},
             lambda t, r: t.authed({"url": f"{t.files_url}/{r.choice(['cat_chelsea.jpg', 'bus.jpg', 'coffee.jpg'])}",
                                    "language": "en"})),
        case("url_404", "url", 2, {(400, "ModelArts.4603")}, lambda t, r: t.authed({"url": f"{t.files_url}/none.jpg"})),
        case("url_text", "url", 2, {(400, "AIS.0502")}, lambda t, r: t.authed({"url": f"{t.files_url}/notes.txt"})),
    ]


async def send(client: httpx.AsyncClient, case: Case, request: Request, tally: Tally) -> None:
    started = time.monotonic()
    try:
        response = await client.request(request.method, request.path, content=request.content,
                                        headers=request.headers)
    except httpx.HTTPError as error:
        tally.lost[type(error).__name__] += 1
        return
    tally.latencies_ms.append((time.monotonic() - started) * 1000)
    code = None
    if response.status_code >= 400:
        try:
            code = response.json().get("error_code")
        except (ValueError, AttributeError):
            code = "not the contract's JSON"
    tally.answers[f"{response.status_code} {code or ''}".strip()] += 1
    answer = (response.status_code, code)
    if answer not in case.expected and answer not in OVERLOAD:
        tally.unexpected[f"{response.status_code} {code or ''}".strip()] += 1
    if response.status_code >= 500 and answer != (503, "AIS.0506"):
        tally.outside_contract_5xx += 1


async def clients(base_url: str, traffic: Traffic, concurrency: int, duration_s: float, seed: int,
                  tallies: dict[str, Tally]) -> None:
    mix = cases()
    weights = [c.weight for c in mix]
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:

        async def user(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                case = rng.choices(mix, weights)[0]
                await send(client, case, case.build(traffic, rng), tallies[case.name])

        await asyncio.gather(*(user(i) for i in range(concurrency)))


async def probe_healthz(base_url: str, stop: asyncio.Event, latencies_ms: list[float], failures: Counter) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await client.get("/healthz")
                if response.status_code != 200:
                    failures[str(response.status_code)] += 1
            except httpx.HTTPError as error:
                failures[type(error).__name__] += 1
            latencies_ms.append((time.monotonic() - started) * 1000)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


class RssSampler:
    """The server's resident memory (with any children) every RSS_EVERY_S, on a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.NoSuchProcess:
                return
            self.samples.append((round(time.monotonic() - self._started, 1), round(rss / 2**20, 1)))
            self._stop.wait(RSS_EVERY_S)


def rss_growth(samples: list[tuple[float, float]], warmup_s: float, window_s: float) -> dict:
    after = [(t, mb) for t, mb in samples if t >= warmup_s]
    if len(after) < 2:
        return {"growth": None, "baseline_mb": None, "end_mb": None}
    end_t = after[-1][0]
    first = [mb for t, mb in after if t < warmup_s + window_s] or [after[0][1]]
    last = [mb for t, mb in after if t > end_t - window_s] or [after[-1][1]]
    baseline, end = statistics.median(first), statistics.median(last)
    return {"growth": round(end / baseline - 1, 4), "baseline_mb": baseline, "end_mb": end,
            "peak_mb": max(mb for _, mb in samples), "window_s": window_s}


def serve_files(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def start_server(workdir: Path, port: int) -> tuple[subprocess.Popen, dict]:
    env = {
        **os.environ,
        "IMAGETAG_DATA_DIR": str(workdir / "data"),
        "IMAGETAG_AUTH_MODE": "iam",
        "IMAGETAG_URL_ALLOWED_NETWORKS": "127.0.0.1/32",
        "IMAGETAG_RATE_LIMIT_PER_S": "10000",
        "IMAGETAG_RATE_LIMIT_BURST": "10000",
        "IMAGETAG_MAX_CONCURRENT_PER_PROJECT": "1000",
    }
    credentials = subprocess.run([sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"],
                                 env=env, cwd=REPO, capture_output=True, text=True, check=True)
    log = (workdir / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit(f"imagetag serve exited: {(workdir / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("imagetag serve was not ready in 300 s")
        time.sleep(0.5)
    return server, json.loads(credentials.stdout)


def login_body(credentials: dict) -> bytes:
    return json.dumps({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "domain": {"name": credentials["domain"]}, "name": credentials["user"],
        "password": credentials["password"]}}}, "scope": {"project": {"name": credentials["project_name"]}}}}).encode()


def table(report: dict) -> str:
    lines = [f"{'case':24} {'kind':8} {'requests':>8} {'unexpected':>10} {'5xx*':>5} {'lost':>5} "
             f"{'p50 ms':>8} {'p99 ms':>8}  answers"]
    for name, row in report["cases"].items():
        answers = ", ".join(f"{k}: {v}" for k, v in row["answers"].items())
        lines.append(f"{name:24} {row['kind']:8} {row['requests']:>8} {sum(row['unexpected'].values()):>10} "
                     f"{row['outside_contract_5xx']:>5} {row['lost']:>5} {row['p50_ms']:>8} {row['p99_ms']:>8}  {answers}")
    for name, row in report["kinds"].items():
        lines.append(f"{'all ' + name:24} {'':8} {row['requests']:>8} {sum(row['unexpected'].values()):>10} "
                     f"{row['outside_contract_5xx']:>5} {row['lost']:>5} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    lines.append("(5xx*: 5xx outside the contract, i.e. anything but 503 AIS.0506)")
    lines.append("")
    lines.append("RSS (MiB) over time: " + ", ".join(
        f"{t:g}s {mb:g}" for t, mb in report["rss_mib"][:: max(1, round(30 / RSS_EVERY_S))]))
    growth = report["rss_after_warmup"]
    healthz = report["healthz"]
    lines += [
        f"RSS after warm-up ({report['warmup_s']:g} s): median {growth['baseline_mb']} MiB over the first "
        f"{growth.get('window_s', 0):g} s, {growth['end_mb']} MiB over the last; growth "
        f"{100 * (growth['growth'] or 0):.1f} %; peak {growth.get('peak_mb')} MiB",
        f"/healthz every second: p50 {healthz['p50_ms']} ms, p99 {healthz['p99_ms']} ms, max {healthz['max_ms']} ms, "
        f"failures {healthz['failures']}",
        f"throughput: {report['requests_per_s']} requests/s over {report['duration_s']:g} s, "
        f"concurrency {report['concurrency']}",
        "",
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in report["targets"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    duration_s = args.minutes * 60
    window_s = min(60.0, max(RSS_EVERY_S * 2, (duration_s - args.warmup_s) / 4))

    workdir = Path(tempfile.mkdtemp(prefix="imagetag-soak-"))
    files = workdir / "files"
    files.mkdir()
    for name in ("cat_chelsea.jpg", "bus.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, files / name)
    (files / "notes.txt").write_text("not an image\n" * 50)
    file_server, files_url = serve_files(files)
    port = _free_port()
    server, credentials = start_server(workdir, port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        traffic = Traffic("", files_url)
        traffic.login = login_body(credentials)
        login = httpx.post(f"{base_url}/v3/auth/tokens", content=traffic.login,
                           headers={"Content-Type": "application/json"}, timeout=30)
        login.raise_for_status()
        traffic.token = login.headers["X-Subject-Token"]
        tallies = {case.name: Tally() for case in cases()}
        healthz_ms: list[float] = []
        healthz_failures: Counter = Counter()

        async def run() -> None:
            stop = asyncio.Event()
            probe = asyncio.create_task(probe_healthz(base_url, stop, healthz_ms, healthz_failures))
            await clients(base_url, traffic, args.concurrency, duration_s, args.seed, tallies)
            stop.set()
            await probe

        print(f"soaking {base_url} for {duration_s:g} s at concurrency {args.concurrency} ...", file=sys.stderr)
        started = time.monotonic()
        with RssSampler(server.pid) as rss:
            asyncio.run(run())
        elapsed = time.monotonic() - started
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        file_server.shutdown()

    kinds: dict[str, Tally] = {}
    for case in cases():
        kinds.setdefault(case.kind, Tally()).add(tallies[case.name])
    total = Tally()
    for tally in kinds.values():
        total.add(tally)
    growth = rss_growth(rss.samples, args.warmup_s, window_s)
    ordered_healthz = sorted(healthz_ms)
    report = {
        "command": " ".join(["load-tests/soak.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPU cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "server_env": {k: v for k, v in os.environ.items() if k.startswith("IMAGETAG_")},
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "warmup_s": args.warmup_s,
        "requests_per_s": round(total.summary()["requests"] / elapsed, 1),
        "cases": {c.name: {"kind": c.kind, **tallies[c.name].summary()} for c in cases()},
        "kinds": {name: tally.summary() for name, tally in kinds.items()},
        "total": total.summary(),
        "rss_mib": rss.samples,
        "rss_after_warmup": growth,
        "healthz": {"p50_ms": round(_quantile(ordered_healthz, 0.5), 1),
                    "p99_ms": round(_quantile(ordered_healthz, 0.99), 1),
                    "max_ms": round(max(healthz_ms, default=0), 1), "failures": dict(healthz_failures)},
    }
    report["targets"] = {
        "0 5xx outside the contract": total.outside_contract_5xx == 0,
        "0 lost requests": sum(total.lost.values()) == 0,
        f"RSS growth after warm-up under {TARGET_RSS_GROWTH:.0%}": growth["growth"] is not None
        and growth["growth"] < TARGET_RSS_GROWTH,
        "the server stayed up": alive,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(report))
    print(f"\n{args.json}", file=sys.stderr)
    return 0 if all(report["targets"].values()) else 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
