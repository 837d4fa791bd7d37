"""Download the image a request names by `url`, without letting that URL reach internal services.

A caller-chosen URL is a server-side request forgery risk: it can point at loopback, the pod
network or the cloud metadata endpoint, directly, through a DNS name, or through a redirect. So
every hop is parsed, resolved once and vetted, and the connection then goes to the vetted
address itself; a second lookup could answer differently (DNS rebinding).

httpcore (httpx's transport layer) does the HTTP/1.1 work. It is used directly rather than through
httpx because its network backend is the one place where the connect address can be swapped
while the URL, and therefore the Host header, TLS SNI and certificate check, keep the original
host name; it also never reads proxy settings from the environment, which would bypass the pin.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import certifi
import httpcore
import httpx

from service.errors import DownloadFailed, ImageSizeInvalid, UrlNotAllowed
from service.networks import IPAddress, IPNetwork


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, OSError)


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float  # whole download: resolving, connecting, every redirect and the body
    max_bytes: int
    max_redirects: int = 3
    allowed_networks: tuple[IPNetwork, ...] = ()


async def fetch_image_bytes(url: str, policy: FetchPolicy) -> bytes:
    """Download `url` and return the body bytes, following at most `policy.max_redirects` redirects.

    Raises:
        UrlNotAllowed: the URL (or a redirect target) is not plain http(s) with a host, or its host
            resolves to any non-public address outside `policy.allowed_networks`.
        DownloadFailed: resolution, connection or TLS failed, too many redirects, a non-2xx final
            status, or the whole download took longer than `policy.timeout_s`.
        ImageSizeInvalid: the body is, or announces itself as, larger than `policy.max_bytes`.
    """
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _follow(url, policy)
    except TimeoutError:
        raise DownloadFailed(
            f"downloading the image at url timed out after {policy.timeout_s:g} s"
        ) from None


async def _follow(url: str, policy: FetchPolicy) -> bytes:
    current = _checked_url(url, "url")
    for _ in range(policy.max_redirects + 1):
        addresses = await _vetted_addresses(current, policy.allowed_networks)
        outcome = await _get(current, addresses, policy.max_bytes)
        if isinstance(outcome, bytes):
            return outcome
        current = outcome
    raise DownloadFailed(f"url redirected more than {policy.max_redirects} times")


def _checked_url(raw: str, label: str) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UrlNotAllowed(f"{label} is not a valid URL: {exc}") from None
    if url.scheme not in _DEFAULT_PORTS:
        shown = f"{url.scheme}:" if url.scheme else "no scheme"
        raise UrlNotAllowed(f"{label} must be an absolute http or https URL, not {shown}")
    if not url.raw_host:
        raise UrlNotAllowed(f"{label} has no host")
    if url.userinfo:
        # Credentials would be sent on to whatever host the URL (or a redirect) names.
        raise UrlNotAllowed(f"{label} must not contain credentials")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise UrlNotAllowed(f"{label} has an invalid port {url.port}")
    return url


async def _vetted_addresses(url: httpx.URL, allowed: tuple[IPNetwork, ...]) -> list[IPAddress]:
    host = url.raw_host.decode("ascii")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(host, url.port or _DEFAULT_PORTS[url.scheme])
    # One bad answer is enough to refuse: which address a connect would pick is not ours to
    # predict, and a name mixing public and internal answers is suspicious in itself.
    if not all(_may_connect(address, allowed) for address in addresses):
        raise UrlNotAllowed(
            f"url host {url.host!r} is or resolves to a non-public address, which the service may not reach"
        )
    return addresses


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DownloadFailed(f"could not resolve the host {host!r} of url") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise DownloadFailed(f"could not resolve the host {host!r} of url")
    return addresses


def _may_connect(address: IPAddress, allowed: tuple[IPNetwork, ...]) -> bool:
    forms = _forms(address)
    if any(form in network for form in forms for network in allowed):
        return True
    return all(_is_public(form) for form in forms)


def _forms(address: IPAddress) -> list[IPAddress]:
    """The address plus any IPv4 address it carries, since packets to it may end up there."""
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            forms.append(address.sixtofour)
        if address in _NAT64:
            forms.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return forms


def _is_public(address: IPAddress) -> bool:
    # is_global alone lets multicast through, so the other properties are checked as well.
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


async def _get(url: httpx.URL, addresses: list[IPAddress], max_bytes: int) -> bytes | httpx.URL:
    """One GET pinned to `addresses`: the body of a 2xx answer, or the next URL of a redirect."""
    request_url = httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )
    headers = [
        (b"Host", url.netloc),
        (b"Accept", b"image/*"),
        # A compressed body would make max_bytes cap the wire size, not the image size.
        (b"Accept-Encoding", b"identity"),
        (b"Connection", b"close"),
        (b"User-Agent", b"image-tagging-service"),
    ]
    # A pool per hop, never reused: a connection kept from an earlier hop would carry that hop's
    # TLS identity and address to a host that was never checked against them.
    pool = httpcore.AsyncConnectionPool(
        ssl_context=_tls_context() if url.scheme == "https" else None,
        network_backend=_PinnedBackend(addresses),
        retries=0,
    )
    try:
        async with pool, pool.stream("GET", request_url, headers=headers) as response:
            if response.status in _REDIRECTS:
                return _redirect_target(url, response)
            if not 200 <= response.status < 300:
                raise DownloadFailed(f"the server of url answered HTTP {response.status}")
            return await _read_capped(response, max_bytes)
    except _TRANSPORT_ERRORS as exc:
        raise DownloadFailed(f"could not download the image at url: {_describe(exc)}") from None


def _tls_context() -> ssl.SSLContext:
    # The same trust store httpx uses by default, so https behaves as with any httpx client.
    return ssl.create_default_context(cafile=certifi.where())


def _redirect_target(url: httpx.URL, response: httpcore.Response) -> httpx.URL:
    location = next((v for k, v in response.headers if k.lower() == b"location"), None)
    if location is None:
        raise DownloadFailed(f"the server of url answered HTTP {response.status} without a Location")
    try:
        text = location.decode("utf-8")
    except UnicodeDecodeError:
        text = location.decode("latin-1")
    try:
        target = url.join(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UrlNotAllowed(f"url redirects to an invalid URL: {exc}") from None
    return _checked_url(str(target), "the redirect target of url")


async def _read_capped(response: httpcore.Response, max_bytes: int) -> bytes:
    too_large = ImageSizeInvalid(f"the image at url is larger than {max_bytes} bytes")
    declared = next((v for k, v in response.headers if k.lower() == b"content-length"), None)
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in response.aiter_stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__context__, ssl.SSLError):
        kind = "TLS handshake failed"
    elif isinstance(exc, httpcore.ConnectError):
        kind = "could not connect"
    elif isinstance(exc, httpcore.ProtocolError):
        kind = "the server did not speak valid HTTP"
    else:
        kind = "the connection failed"
    detail = str(exc)
    return f"{kind} ({detail[:200]})" if detail else kind


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to the addresses vetted for this hop, whatever host httpcore asks for."""

    def __init__(self, addresses: Sequence[IPAddress]) -> None:
        self._addresses = addresses
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # `host` is deliberately ignored: resolving it again is exactly what DNS rebinding exploits.
        error: httpcore.ConnectError | None = None
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None  # _vetted_addresses never returns an empty list
        raise error

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
