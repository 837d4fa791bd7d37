"""The helpers shared by the asyncio and Redis code."""

from __future__ import annotations

import asyncio
import logging

from inference.tasks import as_text, log_task_failure


def test_a_failed_background_task_is_logged_loudly_and_a_cancelled_one_not(caplog):
    async def main() -> None:
        async def broken() -> None:
            raise RuntimeError("the loop died")

        failed = asyncio.create_task(broken())
        failed.add_done_callback(log_task_failure("the batching loop"))
        cancelled = asyncio.create_task(asyncio.sleep(10))
        cancelled.add_done_callback(log_task_failure("the sleeper"))
        cancelled.cancel()
        await asyncio.wait([failed, cancelled])
        await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop

    with caplog.at_level(logging.CRITICAL):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == ["the batching loop failed"]
    assert "the loop died" in caplog.text


def test_redis_replies_read_as_text_whatever_the_client():
    assert as_text(b"worker-1") == as_text("worker-1") == "worker-1"
