"""The worker loop in this process, on a real redis-server, with a stand-in engine: how each job
is answered and reported. `test_remote.py` runs real `imagetag worker` processes with the models."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from redis.asyncio import Redis

from inference.batching import BatchStats
from inference.remote import Channels
from inference.results import ImageTooLarge, ModelError, ScoredTag, UndecodableImage
from inference.worker import Worker, WorkerConfig
from tests.conftest import RedisProcess
from tests.inference.test_batching import png
from tests.inference.test_remote import VOCABULARY, fresh_db, gateway, photo


class StandInEngine:
    """Every image is a cat, but one byte breaks the models and two do not decode."""

    def predict(self, images):
        outcomes = {1: ModelError("too small"), 2: UndecodableImage("not an image")}
        return [outcomes.get(len(image), [ScoredTag(VOCABULARY.tags["cat"], 0.9)]) for image in images]


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple] = []
        self.queue_depths: list[int] = []

    def loaded(self) -> None:
        self.calls.append(("loaded",))

    def batch(self, stats: BatchStats) -> None:
        self.calls.append(("batch", stats.size))
        self.queue_depths.append(stats.queue_depth)
        if self.fail:
            raise RuntimeError("a broken exporter")

    def jobs(self, outcome: str, count: int) -> None:
        self.calls.append(("jobs", outcome, count))

    def up(self, serving: bool) -> None:
        self.calls.append(("up", serving))


@contextlib.asynccontextmanager
async def serving(url: str, build: Callable, observer: Recorder, **config) -> AsyncIterator[Redis]:
    """A worker running in this loop until the block ends; its Redis client to look with."""
    client = Redis.from_url(url)
    worker = Worker(client, build, WorkerConfig(heartbeat_s=0.2, **config), observer)
    running = asyncio.create_task(worker.run())
    try:
        yield client
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
        await client.aclose()


async def serve_and_tag(url: str, observer: Recorder, *images, engine=StandInEngine, **config) -> list:
    async with serving(url, engine, observer, **config), gateway(url) as inference:
        return await inference.tag(list(images))


def test_each_job_gets_its_own_result_and_the_observer_hears_of_it(redis_server: RedisProcess):
    recorder = Recorder()
    cat, broken, garbled = asyncio.run(
        serve_and_tag(fresh_db(redis_server, 6), recorder, photo("bus.jpg"), b"\xff", b"\xff\xd8")
    )
    assert [t.tag.key for t in cat] == ["cat"]
    assert type(broken) is ModelError and isinstance(garbled, UndecodableImage)
    assert ("batch", 3) in recorder.calls
    assert ("jobs", "tagged", 1) in recorder.calls and ("jobs", "model_error", 1) in recorder.calls
    assert ("jobs", "undecodable", 1) in recorder.calls
    assert recorder.calls[0] == ("loaded",)  # before anything is served
    assert ("up", True) in recorder.calls and recorder.calls[-1] == ("up", False)


def test_a_failing_observer_does_not_stop_the_worker(redis_server: RedisProcess):
    recorder = Recorder(fail=True)
    url = fresh_db(redis_server, 6)
    first = asyncio.run(serve_and_tag(url, recorder, photo("bus.jpg")))
    assert [t.tag.key for t in first[0]] == ["cat"]
    assert ("jobs", "tagged", 1) in recorder.calls and ("up", True) in recorder.calls  # served on regardless


class PixelCounter(StandInEngine):
    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, images):
        self.calls.append(len(images))
        return super().predict(images)


def test_a_round_of_jobs_runs_within_the_pixel_budget_and_an_image_over_it_is_refused(redis_server: RedisProcess):
    engine = PixelCounter()
    images = [png(100, 100)] * 3 + [png(200, 200)]
    *tagged, refused = asyncio.run(
        serve_and_tag(
            fresh_db(redis_server, 6), Recorder(), *images, engine=lambda: engine, max_batch_size=8, pixel_budget=25_000
        )
    )
    assert all([t.tag.key for t in result] == ["cat"] for result in tagged)
    # Across the wire as its own kind: the gateway answers it 400 AIS.0504, not 500.
    assert isinstance(refused, ImageTooLarge) and "0.04 megapixels" in str(refused)
    assert sum(engine.calls) == 3 and max(engine.calls) <= 2


class HeldEngine(StandInEngine):
    """Holds each batch in the models until the test lets it go."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.sizes: list[int] = []

    def predict(self, images):
        self.sizes.append(len(images))
        assert self.release.wait(10)
        return super().predict(images)


class HeldReplicas:
    """Builds one `HeldEngine` per replica, all let go by one `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.engines: list[HeldEngine] = []

    def __call__(self) -> HeldEngine:
        self.engines.append(HeldEngine(self.release))
        return self.engines[-1]

    def sizes(self) -> list[list[int]]:
        return [list(engine.sizes) for engine in self.engines]

    @contextlib.contextmanager
    def let_go_at_the_end(self) -> Iterator[None]:
        """Releases the engines however the block ends, before the worker is stopped: a stopping
        worker waits for the rounds in its models."""
        try:
            yield
        finally:
            self.release.set()


@pytest.mark.parametrize("replicas", [1, 2])
def test_each_replica_runs_a_round_while_one_more_is_read_and_no_more(redis_server: RedisProcess, replicas: int):
    """The device must not wait on Redis between batches, nor one worker hoard the queue."""
    url = fresh_db(redis_server, 6)
    held = HeldReplicas()
    channels = Channels()
    recorder = Recorder()

    async def scenario() -> tuple[list[list[int]], int, list]:
        async with serving(url, held, recorder, max_batch_size=1, replicas=replicas) as client:
            with held.let_go_at_the_end():
                async with gateway(url) as inference:
                    tagging = asyncio.create_task(inference.tag([photo("bus.jpg")] * (replicas + 2)))

                    async def delivered() -> int:
                        return (await client.xpending(channels.stream, channels.group))["pending"]

                    deadline = asyncio.get_running_loop().time() + 10
                    while await delivered() < replicas + 1:
                        assert asyncio.get_running_loop().time() < deadline, "the rounds were never read"
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.3)  # time enough to read one more, were it allowed
                    in_hand, sizes = await delivered(), held.sizes()
                    held.release.set()
                    return sizes, in_hand, await tagging

    sizes, in_hand, results = asyncio.run(scenario())
    assert sizes == [[1]] * replicas  # every replica busy at once
    # The first round answered leaves one job waiting and the others in the replicas or read
    # ahead: its queue depth is the one waiting, what the gateways' bound counts.
    assert recorder.queue_depths[0] == 1
    assert in_hand == replicas + 1  # and one round read, waiting for the first that is free
    assert all([t.tag.key for t in result] == ["cat"] for result in results)
    assert sum(len(engine.sizes) for engine in held.engines) == replicas + 2


def test_replicas_share_the_pixel_budget(redis_server: RedisProcess):
    """Two replicas, two rounds of one image each, and a budget that holds one such image: the
    second round waits for the first to leave the models."""
    url = fresh_db(redis_server, 6)
    held = HeldReplicas()

    async def scenario() -> tuple[list[list[int]], list]:
        async with serving(url, held, Recorder(), max_batch_size=1, replicas=2, pixel_budget=15_000):
            with held.let_go_at_the_end():
                async with gateway(url) as inference:
                    tagging = asyncio.create_task(inference.tag([png(100, 100)] * 2))
                    await asyncio.sleep(1.0)
                    busy = held.sizes()
                    held.release.set()
                    return busy, await tagging

    busy, results = asyncio.run(scenario())
    assert sorted(busy) == [[], [1]]  # one call in the models; the other waits for its pixels
    assert all([t.tag.key for t in result] == ["cat"] for result in results)
