"""Dynamic micro-batching: concurrent `tag` calls share one model call.

A caller enqueues one `Job` per encoded image and awaits its future. One loop takes jobs off a
bounded queue with `collate`, hands each batch to an idle `ImageTagger` replica (each on a
thread of its own) for `predict`, and gives each job its own result. While batches run, the next collects. Jobs whose caller has gone, or whose
deadline has passed, are dropped before they reach the models.

Memory is bounded by pixels (`inference.pixel_budget`): the batches in the models together never
hold more than `pixel_budget`. A batch takes jobs in order while they fit; the first that does
not waits, at the head of the line, for running batches to finish (its deadline still applies).
An image that alone costs more than the whole budget is answered `ImageTooLarge` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from inference.client import DeadlineExceeded, ImageTagger, InferenceClosed, QueueFull, admission_deadline
from inference.image_header import ModelInput
from inference.memory import MemoryTrimmer
from inference.pixel_budget import PixelBudget
from inference.results import ImageTooLarge, ModelError, TagResult
from inference.tasks import log_task_failure

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class BatchStats:
    """One batch, as plain numbers for the metrics exporter."""

    size: int
    queue_wait_s: tuple[float, ...]  # per job: enqueued -> sent to the models
    model_s: float
    queue_depth: int  # jobs still queued when the batch was sent


@dataclass(eq=False)
class Job:
    image: bytes
    deadline: float  # absolute, on the same clock as `collate`'s
    future: asyncio.Future[TagResult]
    enqueued_at: float = field(default_factory=time.monotonic)
    pixels: int = 0
    """What decoding it holds; counted against the budget while its batch runs."""


def _admit(job: Job, batch: list[Job], now: float) -> None:
    if job.future.done():  # cancelled: the caller has gone
        return
    if job.deadline <= now:
        job.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
        return
    batch.append(job)


def take_ready(
    queue: asyncio.Queue[Job], batch: list[Job], max_batch_size: int, clock: Clock, held: Sequence[Job] = ()
) -> None:
    """Adds the live ones of `held`, then jobs already queued, to `batch`, without waiting, up to
    `max_batch_size`."""
    for job in held:
        _admit(job, batch, clock())
    while len(batch) < max_batch_size and not queue.empty():
        _admit(queue.get_nowait(), batch, clock())


async def collate(
    queue: asyncio.Queue[Job],
    max_batch_size: int,
    max_wait_s: float,
    clock: Clock = time.monotonic,
    held: Sequence[Job] = (),
) -> list[Job]:
    """Waits for a live job, then gathers more until `max_batch_size` or `max_wait_s` after it.
    `held`: jobs taken off the queue earlier, which go first.

    Cancelled jobs are skipped; expired ones are failed with `DeadlineExceeded`. Never empty.
    """
    batch: list[Job] = []
    for job in held:
        _admit(job, batch, clock())
    while not batch:
        _admit(await queue.get(), batch, clock())
    window_end = clock() + max_wait_s
    while len(batch) < max_batch_size:
        take_ready(queue, batch, max_batch_size, clock)
        remaining = window_end - clock()
        if len(batch) >= max_batch_size or remaining <= 0:
            break
        try:
            job = await asyncio.wait_for(queue.get(), remaining)
        except TimeoutError:
            break
        _admit(job, batch, clock())
    return batch


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 8
    max_wait_s: float = 0.0
    """How long the first image of a batch waits for company."""
    max_queue: int = 64
    """Images waiting beyond which `tag` raises `QueueFull` at once."""
    default_timeout_s: float = 30.0
    replicas: int = 1
    """Engines, each on a thread of its own, serving batches side by side."""
    pixel_budget: int | None = None
    """Pixels the running batches may hold in all (see the module's docstring); None: unbounded."""
    model_input: ModelInput = ModelInput()
    """What the engines decode images down to; the cost of an image follows from it."""


class BatchingInference:
    """An `InferenceClient` that batches concurrent requests for its model replicas."""

    def __init__(
        self,
        build_engine: Callable[[], ImageTagger],
        config: BatchingConfig = BatchingConfig(),
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._build_engine = build_engine
        self._config = config
        self._on_batch = on_batch
        self._started = False
        # One thread per replica: an engine is not re-entrant. On a small CPU, two single-threaded
        # replicas keep the cores busier than one replica with two intra-op threads
        # (load-tests/benchmark.py).
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference-{i}") for i in range(config.replicas)
        ]
        self._idle: asyncio.Queue[tuple[ImageTagger, ThreadPoolExecutor]] = asyncio.Queue()
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.max_queue)
        self._pending: set[asyncio.Future[TagResult]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._budget = PixelBudget(config.pixel_budget, config.model_input)
        self._trimmer = MemoryTrimmer()

    @property
    def ready(self) -> bool:
        return self._started and not self._closed

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for executor in self._executors:
            engine = await loop.run_in_executor(executor, self._build_engine)
            if self._closed:
                return
            self._idle.put_nowait((engine, executor))
        self._started = True
        self._loop_task = asyncio.create_task(self._batch_loop(), name="inference-batcher")
        self._loop_task.add_done_callback(log_task_failure("the batching loop"))

    async def tag(self, images: list[bytes], deadline: float | None = None) -> list[TagResult]:
        if self._closed:
            raise InferenceClosed("the inference client is closed")
        if not self._started:
            raise RuntimeError("models are not loaded yet")
        deadline = admission_deadline(deadline, self._config.default_timeout_s)
        # All of a request's images or none: a half-queued request would only waste model time.
        if self._queue.maxsize - self._queue.qsize() < len(images):
            raise QueueFull("the inference queue is full")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[TagResult]] = []
        for image in images:
            future: asyncio.Future[TagResult] = loop.create_future()
            futures.append(future)
            try:
                pixels = self._budget.cost(image)
            except ImageTooLarge as refused:
                future.set_result(refused)
                continue
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
            self._queue.put_nowait(Job(image, deadline, future, pixels=pixels))
        try:
            # asyncio.timeout runs on the loop's clock; re-base the monotonic deadline onto it.
            async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the models finished") from None
        finally:
            # A job whose caller stopped waiting is skipped by `collate`, or its late result dropped.
            for future in futures:
                future.cancel()

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in list(self._pending):
            if not future.done():
                future.set_exception(InferenceClosed("the inference client closed first"))
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        self._trimmer.close()

    async def _batch_loop(self) -> None:
        config = self._config
        # At most one batch per replica; the next one collects meanwhile. Queueing more in the
        # executors would move jobs out of the bounded queue and defeat its backpressure.
        held: list[Job] = []
        while True:
            batch = await collate(self._queue, config.max_batch_size, config.max_wait_s, held=held)
            replica = await self._idle.get()
            # Waiting for a replica took time: re-check who still wants a result, then fill up.
            live: list[Job] = []
            take_ready(self._queue, live, config.max_batch_size, time.monotonic, held=batch)
            live, held = await self._within_budget(live)
            if not live:
                self._idle.put_nowait(replica)
                continue
            task = asyncio.create_task(self._run_batch(replica, live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _predict(self, engine: ImageTagger, batch: list[Job]) -> list[TagResult]:
        try:
            return engine.predict([job.image for job in batch])
        finally:
            self._trimmer.freed(sum(job.pixels for job in batch))

    async def _within_budget(self, jobs: list[Job]) -> tuple[list[Job], list[Job]]:
        """The longest run of `jobs` that fits in the pixels free, waiting for running batches
        to free enough for the first; and the rest, which go first into the next batch."""
        while jobs and not self._budget.fits(jobs[0].pixels):
            await self._budget.freed()
            now = time.monotonic()
            still: list[Job] = []
            for job in jobs:
                _admit(job, still, now)
            jobs = still
        taken = 0
        for job in jobs:
            if not self._budget.fits(job.pixels):
                break
            self._budget.take(job.pixels)
            taken += 1
        return jobs[:taken], jobs[taken:]

    async def _run_batch(self, replica: tuple[ImageTagger, ThreadPoolExecutor], batch: list[Job]) -> None:
        engine, executor = replica
        try:
            queue_depth = self._queue.qsize()
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(executor, self._predict, engine, batch)
            except Exception:
                # The models already isolate a bad image; reaching here is a bug, so fail only
                # this batch and keep serving.
                log.exception("a batch of %d images failed", len(batch))
                results = [ModelError("the model failed to process this image") for _ in batch]
            model_s = time.monotonic() - started
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            self._budget.give_back(sum(job.pixels for job in batch))
            self._idle.put_nowait(replica)
        waits = tuple(started - job.enqueued_at for job in batch)
        self._report(BatchStats(len(batch), waits, model_s, queue_depth))

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            log.exception("the batch statistics hook failed")
