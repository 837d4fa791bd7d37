"""Inference on `imagetag worker` processes through Redis Streams, so gateways and GPU workers
scale apart. This module holds the wire format, shared with `inference.worker`, and the gateway's
`InferenceClient`.

Keys (one Redis database per deployment):

    imagetag:jobs               stream, one entry per image; workers read it as group `imagetag-workers`
    imagetag:workers            sorted set, worker id -> heartbeat expiry on Redis's clock
    imagetag:replies:{gateway}  stream per gateway process; workers add results, one task reads them

A job entry has the fields `job` (uuid hex), `reply` (the reply stream's key), `deadline` (Unix
epoch seconds: gateways and workers share no monotonic clock), `image` (the image's bytes
as the client sent them, header already checked: the worker decodes them, nothing is decoded and
re-encoded on the way) and `trace` (the request's W3C `traceparent` when tracing is on, else
empty; older gateways send none). A reply entry has one field, `result`, in JSON: `{"job": ...,
"tags": [[key, confidence, [[confidence, x, y, width, height], ...]], ...]}` or `{"job": ...,
"error": "model" | "undecodable" | "too_large" | "expired", "message": ...}`, both with `"models"`: the digests
of the worker's weights (`detector=sha256:HEX,...,classifier=sha256:HEX`), which the gateway
names in its answer (older workers send none); never pickle, so a worker cannot run code in a
gateway. A gateway that does not know an error kind takes it for "model". Workers ack and delete an answered job,
so the jobs stream's length is what is queued or in progress. Replies go to a stream, not a
list, because reading a stream takes nothing away: a read whose answer is lost to a timeout is
simply read again, where a popped list item would be gone.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from inference.client import (
    DeadlineExceeded,
    InferenceClosed,
    InferenceUnavailable,
    QueueFull,
    admission_deadline,
)
from inference.results import ImageTooLarge, Instance, ModelError, ScoredTag, TagResult, UndecodableImage
from inference.tasks import as_text, log_task_failure
from inference.vocabulary import Vocabulary

log = logging.getLogger(__name__)

# Checks for a live worker and the queue bound, then adds all of a request's jobs or none, in one
# atomic step. Liveness uses Redis's clock so that no two hosts' clocks need to agree. The bound
# counts the jobs no worker has taken yet, as the embedded queue does: the stream holds those and
# the ones workers have read and not yet answered (the group's pending entries). Counting the
# latter too would let the workers' own rounds (a round per model replica and one read ahead)
# fill the queue and keep a GPU worker from reading ahead.
_ENQUEUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZCOUNT', KEYS[2], now, '+inf') == 0 then return -1 end
local jobs = (#ARGV - 3) / 5
local waiting = redis.call('XLEN', KEYS[1])
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[3])
if type(pending) == 'table' and not pending.err then waiting = waiting - pending[1] end
if waiting + jobs > tonumber(ARGV[1]) then return -2 end
for i = 0, jobs - 1 do
  local a = 4 + i * 5
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'job', ARGV[a], 'reply', ARGV[a + 1],
             'deadline', ARGV[a + 2], 'image', ARGV[a + 3], 'trace', ARGV[a + 4])
end
return jobs
"""
_LIVE_WORKERS = """
local t = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, '+inf')
"""
_NO_WORKERS, _FULL = -1, -2
_ERROR_KINDS: dict[type[ModelError], str] = {UndecodableImage: "undecodable", ImageTooLarge: "too_large"}
_KIND_ERRORS = {kind: error for error, kind in _ERROR_KINDS.items()}


class NoWorkers(InferenceUnavailable):
    """No worker has sent a heartbeat lately, so nothing would serve the request."""


@dataclass(frozen=True)
class Channels:
    stream: str = "imagetag:jobs"
    group: str = "imagetag-workers"
    workers: str = "imagetag:workers"
    replies: str = "imagetag:replies"

    def reply_key(self, gateway: str) -> str:
        return f"{self.replies}:{gateway}"


@dataclass(frozen=True)
class Job:
    id: str
    reply_to: str
    deadline: float  # Unix epoch seconds
    image: bytes
    trace: str = ""  # W3C traceparent of the request, when it is traced


def parse_job(fields: Mapping[bytes | str, bytes | str]) -> Job:
    """A stream entry's fields as a `Job`; ValueError when they are not one."""
    values = {as_text(k): v for k, v in fields.items()}
    try:
        job = Job(
            as_text(values["job"]),
            as_text(values["reply"]),
            float(values["deadline"]),
            values["image"],
            as_text(values.get("trace", b"")),
        )
    except (KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"not a job: {error!r}") from None
    if not isinstance(job.image, bytes):
        raise ValueError("a job's image must be bytes (a client with decode_responses=True?)")
    return job


def encode_result(job_id: str, result: TagResult | DeadlineExceeded, models: str = "") -> bytes:
    reply: dict[str, object] = {"job": job_id, "models": models}
    if isinstance(result, DeadlineExceeded):
        reply |= {"error": "expired", "message": str(result)}
    elif isinstance(result, ModelError):
        kind = _ERROR_KINDS.get(type(result), "model")
        reply |= {"error": kind, "message": str(result)}
    else:
        reply["tags"] = [
            [t.tag.key, t.confidence, [[i.confidence, i.x, i.y, i.width, i.height] for i in t.instances]]
            for t in result
        ]
    return json.dumps(reply, separators=(",", ":")).encode()


def decode_result(payload: bytes, vocabulary: Vocabulary) -> tuple[str, TagResult | DeadlineExceeded]:
    """Raises ValueError, KeyError or TypeError on a malformed reply."""
    return decode_reply(json.loads(payload), vocabulary)


def decode_reply(reply: dict, vocabulary: Vocabulary) -> tuple[str, TagResult | DeadlineExceeded]:
    job_id = str(reply["job"])
    error = reply.get("error")
    if error == "expired":
        return job_id, DeadlineExceeded(reply.get("message") or "the deadline passed before a worker took the job")
    if error in _KIND_ERRORS:
        return job_id, _KIND_ERRORS[error](reply.get("message") or "the image cannot be decoded")
    if error is not None:
        return job_id, ModelError(reply.get("message") or "the model failed to process this image")
    tags = []
    for key, confidence, instances in reply["tags"]:
        tag = vocabulary.tags.get(key)
        if tag is None:  # a worker on a newer vocabulary, mid-rollout: lose a tag, not the request
            log.warning("a worker sent tag %r, unknown to this gateway's vocabulary", key)
            continue
        tags.append(ScoredTag(tag, float(confidence), tuple(Instance(*map(float, i)) for i in instances)))
    return job_id, tags


def blocking_budget(client: Redis, cap_s: float) -> float:
    """How long a blocking read may wait: under the client's socket timeout, which would cut it off."""
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return cap_s if socket_timeout is None else max(0.01, min(cap_s, socket_timeout / 2))


class RemoteInference:
    """An `InferenceClient` whose models run on worker processes; see the module docstring."""

    def __init__(
        self,
        client: Redis,
        *,
        channels: Channels = Channels(),
        queue_max: int = 64,
        default_timeout_s: float = 30.0,
        liveness_poll_s: float = 1.0,
        outage_grace_s: float = 2.0,
        vocabulary: Vocabulary | None = None,
        trace_context: Callable[[], str] | None = None,
    ) -> None:
        """`trace_context` gives the calling request's W3C traceparent ("" when not traced),
        which each job carries to the worker."""
        self._client = client
        self._trace_context = trace_context or (lambda: "")
        self._channels = channels
        self._queue_max = queue_max
        # A bound for the stream should a gateway ever skip the check; trimming drops jobs, so it
        # sits far above what the check lets through: the queue, and the workers' own rounds (192
        # for one GPU worker at its defaults) on top of it.
        self._stream_max = max(4 * queue_max, 10_000)
        self._default_timeout_s = default_timeout_s
        self._liveness_poll_s = liveness_poll_s
        self._outage_grace_s = outage_grace_s
        self._vocabulary = vocabulary
        self._reply_key = channels.reply_key(uuid.uuid4().hex)
        self._enqueue = client.register_script(_ENQUEUE)
        self._live_workers = client.register_script(_LIVE_WORKERS)
        self._waiting: dict[str, asyncio.Future[tuple[TagResult, str]]] = {}
        # The models that answered the request in hand, for its response's headers: set in the
        # request's own context, so that concurrent requests each see theirs.
        self._answered_by: contextvars.ContextVar[str] = contextvars.ContextVar(f"answered_by_{id(self)}", default="")
        self.last_models = ""  # of the latest reply, for the build_info metric
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers_seen_at: float | None = None  # monotonic time a live worker was last seen
        self._workers_alive = 0
        self._closed = False

    @property
    def ready(self) -> bool:
        seen = self._workers_seen_at
        return (
            not self._closed
            and seen is not None
            and time.monotonic() - seen < 3 * self._liveness_poll_s
        )

    @property
    def answered_by(self) -> str:
        """The weights' digests of the workers that answered this context's last `tag` call."""
        return self._answered_by.get()

    @property
    def workers_alive(self) -> int:
        """Workers with a current heartbeat, as of the last check (for the gateway's metrics)."""
        return self._workers_alive if self.ready else 0

    async def start(self) -> None:
        if self._vocabulary is None:
            self._vocabulary = await asyncio.to_thread(Vocabulary.load)
        if self._closed or self._tasks:
            return
        for job, name in ((self._read_replies, "replies"), (self._watch_workers, "liveness")):
            task = asyncio.create_task(job(), name=f"remote-inference-{name}")
            task.add_done_callback(log_task_failure(f"the remote inference task {name!r}"))
            self._tasks.add(task)

    async def tag(self, images: list[bytes], deadline: float | None = None) -> list[TagResult]:
        if self._closed:
            raise InferenceClosed("the inference client is closed")
        if not self._tasks:
            raise RuntimeError("start() the client first")
        deadline = admission_deadline(deadline, self._default_timeout_s)
        loop = asyncio.get_running_loop()
        jobs = {uuid.uuid4().hex: loop.create_future() for _ in images}
        # Registered before sending: the reply task may pop a result before XADD's answer arrives.
        self._waiting.update(jobs)
        futures = list(jobs.values())
        try:
            async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()) as budget:
                await self._submit(list(jobs), images, deadline)
                answers = await asyncio.gather(*futures)
        except TimeoutError:
            if budget.expired():
                raise DeadlineExceeded("the deadline passed before the workers answered") from None
            raise
        finally:
            for job_id, future in jobs.items():
                self._waiting.pop(job_id, None)
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved, so asyncio does not log it as forgotten
                future.cancel()
        self._answered_by.set(";".join(dict.fromkeys(models for _, models in answers if models)))
        return [result for result, _ in answers]

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Bounded: a cancellation that lands as a Redis timeout is swallowed, and the loops then
        # stop at their next turn, on `_closed`.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self._fail_waiting(InferenceClosed, "the inference client closed first")
        try:
            await self._client.delete(self._reply_key)
        except RedisError:
            pass  # the key expires by itself

    async def _submit(self, job_ids: list[str], images: list[bytes], deadline: float) -> None:
        epoch_deadline = repr(time.time() + deadline - time.monotonic())
        args: list[str | int | bytes] = [self._queue_max, self._stream_max, self._channels.group]
        trace = self._trace_context()
        for job_id, image in zip(job_ids, images):
            args += [job_id, self._reply_key, epoch_deadline, image, trace]
        try:
            outcome = await self._enqueue(keys=[self._channels.stream, self._channels.workers], args=args)
        except RedisError as error:
            raise InferenceUnavailable(f"the job queue (Redis) is unreachable: {error}") from None
        if outcome == _NO_WORKERS:
            raise NoWorkers("no inference worker is running")
        if outcome == _FULL:
            raise QueueFull("the inference queue is full")

    async def _read_replies(self) -> None:
        block_ms = max(1, int(blocking_budget(self._client, 1.0) * 1000))
        failing_since: float | None = None
        last_id: bytes | str = "0-0"
        while not self._closed:
            try:
                response = await self._client.xread({self._reply_key: last_id}, count=256, block=block_ms)
                entries = [entry for _, stream_entries in response or [] for entry in stream_entries]
                if entries:
                    last_id = entries[-1][0]
                    # Read is done with: drop all before the last (kept, as the read cursor).
                    await self._client.xtrim(self._reply_key, minid=last_id, approximate=False)
                failing_since = None
            except RedisError as error:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("cannot read inference results from Redis: %r", error)
                elif now - failing_since > self._outage_grace_s:
                    # Replies stored before the outage may be lost with Redis: fail now rather
                    # than keep every caller until its deadline.
                    self._fail_waiting(InferenceUnavailable, "lost contact with the job queue (Redis)")
                await asyncio.sleep(0.1)
                continue
            for _, fields in entries:
                self._deliver(fields.get(b"result", b""))

    def _deliver(self, payload: bytes) -> None:
        assert self._vocabulary is not None
        try:
            reply = json.loads(payload)
            job_id, result = decode_reply(reply, self._vocabulary)
            models = str(reply.get("models") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("dropped a malformed inference result: %.200r", payload)
            return
        # Popped on first delivery: a duplicate (a job served twice after a worker stalled) or
        # a late result finds nothing and is dropped; job ids are random, so none is misrouted.
        future = self._waiting.pop(job_id, None)
        if future is None or future.done():
            return
        if isinstance(result, DeadlineExceeded):
            future.set_exception(result)
        else:
            self.last_models = models or self.last_models
            future.set_result((result, models))

    async def _watch_workers(self) -> None:
        while not self._closed:
            try:
                self._workers_alive = int(await self._live_workers(keys=[self._channels.workers]))
                self._workers_seen_at = time.monotonic() if self._workers_alive else None
            except RedisError as error:
                if self._workers_seen_at is not None:
                    log.warning("cannot check for inference workers in Redis: %r", error)
                self._workers_alive, self._workers_seen_at = 0, None
            await asyncio.sleep(self._liveness_poll_s)

    def _fail_waiting(self, error: type[InferenceUnavailable], message: str) -> None:
        for job_id in list(self._waiting):
            future = self._waiting.pop(job_id)
            if not future.done():
                future.set_exception(error(message))
