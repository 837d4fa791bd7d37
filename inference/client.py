"""How the API reaches the models: one async interface, implementations chosen at start-up.

`LocalInference` runs the engine in this process on a dedicated thread, so the event loop never
blocks on model work. `inference.batching.BatchingInference` gathers concurrent requests into
batches behind the same interface.

Errors a caller may see from `tag` (a model failure on one image is not raised: it is that
image's `ModelError` result):

    InferenceUnavailable      the request was not tagged; retrying later may work (503)
     ├── QueueFull            the bounded work queue is full; refused at once
     ├── DeadlineExceeded     the caller's deadline passed before its results were ready
     └── InferenceClosed      the client was closed while the request waited
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from PIL import Image

from inference.engine import ModelError, TaggingEngine
from inference.fusion import ScoredTag

TagResult = list[ScoredTag] | ModelError


class InferenceUnavailable(Exception):
    """The request was not tagged for want of capacity or time, not because of the image."""


class QueueFull(InferenceUnavailable): ...


class DeadlineExceeded(InferenceUnavailable): ...


class InferenceClosed(InferenceUnavailable): ...


class InferenceClient(Protocol):
    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Loads the models; `ready` turns true when done. May take a while."""

    async def tag(self, images: list[Image.Image], deadline: float | None = None) -> list[TagResult]:
        """One result per image, in order.

        `deadline` is an absolute `time.monotonic()` time; past it the call raises
        `DeadlineExceeded` rather than keep the caller waiting.
        """

    async def close(self) -> None: ...


class LocalInference:
    def __init__(self, build_engine: Callable[[], TaggingEngine]) -> None:
        self._build_engine = build_engine
        self._engine: TaggingEngine | None = None
        # One thread: the models are not re-entrant, and torch parallelises inside each call.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    @property
    def ready(self) -> bool:
        return self._engine is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._engine = await loop.run_in_executor(self._executor, self._build_engine)

    async def tag(self, images: list[Image.Image], deadline: float | None = None) -> list[TagResult]:
        if self._engine is None:
            raise RuntimeError("models are not loaded yet")
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, self._engine.predict, images)
        if deadline is None:
            return await work
        try:
            # The thread cannot be interrupted; the caller stops waiting and its result is dropped.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await work
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the models finished") from None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
