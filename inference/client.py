"""How the API reaches the models: one async interface, implementations chosen at start-up.

`LocalInference` runs the engine in this process on a dedicated thread, so the event loop never
blocks on model work. A batching or remote implementation plugs in behind the same interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from PIL import Image

from inference.engine import ModelError, TaggingEngine
from inference.fusion import ScoredTag

TagResult = list[ScoredTag] | ModelError


class InferenceClient(Protocol):
    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Loads the models; `ready` turns true when done. May take a while."""

    async def tag(self, images: list[Image.Image]) -> list[TagResult]:
        """One result per image, in order."""

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

    async def tag(self, images: list[Image.Image]) -> list[TagResult]:
        if self._engine is None:
            raise RuntimeError("models are not loaded yet")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._engine.predict, images)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
