"""The worker side of remote inference: `imagetag worker` serves `inference.remote`'s job stream.

Each round takes up to `max_batch_size` jobs with XREADGROUP (now and then XAUTOCLAIM's jobs of a
worker that stopped answering instead), answers expired ones without the models, runs the rest
through the models' `predict` (`inference.pipeline.DevicePipeline`: the job's bytes decoded on
the device where it can) on an idle model replica's thread, adds each job's own result to its
gateway's reply stream, then acks and deletes the entries. A worker holds at most one round more
than it has replicas: one in each, the next read and waiting for them, so that the device never
waits on Redis, and each round is answered while the others run. Waiting jobs beyond that go to
whichever worker is idle rather than queue behind a busy one.

Delivery is at least once: a worker killed mid-batch leaves its jobs pending, and once they have
been idle for the visibility timeout another worker claims and serves them. The gateway drops
the second result of a job served twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from inference.batching import BatchStats
from inference.client import DeadlineExceeded, ImageTagger
from inference.image_header import ModelInput
from inference.memory import MemoryTrimmer
from inference.pixel_budget import PixelBudget
from inference.remote import Channels, Job, blocking_budget, encode_result, parse_job
from inference.results import ImageTooLarge, ModelError, TagResult, UndecodableImage
from inference.tasks import as_text

log = logging.getLogger(__name__)

OUTCOMES = ("tagged", "undecodable", "model_error", "expired", "invalid")

# Heartbeats carry their expiry on Redis's clock, so gateways need neither this worker's
# interval nor a clock that agrees with this host's.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
_LIVE_MEMBERS = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, '+inf')
"""
_SWEEP_EVERY_S = 60.0
# A live gateway reads its replies at once; the bound only caps what a stuck one can pile up.
_REPLIES_MAX = 10_000
# Served one after the other, a round's read and answer left an H200 idle between batches: at
# batch 8, the worker answered 305 images/s with the GPU busy 19 % of the time. So one round is
# read ahead of the replicas.
_ROUNDS_READ_AHEAD = 1

Entry = tuple[bytes, dict[bytes, bytes]]


class WorkerObserver(Protocol):
    """Plain numbers for a metrics exporter; `service.worker_metrics` has the Prometheus one."""

    def loaded(self) -> None: ...

    def batch(self, stats: BatchStats) -> None: ...

    def jobs(self, outcome: str, count: int) -> None: ...

    def up(self, serving: bool) -> None: ...


class JobTracer(Protocol):
    """Records a finished span under a job's traceparent; `service.tracing` has the OTLP one."""

    def record(self, parent: str, name: str, start_s: float, end_s: float, attributes: dict[str, object]) -> None:
        """Times are Unix epoch seconds."""


@dataclass(frozen=True)
class WorkerConfig:
    channels: Channels = Channels()
    max_batch_size: int = 8
    max_wait_s: float = 0.0
    heartbeat_s: float = 2.0
    visibility_timeout_s: float = 15.0
    reply_ttl_s: float = 60.0  # beyond the job's deadline; a dead gateway's reply stream then expires
    models: str = ""  # the weights' digests, sent back with every result
    replicas: int = 1
    """Engines, each on a thread of its own, running rounds side by side (`build_engine` is
    called once for each)."""
    pixel_budget: int | None = None
    """Pixels the worker's model calls may decode at once, all replicas together
    (`inference.pixel_budget`); a round's jobs run in as many calls as that takes, and a call
    waits until the others leave it room. None: unbounded."""
    model_input: ModelInput = ModelInput()


def consumer_name() -> str:
    # The pid lets an operator find the process behind a consumer that XPENDING shows.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        client: Redis,
        build_engine: Callable[[], ImageTagger],
        config: WorkerConfig = WorkerConfig(),
        observer: WorkerObserver | None = None,
        tracer: JobTracer | None = None,
    ) -> None:
        self.name = consumer_name()
        self.models = config.models
        self._tracer = tracer
        self._client = client
        self._build_engine = build_engine
        self._config = config
        self._observer = observer
        # One thread per replica: an engine is not re-entrant.
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference-{i}") for i in range(config.replicas)
        ]
        self._idle: asyncio.Queue[tuple[ImageTagger, ThreadPoolExecutor]] = asyncio.Queue()
        self._budget = PixelBudget(config.pixel_budget, config.model_input)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._live_members = client.register_script(_LIVE_MEMBERS)
        self._block_ms = max(1, int(blocking_budget(client, 1.0) * 1000))
        self._claim_every_s = max(0.1, min(config.visibility_timeout_s / 2, 5.0))
        self._claim_cursor: bytes | str = "0-0"
        self._group_ready = False
        self._stopping = asyncio.Event()
        self._trimmer = MemoryTrimmer()

    def stop(self) -> None:
        """Finishes the batch in hand, then `run` returns."""
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for executor in self._executors:
                engine = await loop.run_in_executor(executor, self._build_engine)
                self._idle.put_nowait((engine, executor))
                if self._stopping.is_set():
                    return
            self._notify(lambda observer: observer.loaded())
            beating = asyncio.create_task(self._beat_forever(), name="worker-heartbeat")
            try:
                await self._serve()
            finally:
                self._stopping.set()  # also ends the heartbeat should its cancellation be lost
                beating.cancel()
                await asyncio.wait([beating], timeout=2.0)
                await self._leave()
        finally:
            self._notify(lambda observer: observer.up(False))
            for executor in self._executors:
                executor.shutdown(wait=False, cancel_futures=True)
            self._trimmer.close()

    async def _serve(self) -> None:
        next_claim = next_sweep = time.monotonic()
        failures = 0
        in_hand: list[asyncio.Task] = []
        try:
            while not self._stopping.is_set():
                try:
                    if not self._group_ready:
                        await self._create_group()
                        self._notify(lambda observer: observer.up(True))  # Redis answers: ready before the first read
                    await _at_most(in_hand, len(self._executors) + _ROUNDS_READ_AHEAD - 1)
                    entries: list[Entry] = []
                    if time.monotonic() >= next_claim:
                        next_claim = time.monotonic() + self._claim_every_s
                        entries = await self._claim()
                    if time.monotonic() >= next_sweep:
                        next_sweep = time.monotonic() + _SWEEP_EVERY_S
                        await self._forget_dead_consumers()
                    if not entries:
                        entries = await self._read()
                    if entries:
                        in_hand.append(asyncio.create_task(self._handle(entries), name="worker-round"))
                    failures = 0
                    self._notify(lambda observer: observer.up(True))
                except RedisError as error:
                    # Jobs in hand stay pending and are claimed again after the visibility timeout.
                    if isinstance(error, ResponseError) and "NOGROUP" in str(error):
                        self._group_ready = False  # Redis restarted empty, or the stream was deleted
                    failures += 1
                    self._notify(lambda observer: observer.up(False))
                    log.warning("Redis unavailable (%r); retrying", error)
                    await self._pause(min(0.1 * 2**failures, 2.0))
        finally:
            await asyncio.gather(*in_hand, return_exceptions=True)

    async def _create_group(self) -> None:
        channels = self._config.channels
        try:
            # From "0", not "$": jobs queued before the first worker came up are still served.
            await self._client.xgroup_create(channels.stream, channels.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    async def _read(self) -> list[Entry]:
        channels, size = self._config.channels, self._config.max_batch_size
        streams = {channels.stream: ">"}
        entries = _entries(
            await self._client.xreadgroup(channels.group, self.name, streams, count=size, block=self._block_ms)
        )
        if entries and len(entries) < size and self._config.max_wait_s > 0:
            # XREADGROUP returns as soon as one job is there: give the batch a moment to fill.
            await asyncio.sleep(self._config.max_wait_s)
            more = await self._client.xreadgroup(channels.group, self.name, streams, count=size - len(entries))
            entries += _entries(more)
        return entries

    async def _claim(self) -> list[Entry]:
        channels = self._config.channels
        cursor, claimed, *_ = await self._client.xautoclaim(
            channels.stream,
            channels.group,
            self.name,
            min_idle_time=int(self._config.visibility_timeout_s * 1000),
            start_id=self._claim_cursor,
            count=self._config.max_batch_size,
        )
        self._claim_cursor = cursor
        # Redis (7.0+) drops entries deleted meanwhile from the pending list and lists them apart.
        entries = [(entry_id, fields) for entry_id, fields in claimed if entry_id is not None and fields]
        if entries:
            log.warning("claimed %d jobs left unanswered by another worker", len(entries))
        return entries

    async def _handle(self, entries: list[Entry]) -> None:
        now = time.time()
        replies: list[tuple[Job, TagResult | DeadlineExceeded]] = []
        live: list[Job] = []
        waits: list[float] = []
        invalid = 0
        for entry_id, fields in entries:
            try:
                job = parse_job(fields)
            except ValueError as error:
                invalid += 1  # nowhere to answer: ack and drop it
                log.warning("dropped a malformed job: %s", error)
                continue
            if job.deadline <= now:
                replies.append((job, DeadlineExceeded("the deadline passed before a worker took the job")))
            else:
                live.append(job)
                waits.append(max(0.0, now - _enqueued_at(entry_id)))
        model_s = 0.0
        if live:
            started = time.monotonic()
            for part, pixels in self._within_budget(live, replies):
                replies += zip(part, await self._run_on_a_replica(part, pixels))
            model_s = time.monotonic() - started
            self._trace(live, waits, now, model_s)
        queued = await self._answer(replies, [entry_id for entry_id, _ in entries])
        for outcome, count in _outcomes(replies, invalid).items():
            self._notify(lambda observer: observer.jobs(outcome, count))
        if live:
            # Queue depth as the batch is answered, not as it was sent: that saves a round trip.
            stats = BatchStats(len(live), tuple(waits), model_s, queued)
            self._notify(lambda observer: observer.batch(stats))

    def _within_budget(
        self, jobs: list[Job], replies: list[tuple[Job, TagResult | DeadlineExceeded]]
    ) -> list[tuple[list[Job], int]]:
        """`jobs` in order, in runs whose pixels fit the budget, each with its pixels; a job that
        alone needs more is answered `ImageTooLarge` in `replies` instead."""
        parts: list[tuple[list[Job], int]] = []
        part: list[Job] = []
        used = 0
        for job in jobs:
            try:
                pixels = self._budget.cost(job.image)
            except ImageTooLarge as refused:
                replies.append((job, refused))
                continue
            if part and not self._budget.holds(used + pixels):
                parts.append((part, used))
                part, used = [], 0
            part.append(job)
            used += pixels
        if part:
            parts.append((part, used))
        return parts

    async def _run_on_a_replica(self, jobs: list[Job], pixels: int) -> list[TagResult]:
        """The jobs' results from the first idle replica, once the budget has room for their pixels."""
        await self._budget.take_when_free(pixels)
        try:
            engine, executor = await self._idle.get()
            try:
                return await asyncio.get_running_loop().run_in_executor(executor, self._predict, engine, jobs, pixels)
            finally:
                self._idle.put_nowait((engine, executor))
        finally:
            self._budget.give_back(pixels)

    def _predict(self, engine: ImageTagger, jobs: list[Job], pixels: int) -> list[TagResult]:
        try:
            return _predict(engine, [job.image for job in jobs])
        finally:
            self._trimmer.freed(pixels)

    async def _answer(self, replies: list[tuple[Job, TagResult | DeadlineExceeded]], entry_ids: list[bytes]) -> int:
        """Pushes the results, then acks and deletes the entries; gives the jobs no worker has
        taken yet (the stream's length less the group's pending entries), the queue the gateways
        bound."""
        channels = self._config.channels
        # Not a transaction: reply streams and the job stream may live on different cluster nodes,
        # and a result sent twice is harmless. Results first: an ack must never outrun its result.
        pipe = self._client.pipeline(transaction=False)
        ttls: dict[str, int] = {}
        for job, result in replies:
            reply = {"result": encode_result(job.id, result, self._config.models)}
            pipe.xadd(job.reply_to, reply, maxlen=_REPLIES_MAX, approximate=True)
            ttl = math.ceil(max(0.0, job.deadline - time.time()) + self._config.reply_ttl_s)
            ttls[job.reply_to] = max(ttl, ttls.get(job.reply_to, 0))
        for reply_to, ttl in ttls.items():  # once per gateway, not per job: a round is mostly a few gateways'
            pipe.expire(reply_to, ttl)
        pipe.xack(channels.stream, channels.group, *entry_ids)
        pipe.xdel(channels.stream, *entry_ids)
        pipe.xlen(channels.stream)
        pipe.xpending(channels.stream, channels.group)
        *_, length, pending = await pipe.execute()
        return max(0, int(length) - int(pending["pending"]))

    async def _forget_dead_consumers(self) -> None:
        # Every restart adds a consumer to the group; drop those with no heartbeat and nothing
        # pending (deleting one with pending jobs would lose them).
        channels = self._config.channels
        live = {as_text(m) for m in await self._live_members(keys=[channels.workers])}
        for consumer in await self._client.xinfo_consumers(channels.stream, channels.group):
            name = as_text(consumer["name"])
            idle_s = consumer["idle"] / 1000
            if name != self.name and name not in live and consumer["pending"] == 0 and idle_s > _SWEEP_EVERY_S:
                await self._client.xgroup_delconsumer(channels.stream, channels.group, name)

    async def _beat_forever(self) -> None:
        ttl = 3 * self._config.heartbeat_s
        while not self._stopping.is_set():
            try:
                await self._heartbeat(keys=[self._config.channels.workers], args=[self.name, ttl])
            except RedisError as error:
                log.warning("heartbeat failed: %r", error)
            await asyncio.sleep(self._config.heartbeat_s)

    async def _leave(self) -> None:
        try:  # gateways stop counting on this worker at once, not when its heartbeat runs out
            await self._client.zrem(self._config.channels.workers, self.name)
        except RedisError:
            pass

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    def _trace(self, jobs: list[Job], waits: list[float], taken_at: float, model_s: float) -> None:
        """Each traced job's time in the queue and in the models, as spans under its request."""
        if self._tracer is None:
            return
        for job, wait in zip(jobs, waits):
            if not job.trace:
                continue
            try:
                self._tracer.record(job.trace, "imagetag.queue", taken_at - wait, taken_at, {"imagetag.job": job.id})
                self._tracer.record(
                    job.trace, "imagetag.worker.predict", taken_at, taken_at + model_s,
                    {"imagetag.job": job.id, "imagetag.batch_size": len(jobs), "imagetag.worker": self.name},
                )
            except Exception:
                log.exception("recording a job's trace failed")

    def _notify(self, report: Callable[[WorkerObserver], None]) -> None:
        """Calls the observer, if any; a failing metrics exporter must not stop the worker."""
        if self._observer is None:
            return
        try:
            report(self._observer)
        except Exception:
            log.exception("the worker metrics hook failed")


async def _at_most(rounds: list[asyncio.Task], count: int) -> None:
    """Waits until no more than `count` of `rounds` are unfinished, and leaves only those in it.
    A finished round's error (Redis's, while answering) is raised here, in the serving loop."""
    while sum(not task.done() for task in rounds) > count:
        await asyncio.wait([task for task in rounds if not task.done()], return_when=asyncio.FIRST_COMPLETED)
    finished = [task for task in rounds if task.done()]
    rounds[:] = [task for task in rounds if not task.done()]
    for task in finished:
        task.result()


def _predict(engine: ImageTagger, images: list[bytes]) -> list[TagResult]:
    """Runs on the model thread; the models answer an undecodable image in its own slot."""
    try:
        return engine.predict(images)
    except Exception:
        # The models already isolate a bad image; reaching here is a bug, so fail only this batch.
        log.exception("a batch of %d images failed", len(images))
        return [ModelError("the model failed to process this image") for _ in images]


def _outcomes(replies: list[tuple[Job, TagResult | DeadlineExceeded]], invalid: int) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    counts["invalid"] = invalid
    for _, result in replies:
        if isinstance(result, DeadlineExceeded):
            counts["expired"] += 1
        elif isinstance(result, UndecodableImage):  # the client's bytes, not the models, are at fault
            counts["undecodable"] += 1
        elif isinstance(result, ModelError):
            counts["model_error"] += 1
        else:
            counts["tagged"] += 1
    return {outcome: count for outcome, count in counts.items() if count}


def _entries(response: list | None) -> list[Entry]:
    return [entry for _, entries in response or [] for entry in entries]


def _enqueued_at(entry_id: bytes) -> float:
    # A stream id starts with the Redis server's milliseconds when the job was added.
    return int(entry_id.split(b"-")[0]) / 1000


async def run_until_signalled(worker: Worker) -> None:
    """Runs `worker`; SIGTERM or SIGINT stops it once the batch in hand is answered."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
