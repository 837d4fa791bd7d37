"""How the API reaches the models: one async interface, implementations chosen at start-up.

A request's images travel encoded, as the client sent them (JPEG, PNG, BMP or WEBP bytes whose
header the gateway has checked); the inference side decodes them, on the models' device where
it can (`inference.pipeline`). `inference.batching.BatchingInference` runs `ImageTagger`
replicas in this process, each on a thread of its own, so the event loop never blocks on model
work, and gathers concurrent requests into batches; `inference.remote.RemoteInference` reaches
worker processes through Redis behind the same interface. `service.assembly` picks one from the
settings. This module and `inference.results` import no torch: a gateway in remote mode runs
on them alone.

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

from inference.results import TagResult


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


class FailureCounter(Protocol):
    """Counts batches that failed and were retried image by image; a prometheus `Counter` is one.
    The caller owns it, so the models record a number and the service decides how to export it."""

    def inc(self, amount: float = 1) -> None: ...


class ImageTagger(Protocol):
    """The models behind a client, built once: `inference.pipeline.DevicePipeline` serves."""

    def predict(self, images: list[bytes]) -> list[TagResult]:
        """One result per encoded image, in order; an image that fails gets its own `ModelError`."""


class InferenceClient(Protocol):
    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Loads the models; `ready` turns true when done. May take a while."""

    async def tag(self, images: list[bytes], deadline: float | None = None) -> list[TagResult]:
        """One result per encoded image, in order.

        `deadline` is an absolute `time.monotonic()` time; past it the call raises
        `DeadlineExceeded` rather than keep the caller waiting.
        """

    async def close(self) -> None: ...
