"""Tests for service.url_fetch against real local HTTP and HTTPS servers.

Every test that should be refused before any connection runs under `connects`, which records
each outgoing TCP connect and refuses anything but 127.0.0.1, so the tests never touch the real
network and can tell "refused up front" from "tried and failed". Host names other than
`localhost` come from `fake_dns`, so DNS answers (including rebinding) are under test control.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service import url_fetch
from service.errors import DownloadFailed, ImageSizeInvalid, UrlNotAllowed
from service.url_fetch import FetchPolicy, fetch_image_bytes

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
SECRET = b"SECRET-BODY-THAT-MUST-NOT-LEAK"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
CAP = 4096


def policy(**overrides: Any) -> FetchPolicy:
    values: dict[str, Any] = {"timeout_s": 3.0, "max_bytes": CAP, "allowed_networks": LOOPBACK}
    values.update(overrides)
    return FetchPolicy(**values)


def fetch(url: str, **overrides: Any) -> bytes:
    return asyncio.run(fetch_image_bytes(url, policy(**overrides)))


# --- the servers -------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "TestServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.close_connection = True
        self.server.seen.append((self.path, self.headers.get("Host")))
        parts = self.path.strip("/").split("/")
        route, args = parts[0], parts[1:]
        getattr(self, "route_" + route.replace("-", "_"), self.route_missing)(*args)

    def send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if "Content_Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_png(self) -> None:
        self.send(200, PNG, Content_Type="image/png")

    def route_echo_host(self) -> None:
        self.send(200, (self.headers.get("Host") or "").encode())

    def route_sized(self, n: str) -> None:
        self.send(200, b"x" * int(n))

    def route_chunked(self, n: str) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        body = PNG if n == "png" else b"y" * int(n)
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def route_endless_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while not self.server.stop.is_set():
                self.wfile.write(b"400\r\n" + b"z" * 1024 + b"\r\n")
        except OSError:
            pass  # the client hung up, which is what the test wants

    def route_huge_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"z" * 10)
        self.wfile.flush()
        self.server.stop.wait(10)

    def route_slow_headers(self) -> None:
        self.server.stop.wait(10)

    def route_slow_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"s")
                self.wfile.flush()
                if self.server.stop.wait(0.05):
                    return
        except OSError:
            pass

    def route_redirect(self, hops_left: str) -> None:
        n = int(hops_left)
        self.send(302, Location="/png" if n == 0 else f"/redirect/{n - 1}")

    def route_status(self, code: str) -> None:
        self.send(int(code), Location=f"http://127.0.0.1:{self.server.server_port}/png")

    def route_to(self, *target: str) -> None:
        # /to/<scheme>/<rest...> redirects to <scheme>://<rest...>, with PORT replaced.
        location = f"{target[0]}://" + "/".join(target[1:])
        self.send(302, Location=location.replace("PORT", str(self.server.server_port)))

    def route_to_https(self, port: str) -> None:
        self.send(307, Location=f"https://img.test:{port}/echo-host")

    def route_no_location(self) -> None:
        self.send(302)

    def route_error(self) -> None:
        self.send(500, SECRET)

    def route_missing(self, *_: str) -> None:
        self.send(404, SECRET, Content_Type="text/plain")

    def route_garbage(self) -> None:
        self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")


class TestServer(ThreadingHTTPServer):
    __test__ = False  # not a pytest class
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), Handler)
        self.tls = tls
        self.stop = threading.Event()
        self.seen: list[tuple[str, str | None]] = []
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # Handshake in the handler thread, so a client that rejects us cannot stall accept().
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-body is part of these tests

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.server_port}{path}"


@contextmanager
def running(server: TestServer) -> Iterator[TestServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[TestServer]:
    with running(TestServer()) as live:
        yield live


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=url_fetch test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=img.test")
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:img.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return Certs(ca=d / "ca.pem", cert=d / "leaf.pem", key=d / "leaf.key")


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[TestServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    with running(TestServer(tls=context)) as live:
        yield live


@pytest.fixture
def trust_test_ca(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(url_fetch, "_tls_context", lambda: ssl.create_default_context(cafile=certs.ca))


# --- probes on the client side --------------------------------------------------------------------


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connect the code under test makes; only loopback is really dialled."""
    made: list[tuple[str, int]] = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            made.append((address[0], address[1]))
            if address[0] not in ("127.0.0.1", "::1"):
                raise ConnectionRefusedError(f"test refuses to dial {address[0]}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


@dataclass
class FakeDns:
    answers: dict[str, Callable[[], list[str]]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    def add(self, name: str, *addresses: str) -> None:
        self.answers[name] = lambda: list(addresses)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    dns = FakeDns()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in dns.answers:
            return real_getaddrinfo(host, port, *args, **kwargs)
        dns.lookups.append(name)
        result = []
        for text in dns.answers[name]():
            ip = ipaddress.ip_address(text)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            sockaddr = (text, int(port)) if ip.version == 4 else (text, int(port), 0, 0)
            result.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return result

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return dns


def test_connects_probe_sees_a_real_connection(server: TestServer, connects: list) -> None:
    # Guards the probe itself: "no connects recorded" below only means something if it records.
    assert fetch(server.url("/png")) == PNG
    assert connects == [("127.0.0.1", server.server_port)]


# --- success --------------------------------------------------------------------------------------


def test_allow_listed_loopback_is_fetched(server: TestServer) -> None:
    assert fetch(server.url("/png")) == PNG


def test_host_header_is_the_original_host(server: TestServer) -> None:
    assert fetch(server.url("/echo-host")) == f"127.0.0.1:{server.server_port}".encode()


def test_ipv6_literal_is_fetched_with_a_bracketed_host_header() -> None:
    try:
        server = TestServer(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with running(server) as live:
        allowed = (ipaddress.ip_network("::1/128"),)
        body = fetch(f"http://[::1]:{live.server_port}/echo-host", allowed_networks=allowed)
        assert body == f"[::1]:{live.server_port}".encode()


def test_chunked_body_is_decoded(server: TestServer) -> None:
    assert fetch(server.url("/chunked/png")) == PNG
    assert fetch(server.url(f"/chunked/{CAP}")) == b"y" * CAP


def test_body_of_exactly_max_bytes_is_accepted(server: TestServer) -> None:
    assert fetch(server.url(f"/sized/{CAP}")) == b"x" * CAP


def test_name_is_resolved_once_and_the_vetted_address_is_dialled(
    server: TestServer, fake_dns: FakeDns, connects: list
) -> None:
    # DNS rebinding: the first answer is allowed, any later one points at the metadata service.
    answers = iter([["127.0.0.1"]])
    fake_dns.answers["rebind.test"] = lambda: next(answers, ["169.254.169.254"])
    body = fetch(server.url("/echo-host", host="rebind.test"))
    assert body == f"rebind.test:{server.server_port}".encode()
    assert fake_dns.lookups == ["rebind.test"]
    assert connects == [("127.0.0.1", server.server_port)]


def test_public_address_passes_vetting_and_is_dialled(fake_dns: FakeDns, connects: list) -> None:
    fake_dns.add("public.test", "93.184.215.14")
    with pytest.raises(DownloadFailed, match="connect"):
        fetch("http://public.test:8080/a.png", allowed_networks=())
    assert connects == [("93.184.215.14", 8080)]


# --- refused before connecting --------------------------------------------------------------------


def test_loopback_is_refused_unless_allow_listed(server: TestServer, connects: list) -> None:
    with pytest.raises(UrlNotAllowed, match="non-public"):
        fetch(server.url("/png"), allowed_networks=())
    assert connects == [] and server.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.png",
        "http://172.16.5.4/a.png",
        "http://192.168.1.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/a.png",
        "http://0.0.0.0/a.png",
        "http://224.0.0.1/a.png",
        "http://240.0.0.1/a.png",
        "http://255.255.255.255/a.png",
        "http://127.0.0.2/a.png",  # loopback, but outside the allow-listed 127.0.0.1/32
        "http://[::1]/a.png",
        "http://[::]/a.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fc00::1]/a.png",
        "http://[fe80::1]/a.png",
        "http://[ff02::1]/a.png",
        "http://[::ffff:169.254.169.254]/a.png",
        "http://[::ffff:10.0.0.1]/a.png",
        "http://[64:ff9b::a9fe:a9fe]/a.png",  # NAT64 form of 169.254.169.254
        "http://[2002:a9fe:a9fe::1]/a.png",  # 6to4 form of 169.254.169.254
        "https://169.254.169.254/latest/meta-data/",
    ],
)
def test_non_public_ip_literals_are_refused_without_connecting(url: str, connects: list) -> None:
    with pytest.raises(UrlNotAllowed, match="non-public"):
        fetch(url)
    assert connects == []


@pytest.mark.parametrize("host", ["localhost", "2130706433", "0x7f.0.0.1", "127.1"])
def test_other_spellings_of_loopback_are_refused(host: str, server: TestServer, connects: list) -> None:
    # "2130706433", "0x7f.0.0.1" and "127.1" are what the resolver reads as 127.0.0.1.
    with pytest.raises(UrlNotAllowed, match="non-public"):
        fetch(server.url("/png", host=host), allowed_networks=())
    assert connects == [] and server.seen == []


@pytest.mark.parametrize(
    "answers",
    [["169.254.169.254"], ["fd00:ec2::254"], ["10.1.2.3"], ["93.184.215.14", "10.0.0.5"], ["::ffff:127.0.0.1"]],
)
def test_names_resolving_to_any_non_public_address_are_refused(
    answers: list[str], fake_dns: FakeDns, connects: list
) -> None:
    fake_dns.add("sneaky.test", *answers)
    with pytest.raises(UrlNotAllowed, match="sneaky.test"):
        fetch("http://sneaky.test/a.png", allowed_networks=())
    assert connects == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/a.png", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("data:image/png;base64,iVBORw0KGgo=", "http or https"),
        ("gopher://example.com/", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("example.com/a.png", "http or https"),
        ("//example.com/a.png", "http or https"),
        ("", "http or https"),
        ("http:///a.png", "no host"),
        ("http://user:pw@example.com/a.png", "credentials"),
        ("https://token@example.com/a.png", "credentials"),
        ("http://example.com:0/a.png", "port"),
        ("http://example.com:99999/a.png", "port"),
        ("http://example.com:-1/a.png", "port"),
        ("http://example.com:8o/a.png", "not a valid URL"),
        ("http://[::1/a.png", "not a valid URL"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, reason: str, connects: list) -> None:
    with pytest.raises(UrlNotAllowed, match=reason):
        fetch(url)
    assert connects == []


# --- redirects ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_followed(code: int, server: TestServer) -> None:
    assert fetch(server.url(f"/status/{code}")) == PNG


def test_redirect_chain_up_to_the_cap_is_followed(server: TestServer) -> None:
    assert fetch(server.url("/redirect/2"), max_redirects=3) == PNG  # 3 redirects


def test_redirect_chain_past_the_cap_fails(server: TestServer) -> None:
    with pytest.raises(DownloadFailed, match="more than 3"):
        fetch(server.url("/redirect/3"), max_redirects=3)  # 4 redirects
    assert len(server.seen) == 4  # the fifth URL is never requested
    with pytest.raises(DownloadFailed, match="more than 0"):
        fetch(server.url("/redirect/0"), max_redirects=0)


def test_redirect_to_metadata_is_refused(server: TestServer, connects: list) -> None:
    with pytest.raises(UrlNotAllowed, match="non-public"):
        fetch(server.url("/to/http/169.254.169.254/latest/meta-data/"))
    assert {host for host, _ in connects} == {"127.0.0.1"}


def test_redirect_to_a_name_is_resolved_and_vetted_again(
    server: TestServer, fake_dns: FakeDns, connects: list
) -> None:
    fake_dns.add("metadata.test", "169.254.169.254")
    with pytest.raises(UrlNotAllowed, match="metadata.test"):
        fetch(server.url("/to/http/metadata.test/latest"))
    fake_dns.add("img.test", "127.0.0.1")
    assert fetch(server.url("/to/http/img.test:PORT/echo-host")) == f"img.test:{server.server_port}".encode()
    assert fake_dns.lookups == ["metadata.test", "img.test"]
    assert {host for host, _ in connects} == {"127.0.0.1"}


@pytest.mark.parametrize(
    "target", ["file/etc/passwd", "ftp/127.0.0.1:PORT/png", "gopher/127.0.0.1:PORT/png", "http/user:pw@127.0.0.1:PORT/png"]
)
def test_redirect_to_a_bad_url_is_refused(target: str, server: TestServer) -> None:
    with pytest.raises(UrlNotAllowed, match="redirect target"):
        fetch(server.url(f"/to/{target}"))
    assert len(server.seen) == 1


def test_redirect_without_location_fails(server: TestServer) -> None:
    with pytest.raises(DownloadFailed, match="302"):
        fetch(server.url("/no-location"))


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "code"), [("/missing", 404), ("/error", 500)])
def test_non_2xx_fails_with_the_status_but_not_the_body(path: str, code: int, server: TestServer) -> None:
    with pytest.raises(DownloadFailed) as caught:
        fetch(server.url(path))
    assert str(code) in caught.value.message
    assert SECRET.decode() not in caught.value.message


def test_closed_port_fails() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadFailed, match="connect"):
        fetch(f"http://127.0.0.1:{port}/png")


def test_non_http_answer_fails(server: TestServer) -> None:
    with pytest.raises(DownloadFailed):
        fetch(server.url("/garbage"))


def test_unresolvable_name_fails(fake_dns: FakeDns) -> None:
    fake_dns.answers["nowhere.test"] = lambda: (_ for _ in ()).throw(socket.gaierror(-2, "Name or service not known"))
    with pytest.raises(DownloadFailed, match="resolve"):
        fetch("http://nowhere.test/a.png")


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_timeout_covers_the_whole_download(path: str, server: TestServer) -> None:
    timeout = 0.5
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="timed out"):
        fetch(server.url(path), timeout_s=timeout)
    assert time.monotonic() - started < timeout + 0.5


def test_timeout_covers_name_resolution(fake_dns: FakeDns) -> None:
    release = threading.Event()

    def slow_answer() -> list[str]:
        release.wait(5)
        return ["93.184.215.14"]

    fake_dns.answers["slow.test"] = slow_answer

    async def attempt() -> float:
        started = time.monotonic()
        try:
            with pytest.raises(DownloadFailed, match="timed out"):
                await fetch_image_bytes("http://slow.test/a.png", policy(timeout_s=0.3))
            return time.monotonic() - started
        finally:
            release.set()  # lets the resolver thread finish so asyncio.run can shut down

    assert asyncio.run(attempt()) < 0.8


# --- size cap -------------------------------------------------------------------------------------


def test_declared_oversized_body_is_refused_before_reading(server: TestServer) -> None:
    with pytest.raises(ImageSizeInvalid, match=f"larger than {CAP} bytes"):
        fetch(server.url(f"/sized/{CAP + 1}"))
    # The server declares 1 GB and then stalls: reading the body would end in a timeout instead.
    started = time.monotonic()
    with pytest.raises(ImageSizeInvalid, match=f"larger than {CAP} bytes"):
        fetch(server.url("/huge-declared"), timeout_s=3.0)
    assert time.monotonic() - started < 1.0


def test_streamed_oversized_body_is_cut_off(server: TestServer) -> None:
    with pytest.raises(ImageSizeInvalid, match=f"larger than {CAP} bytes"):
        fetch(server.url(f"/chunked/{CAP + 1}"))
    # An endless chunked body: only stopping at the cap ends this before the timeout does.
    with pytest.raises(ImageSizeInvalid, match=f"larger than {CAP} bytes"):
        fetch(server.url("/endless-chunked"), timeout_s=3.0)


# --- https ----------------------------------------------------------------------------------------


def test_https_uses_the_host_name_for_sni_and_verification(
    tls_server: TestServer, fake_dns: FakeDns, connects: list, trust_test_ca: None
) -> None:
    fake_dns.add("img.test", "127.0.0.1")
    body = fetch(tls_server.url("/echo-host", host="img.test"))
    assert body == f"img.test:{tls_server.server_port}".encode()
    assert tls_server.sni == ["img.test"]
    assert connects == [("127.0.0.1", tls_server.server_port)]


def test_https_redirect_from_http_is_pinned_too(
    server: TestServer, tls_server: TestServer, fake_dns: FakeDns, trust_test_ca: None
) -> None:
    fake_dns.add("img.test", "127.0.0.1")
    body = fetch(server.url(f"/to-https/{tls_server.server_port}"))
    assert body == f"img.test:{tls_server.server_port}".encode()
    assert tls_server.sni == ["img.test"]


@pytest.mark.parametrize("host", ["other.test", "127.0.0.1"])
def test_https_certificate_for_another_name_fails(
    host: str, tls_server: TestServer, fake_dns: FakeDns, trust_test_ca: None
) -> None:
    fake_dns.add("other.test", "127.0.0.1")
    with pytest.raises(DownloadFailed, match="TLS"):
        fetch(tls_server.url("/png", host=host))
    assert tls_server.seen == []


def test_https_with_an_untrusted_certificate_fails(tls_server: TestServer, fake_dns: FakeDns) -> None:
    fake_dns.add("img.test", "127.0.0.1")
    with pytest.raises(DownloadFailed, match="TLS"):
        fetch(tls_server.url("/png", host="img.test"))
    assert tls_server.seen == []
