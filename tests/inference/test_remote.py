"""Remote inference over Redis Streams: a real redis-server, real `imagetag worker` processes with
the real models, and the gateway's `RemoteInference`; the protocol edge cases with a hand-played
worker. Each test owns a Redis database of the session's server."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from inference.client import DeadlineExceeded, InferenceUnavailable, QueueFull
from inference.results import ModelError, ScoredTag, UndecodableImage
from inference.remote import Channels, NoWorkers, RemoteInference, decode_result, encode_result, parse_job
from inference.vocabulary import Vocabulary
from inference.worker import Worker, WorkerConfig
from tests.conftest import (
    DETECTOR_WEIGHTS,
    PHOTOS,
    REPO,
    RedisProcess,
    free_port,
    photo_base64,
    start_server,
    stop_server,
)

CHANNELS = Channels()
VISIBILITY_S = 3.0
# Photos whose main subject the models put in the top five whichever way the images travel.
GOOD = {
    "airplane_cutout.jpg": "airplane", "astronaut.jpg": "person", "bird_nuthatch.jpg": "bird",
    "boats_lake.jpg": "boat", "bus.jpg": "bus", "cameraman_gray.jpg": "person", "cat_chelsea.jpg": "cat",
    "china_temple.jpg": "building", "coffee.jpg": "espresso", "dogs_spaniels.jpg": "dog", "fig.jpg": "fig",
    "fire_truck_cutout.jpg": "fire engine", "grace_hopper.jpg": "person", "ladybug.jpg": "ladybug",
    "mountain_picos.jpg": "mountain", "portrait_man.jpg": "person", "strawberry_cutout.jpg": "strawberry",
}
VOCABULARY = Vocabulary.load()


def run(body: Awaitable[None]) -> None:
    asyncio.run(body)


def db_url(server: RedisProcess, db: int) -> str:
    return f"redis://127.0.0.1:{server.port}/{db}"


def fresh_db(server: RedisProcess, db: int) -> str:
    url = db_url(server, db)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def async_client(url: str) -> Redis:
    # As the gateway builds it: short timeouts and one retry, so an outage fails fast.
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


async def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def gateway(url: str, *, ready: bool = True, **options) -> AsyncIterator[RemoteInference]:
    client = async_client(url)
    inference = RemoteInference(client, liveness_poll_s=0.1, vocabulary=VOCABULARY, **options)
    await inference.start()
    try:
        if ready:
            await wait_for(lambda: inference.ready, 10)
        yield inference
    finally:
        await inference.close()
        await client.aclose()


def fake_live_worker(url: str) -> None:
    """A heartbeat with no process behind it: gateways queue jobs that nobody takes."""
    with redis.Redis.from_url(url) as client:
        client.zadd(CHANNELS.workers, {"fake": time.time() + 3600})


def assert_own_tags(name: str, tags: list[ScoredTag]) -> None:
    # Top 8, not test_quality's 5: on the detector's square letterbox fig.jpg gains a "frisbee"
    # box that can push "fig" down the list.
    top = [t.tag.en for t in tags[:8]]
    assert GOOD[name] in top, f"{name} got {top}"


# Workers: real processes with the real models


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    metrics_port: int
    log: Path

    def metrics(self) -> dict[str, float]:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True) * bool(sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@dataclass
class Workers:
    url: str
    processes: list[WorkerProcess]

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.processes if w.process.poll() is None]


def start_worker(url: str, log_dir: Path) -> WorkerProcess:
    port = free_port()
    log = log_dir / f"worker-{port}.log"
    env = {
        **os.environ,
        "IMAGETAG_REDIS_URL": url,
        "IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS),
        "IMAGETAG_METRICS_PORT": str(port),
        "IMAGETAG_TORCH_THREADS": "1",
        "IMAGETAG_BATCH_MAX_SIZE": "2",
        "IMAGETAG_JOB_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "IMAGETAG_WORKER_HEARTBEAT_S": "0.5",
    }
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
        )
    return WorkerProcess(process, port, log)


@pytest.fixture(scope="module")
def workers(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    url = fresh_db(redis_server, 1)
    log_dir = tmp_path_factory.mktemp("workers")
    pool = Workers(url, [start_worker(url, log_dir) for _ in range(2)])
    try:
        deadline = time.monotonic() + 180
        with redis.Redis.from_url(url) as client:
            while client.zcard(CHANNELS.workers) < 2:
                for worker in pool.processes:
                    assert worker.process.poll() is None, worker.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "workers did not start"
                time.sleep(0.1)
        yield pool
    finally:
        alive = pool.alive()
        for worker in alive:
            worker.process.send_signal(signal.SIGTERM)
        for worker in pool.processes:
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
    # SIGTERM is a graceful stop: the batch in hand is answered and the process exits cleanly.
    assert [w.process.returncode for w in alive] == [0] * len(alive)


def test_concurrent_photos_each_get_their_own_tags(workers: Workers):
    names = sorted(p.name for p in PHOTOS.glob("*.jpg")) * 2
    random.Random(7).shuffle(names)

    async def body() -> None:
        async with gateway(workers.url) as inference:
            results = await asyncio.gather(*(inference.tag([photo(name)]) for name in names))
        top_three: dict[str, list[set[str]]] = {}
        for name, (tags,) in zip(names, results):
            assert isinstance(tags, list), f"{name}: {tags!r}"
            if name in GOOD:
                assert_own_tags(name, tags)
            top_three.setdefault(name, []).append({t.tag.key for t in tags[:3]})
        # Both copies of each photo, the models' misses included, got that photo's answer.
        for name, (first, second) in top_three.items():
            assert first == second, name

    run(body())


def test_worker_metrics_move(workers: Workers):
    async def body() -> None:
        async with gateway(workers.url) as inference:
            await inference.tag([photo("bus.jpg")])

    def total(name: str) -> float:
        return sum(w.metrics()[name] for w in workers.alive())

    tagged, batches = 'imagetag_worker_jobs_total{"outcome": "tagged"}', "imagetag_worker_batches_total"
    tagged_before, batches_before = total(tagged), total(batches)
    run(body())
    assert total(tagged) == tagged_before + 1
    assert total(batches) == batches_before + 1
    after = [w.metrics() for w in workers.alive()]
    for metrics in after:
        assert metrics["imagetag_worker_up"] == 1
        assert metrics["imagetag_worker_batch_size_count"] == metrics["imagetag_worker_batches_total"]
        assert metrics["imagetag_worker_model_seconds_sum"] > 0
        assert 'imagetag_worker_jobs_total{"outcome": "expired"}' in metrics


def test_expired_and_broken_jobs_are_answered_without_the_models(workers: Workers):
    reply_to = "test:replies:expired"
    with redis.Redis.from_url(workers.url) as client:
        for job_id, deadline, image in (
            ("late", time.time() - 1, (PHOTOS / "bus.jpg").read_bytes()),
            ("broken", time.time() + 30, b"not an image"),
            ("good", time.time() + 30, (PHOTOS / "cat_chelsea.jpg").read_bytes()),
        ):
            job = {"job": job_id, "reply": reply_to, "deadline": repr(deadline), "image": image}
            client.xadd(CHANNELS.stream, job)
        client.xadd(CHANNELS.stream, {"nonsense": "no reply key"})
        answers, last_id = {}, "0-0"
        while len(answers) < 3:
            read = client.xread({reply_to: last_id}, block=30_000)
            assert read, "no reply"
            for last_id, fields in read[0][1]:
                job_id, result = decode_result(fields[b"result"], VOCABULARY)
                answers[job_id] = result
        assert isinstance(answers["late"], DeadlineExceeded)
        # Not an image: the worker's models answer the contract's "corrupt", not a model failure.
        assert isinstance(answers["broken"], UndecodableImage)
        assert_own_tags("cat_chelsea.jpg", answers["good"])
        assert client.ttl(reply_to) > 30  # a dead gateway's replies do not stay forever
        # Answered or malformed, every entry is acked and deleted.
        deadline = time.monotonic() + 5
        while client.xlen(CHANNELS.stream) or client.xpending(CHANNELS.stream, CHANNELS.group)["pending"]:
            assert time.monotonic() < deadline, "entries left behind"
            time.sleep(0.05)


def test_end_to_end_over_http(workers: Workers, tmp_path: Path):
    env = {
        "IMAGETAG_INFERENCE": "remote",
        "IMAGETAG_REDIS_URL": workers.url,
        "IMAGETAG_AUTH_MODE": "none",
        "IMAGETAG_MASTER_KEY": "remote-inference-test-master-key",
    }
    server = start_server(tmp_path, env=env)
    try:
        response = requests.post(
            server.url("/v2.0/image/tagging"), json={"image": photo_base64("cat_chelsea.jpg")}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert "cat" in [t["i18n_tag"]["en"] for t in response.json()["result"]["tags"]]
    finally:
        stop_server(server)


def test_worker_killed_mid_batch_loses_nothing(workers: Workers):
    names = sorted(GOOD)[:16]
    by_pid = {w.process.pid: w for w in workers.alive()}
    assert len(by_pid) == 2

    async def timed(call: Awaitable, started: float) -> tuple[object, float]:
        try:
            return await call, time.monotonic() - started
        except DeadlineExceeded as error:
            return error, time.monotonic() - started

    async def body() -> None:
        control = async_client(workers.url)
        try:
            async with gateway(workers.url) as inference:
                started = time.monotonic()
                deadline = started + 25
                calls = [asyncio.create_task(timed(inference.tag([photo(n)], deadline), started)) for n in names]
                # The victim is a worker holding jobs, that is, in the middle of a batch.
                pending = []
                while not pending:
                    assert time.monotonic() < deadline, "no worker took a job"
                    pending = await control.xpending_range(CHANNELS.stream, CHANNELS.group, "-", "+", 100)
                victim_name = pending[0]["consumer"].decode()
                victim = by_pid[int(victim_name.split(":")[1])]
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()
                held = await control.xpending_range(CHANNELS.stream, CHANNELS.group, "-", "+", 100, victim_name)
                assert held, "the victim was killed between batches"
                outcomes = await asyncio.gather(*calls)
            for name, (outcome, elapsed) in zip(names, outcomes):
                assert not isinstance(outcome, DeadlineExceeded), f"{name} timed out after {elapsed:.1f}s"
                (tags,) = outcome
                assert_own_tags(name, tags)
            # The victim's jobs were claimed and served by the survivor; nothing is left.
            consumers = await control.xinfo_consumers(CHANNELS.stream, CHANNELS.group)
            assert {c["name"].decode(): c["pending"] for c in consumers}[victim_name] == 0
            assert await control.xlen(CHANNELS.stream) == 0
        finally:
            await control.aclose()

    run(body())


# The gateway's side alone, against a hand-played worker


def test_no_live_worker_fails_fast(redis_server: RedisProcess):
    url = fresh_db(redis_server, 2)
    with redis.Redis.from_url(url) as client:
        client.zadd(CHANNELS.workers, {"gone": time.time() - 1})  # a heartbeat that ran out

    async def body() -> None:
        async with gateway(url, ready=False) as inference:
            await asyncio.sleep(0.3)
            assert not inference.ready
            started = time.monotonic()
            with pytest.raises(NoWorkers):
                await inference.tag([photo("bus.jpg")])
            assert time.monotonic() - started < 0.5
            fake_live_worker(url)
            await wait_for(lambda: inference.ready, 2)

    run(body())


def test_full_queue_refuses_at_once_and_jobs_a_worker_has_taken_leave_it(redis_server: RedisProcess):
    """As in one process, the bound is on images waiting for the models, not those in them: a
    worker's rounds in hand must not fill the gateways' queue."""
    url = fresh_db(redis_server, 3)
    fake_live_worker(url)
    image = photo("bus.jpg")

    async def body() -> None:
        async with gateway(url, queue_max=4) as inference:
            waiting = [asyncio.create_task(inference.tag([image])) for _ in range(3)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(QueueFull):
                await inference.tag([image, image])  # all of a request's images or none
            waiting.append(asyncio.create_task(inference.tag([image])))
            await asyncio.sleep(0.2)
            with pytest.raises(QueueFull):
                await inference.tag([image])
            assert time.monotonic() - started < 0.5
            with redis.Redis.from_url(url) as client:  # a worker takes all four into its rounds
                client.xgroup_create(CHANNELS.stream, CHANNELS.group, id="0", mkstream=True)
                taken = client.xreadgroup(CHANNELS.group, "busy-worker", {CHANNELS.stream: ">"}, count=10)
                assert len(taken[0][1]) == 4
            waiting.append(asyncio.create_task(inference.tag([image] * 4)))  # room for four again
            await asyncio.sleep(0.2)
            assert not waiting[-1].done()  # queued, not refused
            with pytest.raises(QueueFull):
                await inference.tag([image])
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        with redis.Redis.from_url(url) as client:
            assert client.xlen(CHANNELS.stream) == 8

    run(body())


def test_deadline_exceeded_promptly(redis_server: RedisProcess):
    url = fresh_db(redis_server, 3)
    fake_live_worker(url)

    async def body() -> None:
        async with gateway(url) as inference:
            started, wall_deadline = time.monotonic(), time.time() + 0.3
            with pytest.raises(DeadlineExceeded):
                await inference.tag([photo("bus.jpg")], started + 0.3)
            assert 0.3 <= time.monotonic() - started < 0.45
        with redis.Redis.from_url(url) as client:
            ((_, [(_, fields)]),) = client.xread({CHANNELS.stream: "0"})
        # The job carries its deadline on the wall clock, for workers on other hosts.
        assert abs(parse_job(fields).deadline - wall_deadline) < 0.05

    run(body())


def test_results_reach_their_own_caller_once(redis_server: RedisProcess):
    url = fresh_db(redis_server, 4)
    fake_live_worker(url)
    cat, dog, bus = (ScoredTag(VOCABULARY.tags[key], confidence) for key, confidence in
                     (("cat", 0.9), ("dog", 0.8), ("bus", 0.7)))

    async def body() -> None:
        control = async_client(url)
        await control.xgroup_create(CHANNELS.stream, CHANNELS.group, id="0", mkstream=True)
        try:
            async with gateway(url) as inference:
                calls = [asyncio.create_task(inference.tag([bytes(8 + i)])) for i in range(4)]
                jobs, deadline = [], time.monotonic() + 5
                while len(jobs) < 4:
                    assert time.monotonic() < deadline, "the gateway queued no jobs"
                    read = await control.xreadgroup(CHANNELS.group, "hand", {CHANNELS.stream: ">"}, block=100)
                    jobs += [parse_job(fields) for _, entries in read or [] for _, fields in entries]
                # By its length, each job tells which call it belongs to.
                jobs.sort(key=lambda job: len(job.image))
                first, second, third, fourth = jobs
                for payload in (
                    encode_result("no-such-job", [bus]),  # unknown: dropped
                    b"{not json",  # malformed: dropped
                    encode_result(first.id, [cat]),
                    encode_result(first.id, [bus]),  # a duplicate: dropped
                    encode_result(second.id, [dog]),
                    encode_result(third.id, ModelError("boom")),
                    encode_result(fourth.id, DeadlineExceeded("late")),
                ):
                    await control.xadd(first.reply_to, {"result": payload})
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await control.aclose()
        assert outcomes[0] == [[cat]]
        assert outcomes[1] == [[dog]]
        assert isinstance(outcomes[2][0], ModelError) and str(outcomes[2][0]) == "boom"
        assert isinstance(outcomes[3], DeadlineExceeded)

    run(body())


def test_redis_outage_fails_fast(tmp_path: Path):
    own = RedisProcess(tmp_path)
    own.start()
    url = db_url(own, 0)
    fake_live_worker(url)

    async def body() -> None:
        try:
            async with gateway(url, outage_grace_s=0.5) as inference:
                in_flight = asyncio.create_task(inference.tag([photo("bus.jpg")]))
                await asyncio.sleep(0.2)
                own.stop()
                started = time.monotonic()
                with pytest.raises(InferenceUnavailable) as caught:
                    await in_flight  # not held until its 30 s deadline
                assert not isinstance(caught.value, DeadlineExceeded)
                with pytest.raises(InferenceUnavailable):
                    await inference.tag([photo("bus.jpg")])
                assert time.monotonic() - started < 3
                await wait_for(lambda: not inference.ready, 2)
        finally:
            own.stop()

    run(body())


class StubEngine:
    """Stands in for the models where only the plumbing is under test: a cat, as sure as the
    image is long in hundreds of bytes."""

    def predict(self, images: list[bytes]) -> list[list[ScoredTag]]:
        return [[ScoredTag(VOCABULARY.tags["cat"], len(image) / 100)] for image in images]


def test_worker_and_gateway_recover_when_redis_restarts_empty(tmp_path: Path):
    own = RedisProcess(tmp_path)
    own.start()
    url = db_url(own, 0)
    config = WorkerConfig(heartbeat_s=0.1, visibility_timeout_s=1.0)

    async def body() -> None:
        worker_client = async_client(url)
        worker = Worker(worker_client, StubEngine, config)
        running = asyncio.create_task(worker.run())
        try:
            async with gateway(url) as inference:
                ((tag,),) = await inference.tag([bytes(42)])
                assert tag.confidence == 0.42
                own.stop()
                own.start()  # the stream, its group and the heartbeats are gone
                with redis.Redis.from_url(url) as client:
                    await wait_for(lambda: client.zcard(CHANNELS.workers) == 1, 10)
                ((tag,),) = await inference.tag([bytes(43)], time.monotonic() + 5)
                assert tag.confidence == 0.43
        finally:
            worker.stop()
            await running
            await worker_client.aclose()
            own.stop()

    run(body())
