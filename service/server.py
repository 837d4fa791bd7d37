"""How the app meets the network: uvicorn, with bounds on what a client can hold before its
credentials are checked.

uvicorn's httptools protocol reads a request line and headers of any size for as long as the
client takes, accepts any number of connections, and drains a body it will not use for as long as
it trickles in. `BoundedConnection` is that protocol with the bounds: the head within
IMAGETAG_MAX_HEADER_BYTES and IMAGETAG_HEADER_TIMEOUT_S, the body within IMAGETAG_BODY_TIMEOUT_S
of the head, at most IMAGETAG_MAX_CONNECTIONS open at once. A connection past a bound gets the
contract's error envelope, where it can still take an answer, and is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import HeadersTooLarge, IncompleteRequest, Overloaded, ServiceError, error_body, status_and_code
from service.settings import Settings

log = logging.getLogger(__name__)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """`uvicorn.run`'s keyword arguments for serving the API as `settings` say."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ssl_certfile": settings.tls_certfile,
        "ssl_keyfile": settings.tls_keyfile,
        "log_level": settings.log_level,
        # uvicorn's loggers propagate to the root handler (JSON or text, service.logs), and its
        # access line gives way to the gateway's own, which knows the project and error code.
        "log_config": None,
        "access_log": False,
        "http": partial(BoundedConnection, settings=settings),
        "ws": "none",  # the API has no WebSocket routes: an Upgrade header is ignored
        # uvicorn would believe X-Forwarded-For from loopback; the gateway reads it itself, and
        # only from IMAGETAG_TRUSTED_PROXIES (service/deps.client_host).
        "proxy_headers": False,
    }


class BoundedConnection(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        settings: Settings,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings = settings
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None
        """Bytes received of a head still incomplete; None between a head and the next."""
        self._head_began = False
        """A head began in the chunk being parsed (which may hold the end of the previous request)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            busy = Overloaded("the server has too many open connections; retry shortly", headers={"Retry-After": "1"})
            self._refuse(busy)
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._head_began = False
        super().data_received(data)
        if self._head_bytes is not None and not self._head_began and not self.transport.is_closing():
            # Counted by chunk, so that a head that never ends is refused before it is all in
            # memory; whole heads are measured exactly in on_headers_complete.
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_header_bytes:
                self._refuse(self._head_too_large())

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_began = True
        if self._head_bytes is None:  # a connection's first head is timed from the connection
            self._await_head()

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            return
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.settings.max_header_bytes:
            self._refuse(self._head_too_large())
            return
        self._head_bytes = None
        self._set_deadline(self.settings.body_timeout_s, self._body_overdue)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        self._cancel_deadline()
        super().on_message_complete()

    # Deadlines and refusals

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._set_deadline(self.settings.header_timeout_s, self._head_overdue)

    def _head_too_large(self) -> ServiceError:
        return HeadersTooLarge(f"the request line and headers are over {self.settings.max_header_bytes} bytes")

    def _head_overdue(self) -> None:
        self._refuse(IncompleteRequest(
            f"the request line and headers did not arrive within {self.settings.header_timeout_s:g} s"
        ))

    def _body_overdue(self) -> None:
        if self.pipeline:
            # Queued behind a request still being answered: uvicorn is not reading, the client is
            # not late. Its time starts again when the earlier request is done.
            self._set_deadline(self.settings.body_timeout_s, self._body_overdue)
            return
        if self.cycle.response_started:
            # Answered before its body was read (a refusal): only the draining of the rest ends here.
            self._close("the rest of a refused request's body")
            return
        # The app's reads end with a disconnect, and nothing it sends goes out after this answer.
        self.cycle.disconnected = True
        self._refuse(IncompleteRequest(f"the request body did not arrive within {self.settings.body_timeout_s:g} s"))

    def _set_deadline(self, seconds: float, overdue: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, overdue)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, error: ServiceError) -> None:
        self.transport.write(_raw_response(error, self.server_state.default_headers))
        self._close(error.message)

    def _close(self, why: str) -> None:
        self._cancel_deadline()
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("closing the connection of %s: %s", client, why)
        self.transport.close()


def _raw_response(error: ServiceError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The error envelope as `service.app` sends it, written where no app is running."""
    status, _ = status_and_code(error)
    body = json.dumps(error_body(error)).encode()
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-request-id", uuid.uuid4().hex.encode()),
        *((name.encode(), value.encode()) for name, value in error.headers.items()),
    ]
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body
