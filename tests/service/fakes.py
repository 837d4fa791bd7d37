"""A small fake inference client, and the real gateway built around it in this process.

For the logic that needs no models (credentials, limits, error envelopes, IAM): the app is built
by the same `build_components` and `create_app` as `imagetag serve` and served by uvicorn on a
loopback port (or called over ASGI, with `serving`), with real stores, real rate limiters and,
where a test asks for it, a real Redis; only the models are replaced, so it starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from inference.results import ScoredTag, TagResult
from inference.vocabulary import Vocabulary
from service.app import create_app
from service.assembly import build_components
from service.server import uvicorn_options
from service.settings import Settings
from tests.conftest import free_port

_VOCABULARY: Vocabulary | None = None


def cat() -> list[ScoredTag]:
    global _VOCABULARY
    _VOCABULARY = _VOCABULARY or Vocabulary.load()
    return [ScoredTag(_VOCABULARY.tags["cat"], 0.97, ())]


class FakeInference:
    """Tags every image "cat" at 97%, after `delay_s`; counts the images it saw."""

    def __init__(self, ready: bool = True, delay_s: float = 0.0) -> None:
        self.ready = ready
        self.delay_s = delay_s
        self.images: list[bytes] = []

    async def start(self) -> None: ...

    async def tag(self, images: list[bytes], deadline: float | None = None) -> list[TagResult]:
        self.images += images
        await asyncio.sleep(self.delay_s)
        return [cat() for _ in images]

    async def close(self) -> None: ...


class InProcessServer:
    def __init__(self, base_url: str, inference: FakeInference) -> None:
        self.base_url = base_url
        self.inference = inference

    def url(self, path: str) -> str:
        return self.base_url + path


def build_app(data_dir: Path, inference: FakeInference | None = None, **settings: object) -> FastAPI:
    """The app as `imagetag serve` builds it, around `inference`; settings as keyword arguments."""
    defaults: dict[str, object] = {"auth_mode": "none", "data_dir": data_dir, "redis_url": None}
    return create_app(build_components(Settings(**(defaults | settings)), inference=inference or FakeInference()))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` with its lifespan running; over ASGI, no sockets."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


@contextmanager
def gateway(data_dir: Path, inference: FakeInference | None = None, **settings: object) -> Iterator[InProcessServer]:
    """The app served on loopback, in a thread of this process; settings as keyword arguments."""
    inference = inference or FakeInference()
    defaults: dict[str, object] = {"auth_mode": "none", "data_dir": data_dir, "redis_url": None}
    built = Settings(**(defaults | settings))
    app = create_app(build_components(built, inference=inference))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, **(uvicorn_options(built) | {"port": port, "log_level": "warning"})))
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process gateway did not start"
        time.sleep(0.005)
    try:
        scheme = "https" if built.tls_certfile else "http"
        yield InProcessServer(f"{scheme}://127.0.0.1:{port}", inference)
    finally:
        server.should_exit = True
        thread.join(10)
