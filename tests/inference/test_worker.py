"""The worker loop in this process, on a real redis-server, with a stand-in engine: how each job
is answered and reported. `test_remote.py` runs real `imagetag worker` processes with the models."""

from __future__ import annotations

import asyncio
import threading

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

    def loaded(self) -> None:
        self.calls.append(("loaded",))

    def batch(self, stats: BatchStats) -> None:
        self.calls.append(("batch", stats.size))
        if self.fail:
            raise RuntimeError("a broken exporter")

    def jobs(self, outcome: str, count: int) -> None:
        self.calls.append(("jobs", outcome, count))

    def up(self, serving: bool) -> None:
        self.calls.append(("up", serving))


async def serve_and_tag(url: str, observer: Recorder, *images, engine=StandInEngine, **config) -> list:
    client = Redis.from_url(url)
    worker = Worker(client, engine, WorkerConfig(heartbeat_s=0.2, **config), observer)
    running = asyncio.create_task(worker.run())
    try:
        async with gateway(url) as inference:
            return await inference.tag(list(images))
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
        await client.aclose()


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

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sizes: list[int] = []

    def predict(self, images):
        self.sizes.append(len(images))
        assert self.release.wait(10)
        return super().predict(images)


def test_the_next_round_is_read_while_one_is_in_the_models_and_no_more(redis_server: RedisProcess):
    """The device must not wait on Redis between batches, nor one worker hoard the queue."""
    url = fresh_db(redis_server, 6)
    engine = HeldEngine()
    channels = Channels()

    async def scenario() -> tuple[list[int], int, list]:
        client = Redis.from_url(url)
        worker = Worker(client, lambda: engine, WorkerConfig(heartbeat_s=0.2, max_batch_size=1), Recorder())
        running = asyncio.create_task(worker.run())
        try:
            async with gateway(url) as inference:
                tagging = asyncio.create_task(inference.tag([photo("bus.jpg")] * 3))

                async def delivered() -> int:
                    return (await client.xpending(channels.stream, channels.group))["pending"]

                deadline = asyncio.get_running_loop().time() + 10
                while await delivered() < 2:
                    assert asyncio.get_running_loop().time() < deadline, "the second round was never read"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # time enough to read a third, were it allowed
                in_hand, sizes = await delivered(), list(engine.sizes)
                engine.release.set()
                return sizes, in_hand, await tagging
        finally:
            engine.release.set()
            worker.stop()
            await asyncio.wait_for(running, 10)
            await client.aclose()

    sizes, in_hand, results = asyncio.run(scenario())
    assert sizes == [1] and in_hand == 2  # one in the models, one read and waiting
    assert all([t.tag.key for t in result] == ["cat"] for result in results)
    assert engine.sizes == [1, 1, 1]
