"""The micro-batcher: `collate` on a plain queue, then the batching client, with a stand-in engine
for the timing mechanics and the real models for correctness."""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from PIL import Image

from inference.batching import BatchingConfig, BatchingInference, BatchStats, Job, collate
from inference.client import DeadlineExceeded, InferenceClosed, QueueFull
from inference.pipeline import DevicePipeline
from inference.image_header import read_header
from inference.results import ImageTooLarge, ModelError, UndecodableImage
from tests.conftest import PHOTOS


class SizeEngine:
    """Stands in for the models in the timing tests: tags each encoded image with its length.

    `hold` can keep a batch on the model thread until the test lets it go; `started` is set
    when a batch reaches `predict`.
    """

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def predict(self, images: list[bytes]) -> list:
        self.batches.append([len(image) for image in images])
        self.started.set()
        self.hold.wait(timeout=5)
        time.sleep(self.delay_s)
        if self.fail and any(len(image) == 13 for image in images):
            raise RuntimeError("unexpected failure")
        return [[f"width={len(image)}"] for image in images]

    def seen(self) -> set[int]:
        return {width for batch in self.batches for width in batch}


def image(width: int) -> bytes:
    return bytes(width)


Body = Callable[[BatchingInference], Awaitable[None]]


def run(build_engine, config: BatchingConfig, body: Body, **kw) -> None:
    """Runs `body` against a started client, and closes it whatever happens."""

    async def main() -> None:
        client = BatchingInference(build_engine, config, **kw)
        await client.start()
        try:
            await body(client)
        finally:
            await client.close()

    asyncio.run(main())


async def started(engine: SizeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 2), "no batch reached predict"
    engine.started.clear()


# collate, on a plain asyncio.Queue


def job(loop: asyncio.AbstractEventLoop, width: int, deadline: float = float("inf")) -> Job:
    return Job(image(width), deadline, loop.create_future())


def test_collate_stops_at_max_batch_size():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        jobs = [job(loop, w) for w in range(5)]
        for j in jobs:
            queue.put_nowait(j)
        began = time.monotonic()
        assert await collate(queue, 3, 1.0) == jobs[:3]
        assert time.monotonic() - began < 0.5  # full: no reason to wait out the 1 s window
        assert await collate(queue, 3, 0.02) == jobs[3:]

    asyncio.run(main())


def test_collate_waits_max_wait_after_the_first_job_and_no_longer():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        first, inside, late = job(loop, 1), job(loop, 2), job(loop, 3)
        loop.call_later(0.05, queue.put_nowait, first)  # the window opens with the first job
        loop.call_later(0.05 + 0.05, queue.put_nowait, inside)
        loop.call_later(0.05 + 0.30, queue.put_nowait, late)
        began = time.monotonic()
        batch = await collate(queue, 8, 0.15)
        elapsed = time.monotonic() - began
        assert batch == [first, inside]
        assert 0.05 + 0.15 - 0.01 <= elapsed < 0.05 + 0.15 + 0.15
        assert await collate(queue, 8, 0.01) == [late]

    asyncio.run(main())


def test_collate_returns_as_soon_as_the_batch_is_full():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        jobs = [job(loop, w) for w in range(2)]
        queue.put_nowait(jobs[0])
        loop.call_later(0.02, queue.put_nowait, jobs[1])
        began = time.monotonic()
        assert await collate(queue, 2, 5.0) == jobs
        assert time.monotonic() - began < 0.5

    asyncio.run(main())


def test_collate_drops_cancelled_jobs_and_fails_expired_ones():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        now = 1000.0  # a fake clock: deadlines are judged against it alone
        gone, expired, live, also_expired, live_too = (
            job(loop, 1, now + 5), job(loop, 2, now - 1), job(loop, 3, now + 5),
            job(loop, 4, now), job(loop, 5, now + 0.1),
        )
        gone.future.cancel()
        for j in (gone, expired, live, also_expired, live_too):
            queue.put_nowait(j)
        assert await collate(queue, 8, 0.01, clock=lambda: now) == [live, live_too]
        assert isinstance(expired.future.exception(), DeadlineExceeded)
        assert isinstance(also_expired.future.exception(), DeadlineExceeded)
        assert gone.future.cancelled()
        assert not live.future.done() and queue.empty()

    asyncio.run(main())


def test_collate_keeps_waiting_when_only_dead_jobs_arrive():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        dead, live = job(loop, 1, deadline=0.0), job(loop, 2)
        queue.put_nowait(dead)
        loop.call_later(0.05, queue.put_nowait, live)
        assert await asyncio.wait_for(collate(queue, 8, 0.01), 2) == [live]
        assert isinstance(dead.future.exception(), DeadlineExceeded)

    asyncio.run(main())


# the batching client, with the stand-in engine


def test_each_concurrent_caller_gets_its_own_results():
    engine = SizeEngine(delay_s=0.005)
    stats: list[BatchStats] = []
    rng = random.Random(7)

    async def caller(client: BatchingInference, widths: list[int]) -> None:
        await asyncio.sleep(rng.uniform(0, 0.03))
        results = await client.tag([image(w) for w in widths])
        assert results == [[f"width={w}"] for w in widths]

    async def body(client: BatchingInference) -> None:
        requests = [[10 + 3 * i + k for k in range(1 + i % 3)] for i in range(60)]
        await asyncio.gather(*(caller(client, widths) for widths in requests))
        assert engine.seen() == {w for widths in requests for w in widths}

    config = BatchingConfig(max_batch_size=6, max_wait_s=0.005, max_queue=256)
    run(lambda: engine, config, body, on_batch=stats.append)
    sizes = [len(batch) for batch in engine.batches]
    assert max(sizes) > 1 and max(sizes) <= 6
    assert [s.size for s in stats] == sizes
    assert all(len(s.queue_wait_s) == s.size and min(s.queue_wait_s) >= 0 for s in stats)
    assert all(s.model_s >= 0.005 and s.queue_depth >= 0 for s in stats)


def test_a_batch_that_raises_fails_only_its_own_callers():
    engine = SizeEngine(fail=True)
    engine.hold.clear()

    async def body(client: BatchingInference) -> None:
        first = asyncio.create_task(client.tag([image(1)]))
        await started(engine)
        # Held back behind the first batch: these two become the broken batch.
        broken = asyncio.gather(client.tag([image(13)]), client.tag([image(2)]))
        await asyncio.sleep(0.05)
        engine.hold.set()
        assert await first == [["width=1"]]
        for (result,) in await broken:
            assert isinstance(result, ModelError)
        assert await client.tag([image(3)]) == [["width=3"]]  # the loop is still running

    run(lambda: engine, BatchingConfig(max_batch_size=4, max_wait_s=0.01), body)
    assert engine.batches == [[1], [13, 2], [3]]


def test_a_full_queue_refuses_at_once():
    engine = SizeEngine()
    engine.hold.clear()

    async def body(client: BatchingInference) -> None:
        # Capacity: the batch on the model thread, the one collected behind it, then the queue.
        accepted = [asyncio.create_task(client.tag([image(1)]))]
        await started(engine)
        for width in (2, 3):
            accepted.append(asyncio.create_task(client.tag([image(width)])))
            await asyncio.sleep(0.02)
        with pytest.raises(QueueFull):  # one place left: a two-image request is refused whole
            await client.tag([image(6), image(7)])
        accepted.append(asyncio.create_task(client.tag([image(4)])))
        await asyncio.sleep(0.02)
        began = time.monotonic()
        with pytest.raises(QueueFull):
            await client.tag([image(5)])
        assert time.monotonic() - began < 0.05  # refused, not queued behind the held batch
        engine.hold.set()
        results = await asyncio.gather(*accepted)
        assert results == [[[f"width={w}"]] for w in (1, 2, 3, 4)]

    run(lambda: engine, BatchingConfig(max_batch_size=1, max_wait_s=0.0, max_queue=2), body)
    assert engine.batches == [[1], [2], [3], [4]]


def test_a_deadline_passing_during_a_slow_batch_answers_promptly():
    engine = SizeEngine()
    engine.hold.clear()

    async def body(client: BatchingInference) -> None:
        try:
            patient = asyncio.create_task(client.tag([image(1)]))
            deadline = time.monotonic() + 0.2
            hurried = asyncio.create_task(client.tag([image(2)], deadline=deadline))
            await started(engine)
            assert engine.batches == [[1, 2]]  # the hurried caller's image is on the model thread
            with pytest.raises(DeadlineExceeded):
                await hurried
            assert time.monotonic() - deadline < 0.1  # not when the held batch ends
        finally:
            engine.hold.set()
        assert await patient == [["width=1"]]
        assert await client.tag([image(3)]) == [["width=3"]]

    run(lambda: engine, BatchingConfig(max_batch_size=4, max_wait_s=0.02), body)


def test_a_deadline_passing_in_the_queue_never_reaches_the_models():
    engine = SizeEngine()
    engine.hold.clear()

    async def body(client: BatchingInference) -> None:
        try:
            first = asyncio.create_task(client.tag([image(1)]))
            await started(engine)
            deadline = time.monotonic() + 0.1
            with pytest.raises(DeadlineExceeded):
                await client.tag([image(2)], deadline=deadline)
            assert time.monotonic() - deadline < 0.1  # not when the held batch ends
            with pytest.raises(DeadlineExceeded):
                await client.tag([image(3)], deadline=time.monotonic() - 1)
        finally:
            engine.hold.set()
        assert await first == [["width=1"]]
        assert await client.tag([image(4)]) == [["width=4"]]

    run(lambda: engine, BatchingConfig(max_batch_size=4, max_wait_s=0.01), body)
    assert engine.seen() == {1, 4}


def test_a_cancelled_caller_never_reaches_the_models():
    engine = SizeEngine()
    engine.hold.clear()

    async def body(client: BatchingInference) -> None:
        try:
            first = asyncio.create_task(client.tag([image(1)]))
            await started(engine)
            gone = asyncio.create_task(client.tag([image(2), image(3)]))
            stays = asyncio.create_task(client.tag([image(4)]))
            await asyncio.sleep(0.05)
            gone.cancel()  # the client disconnected while its images waited
            await asyncio.sleep(0.01)
        finally:
            engine.hold.set()
        assert await first == [["width=1"]]
        assert await stays == [["width=4"]]
        assert gone.cancelled()

    run(lambda: engine, BatchingConfig(max_batch_size=4, max_wait_s=0.01), body)
    assert engine.batches == [[1], [4]]


def test_close_fails_waiting_callers():
    engine = SizeEngine()
    engine.hold.clear()

    async def main() -> None:
        client = BatchingInference(lambda: engine, BatchingConfig(max_batch_size=1, max_wait_s=0.0))
        await client.start()
        try:
            waiting = [asyncio.create_task(client.tag([image(w)])) for w in (1, 2, 3)]
            await started(engine)
            began = time.monotonic()
            await client.close()
            for task in waiting:
                with pytest.raises(InferenceClosed):
                    await task
            assert time.monotonic() - began < 0.5
            assert not client.ready
            with pytest.raises(InferenceClosed):
                await client.tag([image(4)])
        finally:
            engine.hold.set()

    asyncio.run(main())
    assert engine.seen() == {1}


# the batching client, with the real models on real photos


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def test_real_models_give_each_concurrent_caller_its_own_photos_tags(engine):
    pipeline = DevicePipeline(engine, max_batch=4)
    names = [
        "cat_chelsea.jpg", "bus.jpg", "coffee.jpg",
        "airplane_cutout.jpg", "ladybug.jpg", "strawberry_cutout.jpg",
    ]
    alone = {name: pipeline.predict([photo(name)])[0] for name in names}
    stats: list[BatchStats] = []

    async def caller(client: BatchingInference, name: str) -> tuple[str, list]:
        (result,) = await client.tag([photo(name)])
        return name, result

    async def body(client: BatchingInference) -> None:
        callers = [caller(client, name) for name in names * 2]
        for name, together in await asyncio.gather(*callers):
            confident = {t.tag.key: t.confidence for t in alone[name] if t.confidence > 0.3}
            assert confident, name
            found = {t.tag.key: t.confidence for t in together}
            for key, confidence in confident.items():
                assert found.get(key) == pytest.approx(confidence, abs=1e-4), (name, key)

    run(lambda: pipeline, BatchingConfig(max_batch_size=4, max_wait_s=0.05), body, on_batch=stats.append)
    assert sum(s.size for s in stats) == 12
    assert max(s.size for s in stats) > 1


def test_real_models_fail_only_the_caller_whose_image_does_not_decode(engine):
    stats: list[BatchStats] = []
    cut = photo("coffee.jpg")
    cut = cut[: len(cut) // 2]

    async def body(client: BatchingInference) -> None:
        cat, broken, bus = await asyncio.gather(
            client.tag([photo("cat_chelsea.jpg")]), client.tag([cut]), client.tag([photo("bus.jpg")])
        )
        assert isinstance(broken[0], UndecodableImage)
        assert "cat" in {t.tag.key for t in cat[0]}
        assert "bus" in {t.tag.key for t in bus[0]}

    run(lambda: DevicePipeline(engine, max_batch=4), BatchingConfig(max_batch_size=4, max_wait_s=0.05), body,
        on_batch=stats.append)
    assert [s.size for s in stats] == [3]


def test_replicas_serve_batches_side_by_side():
    """Two engines, each on its own thread: a second batch runs while the first is still held."""
    engines: list[SizeEngine] = []

    def build() -> SizeEngine:
        engines.append(SizeEngine())
        return engines[-1]

    async def body(client: BatchingInference) -> None:
        first_engine = engines[0]
        first_engine.hold.clear()
        held = asyncio.create_task(client.tag([image(11)]))
        await started(first_engine)
        # The first engine is busy until released; the second answers meanwhile.
        assert await asyncio.wait_for(client.tag([image(12)]), 2) == [["width=12"]]
        first_engine.hold.set()
        assert await held == [["width=11"]]
        assert [e.seen() for e in engines] == [{11}, {12}]

    run(build, BatchingConfig(max_batch_size=1, replicas=2), body)


def png(width: int, height: int) -> bytes:
    """A real PNG header (and pixels): a PNG costs its whole size against the pixel budget."""
    encoded = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(encoded, "PNG")
    return encoded.getvalue()


class PixelEngine:
    """Records the pixels of the batches on the model threads at once, at the worst moment."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.batches: list[int] = []

    def predict(self, images: list[bytes]) -> list:
        pixels = sum(read_header(data).width * read_header(data).height for data in images)
        with self.lock:
            self.now += pixels
            self.peak = max(self.peak, self.now)
            self.batches.append(len(images))
        time.sleep(self.delay_s)
        with self.lock:
            self.now -= pixels
        return [["tagged"] for _ in images]


def test_batches_in_the_models_never_hold_more_pixels_than_the_budget():
    engine = PixelEngine()
    # 100x100 is 10,000 pixels: a 25,000-pixel budget holds two images at once, in any batches.
    config = BatchingConfig(max_batch_size=8, replicas=2, pixel_budget=25_000)

    async def body(client: BatchingInference) -> None:
        results = await asyncio.gather(*(client.tag([png(100, 100)]) for _ in range(12)))
        assert results == [[["tagged"]]] * 12

    run(lambda: engine, config, body)
    assert engine.peak == 20_000
    assert sum(engine.batches) == 12 and max(engine.batches) == 2


def test_an_image_larger_than_the_whole_budget_is_refused_alone_and_at_once():
    engine = PixelEngine()
    config = BatchingConfig(pixel_budget=25_000)

    async def body(client: BatchingInference) -> None:
        small, large = await client.tag([png(100, 100), png(200, 200)])
        assert small == ["tagged"]
        assert isinstance(large, ImageTooLarge)
        assert "0.04 megapixels" in str(large) and "0.025-megapixel budget" in str(large)

    run(lambda: engine, config, body)
    assert engine.batches == [1]


def test_a_large_jpeg_costs_the_pixels_it_is_decoded_at():

    encoded = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 140, 200)).save(encoded, "JPEG")
    engine = PixelEngine(delay_s=0)
    # Decoded at a quarter of each side (1024x1024): it fits a budget a whole 4096x4096 would not.
    config = BatchingConfig(pixel_budget=1024 * 1024)

    async def body(client: BatchingInference) -> None:
        assert await client.tag([encoded.getvalue()]) == [["tagged"]]
        (refused,) = await client.tag([png(1025, 1024)])  # a PNG is decoded whole
        assert isinstance(refused, ImageTooLarge)

    run(lambda: engine, config, body)


def test_an_image_waiting_for_pixels_past_its_deadline_is_not_tagged():
    engine = SizeEngine()
    engine.hold.clear()
    config = BatchingConfig(max_batch_size=1, replicas=2, pixel_budget=10_000)

    async def body(client: BatchingInference) -> None:
        first = asyncio.create_task(client.tag([png(100, 100)]))
        await started(engine)
        # The second replica is idle, but the first image holds the whole budget.
        with pytest.raises(DeadlineExceeded):
            await client.tag([png(100, 100)], deadline=time.monotonic() + 0.3)
        engine.hold.set()
        assert len(await first) == 1
        assert len(await client.tag([png(100, 100)])) == 1  # the budget came back

    run(lambda: engine, config, body)
    assert len(engine.batches) == 2
