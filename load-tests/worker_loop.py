"""What `imagetag worker` costs beside its models: the CPU of its event loop per job.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/worker_loop.py

One process holds the models' Python and the Redis traffic, so on a GPU its event loop (read a
round with XREADGROUP, budget it, answer each job on its gateway's stream, ack) shares one GIL
with the replicas' threads. This measures the loop alone: a real `Worker` on a redis-server of its
own, jobs of real photos pushed from another thread, and the models' answers computed once
beforehand by the real pipeline and handed back by photo, so that the loop is all that runs. It
prints the loop's CPU per job (the main thread's) and the jobs answered per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis
from redis.asyncio import Redis

from benchmark import PHOTOS, REPO, free_port

sys.path.insert(0, str(REPO))
from inference.engine import EngineConfig  # noqa: E402
from inference.pipeline import DevicePipeline  # noqa: E402
from inference.remote import Channels  # noqa: E402
from inference.worker import Worker, WorkerConfig  # noqa: E402


class AnswersComputedBefore:
    """The real pipeline's answers for these photos, handed back without running the models."""

    def __init__(self, photos: list[bytes], batch: int) -> None:
        weights = Path(os.environ["IMAGETAG_DETECTOR_WEIGHTS"])
        pipeline = DevicePipeline.build(EngineConfig(detector_weights=(weights,)), max_batch=batch)
        self._answers = dict(zip(photos, pipeline.predict(photos)))

    def predict(self, images: list[bytes]) -> list:
        return [self._answers[image] for image in images]


def answering_from(engine: AnswersComputedBefore, client: Redis, batch: int) -> Worker:
    """A real worker, two replicas as a GPU worker runs, that answers from `engine`."""
    return Worker(client, lambda: engine, WorkerConfig(max_batch_size=batch, replicas=2, models="m",
                                                       pixel_budget=24_000_000))


async def measure(url: str, engine: AnswersComputedBefore, photos: list[bytes], jobs: int, batch: int) -> None:
    channels = Channels()
    client = Redis.from_url(url)
    worker = answering_from(engine, client, batch)
    serving = asyncio.create_task(worker.run())
    reply_to = channels.reply_key("loop")

    def push() -> None:
        deadline = str(time.time() + 600)
        pipe = redis.Redis.from_url(url).pipeline(transaction=False)
        for i in range(jobs):
            pipe.xadd(channels.stream, {"job": uuid.uuid4().hex, "reply": reply_to, "deadline": deadline,
                                        "image": photos[i % len(photos)], "trace": ""})
        pipe.execute()

    await asyncio.sleep(1.0)  # the worker's group and first read
    cpu, started = time.thread_time(), time.monotonic()
    pusher = threading.Thread(target=push)
    pusher.start()
    while await client.xlen(reply_to) < jobs:
        await asyncio.sleep(0.005)
    cpu, elapsed = time.thread_time() - cpu, time.monotonic() - started
    pusher.join()
    worker.stop()
    await serving
    await client.aclose()
    print(f"{jobs} jobs in rounds of up to {batch}: the loop's CPU {1000 * cpu / jobs:.3f} ms a job; "
          f"{jobs / elapsed:.0f} jobs/s answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=64, help="IMAGETAG_BATCH_MAX_SIZE (64: a GPU's default)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    engine = AnswersComputedBefore(photos, args.batch)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for run in range(args.runs):
            asyncio.run(measure(f"redis://127.0.0.1:{port}/{run}", engine, photos, args.jobs, args.batch))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
