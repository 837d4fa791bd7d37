"""How the API reaches the models: one async interface, implementations chosen at start-up.

`inference.batching.BatchingInference` runs engine replicas in this process, each on a thread of
its own, so the event loop never blocks on model work, and gathers concurrent requests into
batches; `inference.remote.RemoteInference` reaches worker processes through Redis behind the
same interface. `service.assembly` picks one from the settings.

Errors a caller may see from `tag` (a model failure on one image is not raised: it is that
image's `ModelError` result):

    InferenceUnavailable      the request was not tagged; retrying later may work (503)
     ├── QueueFull            the bounded work queue is full; refused at once
     ├── DeadlineExceeded     the caller's deadline passed before its results were ready
     └── InferenceClosed      the client was closed while the request waited
"""

from __future__ import annotations

import time
from typing import Protocol

from PIL import Image

from inference.engine import ModelError
from inference.fusion import ScoredTag

TagResult = list[ScoredTag] | ModelError


class InferenceUnavailable(Exception):
    """The request was not tagged for want of capacity or time, not because of the image."""


class QueueFull(InferenceUnavailable): ...


class DeadlineExceeded(InferenceUnavailable): ...


class InferenceClosed(InferenceUnavailable): ...


def admission_deadline(deadline: float | None, default_timeout_s: float) -> float:
    """The caller's absolute deadline, or the default one from now; `DeadlineExceeded` when it
    has passed already, so that nothing is queued for a caller who cannot wait."""
    now = time.monotonic()
    deadline = now + default_timeout_s if deadline is None else deadline
    if deadline <= now:
        raise DeadlineExceeded("the deadline passed before the request was queued")
    return deadline


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
