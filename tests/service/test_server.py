"""What a client can hold of `imagetag serve` before its credentials are checked: memory, sockets,
time. A real server (IAM, real models) in its own process, met over raw sockets where the attack
is at the HTTP level; its memory is read from /proc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import requests

from tests.conftest import REPO, RunningServer, start_server, stop_server

MiB = 1024 * 1024
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 4.0
MAX_CONNECTIONS = 40
MAX_HEADER_BYTES = 32 * 1024
TAGGING = "/v2.0/image/tagging"
# What 20 hostile connections may add to the server's memory; before the bounds, 20 unfinished
# 8 MB headers added 158 MB, and 20 bodies of 11 MiB without credentials 211 MB.
MEMORY_SLACK = 40 * MiB


@dataclass
class Guarded:
    server: RunningServer
    token: str

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.base_url.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[Guarded]:
    directory = tmp_path_factory.mktemp("guarded")
    env = {
        "IMAGETAG_AUTH_MODE": "iam",
        "IMAGETAG_DATA_DIR": str(directory / "data"),
        "IMAGETAG_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "IMAGETAG_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "IMAGETAG_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "IMAGETAG_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "IMAGETAG_RATE_LIMIT_PER_S": "1000",
        "IMAGETAG_RATE_LIMIT_BURST": "1000",
    }
    admin = subprocess.run(
        [sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    )
    dev = json.loads(admin.stdout)
    server = start_server(directory, env=env)
    try:
        login = {"auth": {
            "identity": {"methods": ["password"], "password": {
                "user": {"domain": {"name": dev["domain"]}, "name": dev["user"], "password": dev["password"]}}},
            "scope": {"project": {"id": dev["project_id"]}},
        }}
        response = requests.post(server.url("/v3/auth/tokens"), json=login, timeout=30)
        assert response.status_code == 201, response.text
        yield Guarded(server, response.headers["X-Subject-Token"])
    finally:
        stop_server(server)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def memory_held(
    guarded: Guarded, sizes: list[int], send: Callable[[socket.socket, int], object],
    then: Callable[[socket.socket, object], object] = lambda sock, sent: sent,
) -> tuple[int, list]:
    """One connection per size, all at once: each `send`s, then holds its connection until all have
    sent and the server's memory is read, then does `then` with what `send` returned. Returns how
    much the server's memory grew at the peak, and what each `then` returned."""
    pid = guarded.server.process.pid
    everyone = threading.Barrier(len(sizes) + 1, timeout=60)
    peak = [rss_bytes(pid)]
    before = peak[0]

    def client(size: int) -> object:
        with connect(guarded) as sock:
            sent = send(sock, size)
            everyone.wait()  # all have sent
            everyone.wait()  # the memory has been read
            return then(sock, sent)

    with ThreadPoolExecutor(len(sizes)) as pool:
        futures = [pool.submit(client, size) for size in sizes]
        while everyone.n_waiting < len(sizes) and not any(future.done() for future in futures):
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)
        everyone.wait()
        for _ in range(10):  # what the server holds is held: let it show
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.05)
        everyone.wait()
        return peak[0] - before, [future.result() for future in futures]


def connect(guarded: Guarded) -> socket.socket:
    return socket.create_connection(guarded.address, timeout=BODY_TIMEOUT_S + 10)


def head(path: str = TAGGING, method: str = "POST", **headers: str) -> bytes:
    fields = [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines = [f"{method} {path} HTTP/1.1", "Host: imagetag", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """One response, read to the end of its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed within a response body"
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (waits up to the socket's timeout)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def assert_envelope(response: tuple[int, dict[str, str], dict], status: int, code: str) -> None:
    got_status, headers, body = response
    assert (got_status, body["error_code"]) == (status, code), body
    assert set(body) == {"error_code", "error_msg"} and headers["content-type"] == "application/json"
    assert headers["x-request-id"]


def send_until_refused(sock: socket.socket, first: bytes, size: int, filler: bytes = b"a" * 1024) -> int:
    """Sends `first`, then `filler` over and over up to `size` bytes in all; returns how many went
    out before the server stopped taking them (`size` if it never did)."""
    chunk = filler * (65536 // len(filler))
    sent = 0
    try:
        sock.sendall(first)
        sent = len(first)
        while sent < size:
            part = chunk[: size - sent]
            sock.sendall(part)
            sent += len(part)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_bodies_without_credentials_are_not_held(guarded):
    """20 clients each declare a 12 MiB body, send 11 MiB of it and hold the connection."""
    def send(sock: socket.socket, size: int) -> float:
        sock.sendall(head(Content_Type="application/json", Content_Length=str(12 * MiB)))
        started = time.monotonic()
        assert send_until_refused(sock, b"", size) == size  # taken in, and dropped
        return started

    def then(sock: socket.socket, started: float) -> tuple:
        response = read_response(sock)
        # The unfinished body is not waited for past IMAGETAG_BODY_TIMEOUT_S.
        return response, closed_by_server(sock) and time.monotonic() - started

    grown, results = memory_held(guarded, [11 * MiB] * 20, send, then)
    assert grown < MEMORY_SLACK, f"the server grew by {grown / MiB:.0f} MiB"
    for response, closed_after in results:
        assert_envelope(response, 401, "ModelArts.4101")
        assert closed_after and closed_after < BODY_TIMEOUT_S + 2


def test_unfinished_headers_are_cut_at_the_cap(guarded):
    """20 clients each send 8 MB of headers that never end, one 16 MB, and hold the connection."""
    start = head().removesuffix(b"\r\n")
    lines = b"X-Padding: " + b"a" * 1010 + b"\r\n"

    def send(sock: socket.socket, size: int) -> int:
        return send_until_refused(sock, start, size, lines)

    grown, sent = memory_held(guarded, [8 * MiB] * 20 + [16 * MiB], send)
    assert grown < MEMORY_SLACK, f"the server grew by {grown / MiB:.0f} MiB"
    # Refused early: what went out is what the kernel's buffers took after the server stopped reading.
    assert all(size < 8 * MiB for size in sent), [size // MiB for size in sent]


def test_a_head_over_the_cap_gets_431(guarded):
    with connect(guarded) as sock:
        sock.sendall(head(X_Padding="a" * MAX_HEADER_BYTES))
        assert_envelope(read_response(sock), 431, "APIG.0201")
        assert closed_by_server(sock)
    with connect(guarded) as sock:  # just under the cap is served
        sock.sendall(head("/healthz", "GET", X_Padding="a" * (MAX_HEADER_BYTES - 200)))
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("trickle", [b"", b"X-Slow: 1\r\n"], ids=["silent", "slowloris"])
def test_a_head_slower_than_the_timeout_gets_408(guarded, trickle):
    with connect(guarded) as sock:
        started = time.monotonic()
        if trickle:
            sock.sendall(head().removesuffix(b"\r\n"))
            sock.settimeout(0.2)
            while time.monotonic() - started < HEADER_TIMEOUT_S + 5:  # a header line every 0.2 s
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    sock.sendall(trickle)
            sock.settimeout(10)
        response = read_response(sock)
        elapsed = time.monotonic() - started
    assert_envelope(response, 408, "APIG.0201")
    assert "did not arrive within 1 s" in response[2]["error_msg"]
    assert HEADER_TIMEOUT_S - 0.1 < elapsed < HEADER_TIMEOUT_S + 1.5


def test_a_body_slower_than_the_timeout_gets_408(guarded):
    with connect(guarded) as sock:
        sock.sendall(head(X_Auth_Token=guarded.token, Content_Type="application/json", Content_Length="1000"))
        sock.sendall(b'{"image": "')
        started = time.monotonic()
        response = read_response(sock)
        elapsed = time.monotonic() - started
        assert closed_by_server(sock)
    assert_envelope(response, 408, "APIG.0201")
    assert "body did not arrive within 4 s" in response[2]["error_msg"]
    assert BODY_TIMEOUT_S - 0.1 < elapsed < BODY_TIMEOUT_S + 1.5
    assert "Traceback" not in guarded.server.log.read_text()


def test_connections_past_the_limit_are_turned_away(guarded):
    with ExitStack() as stack:
        held = [stack.enter_context(connect(guarded)) for _ in range(MAX_CONNECTIONS)]
        with connect(guarded) as extra:
            status, headers, _ = response = read_response(extra)
            assert_envelope(response, 503, "AIS.0506")
            assert headers["retry-after"] == "1"
        for sock in held:  # the ones within the limit were kept, waiting for a request
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    # Closed: the room is back as soon as the server has seen them go.
    deadline = time.monotonic() + 5
    while (status := requests.get(guarded.server.url("/healthz"), timeout=5).status_code) != 200:
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.05)


def test_healthz_answers_at_once_while_hostile_json_is_refused(guarded):
    """Three authenticated 12 MB bodies of 4 million empty arrays."""
    hostile = b"[" + b"[]," * 3_999_999 + b"[]]"
    headers = {"X-Auth-Token": guarded.token, "Content-Type": "application/json"}
    latencies: list[float] = []

    def post(_: int) -> requests.Response:
        return requests.post(guarded.server.url(TAGGING), data=hostile, headers=headers, timeout=60)

    with ThreadPoolExecutor(3) as pool, requests.Session() as probe:
        posted = [pool.submit(post, i) for i in range(3)]
        while not all(future.done() for future in posted):
            started = time.monotonic()
            assert probe.get(guarded.server.url("/healthz"), timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
    for future in posted:
        response = future.result()
        assert (response.status_code, response.json()["error_code"]) == (400, "AIS.0014")
    assert len(latencies) > 5 and max(latencies) < 0.1, sorted(latencies)[-5:]
