"""Two small helpers the asyncio and Redis code of both packages share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("imagetag")


def log_task_failure(what: str) -> Callable[[asyncio.Task], None]:
    """A done-callback that logs a background task's failure loudly: without the task, callers
    would only wait out their deadlines and never learn why."""

    def check(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s failed", what, exc_info=task.exception())

    return check


def as_text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client was built with decode_responses=True."""
    return value.decode() if isinstance(value, bytes) else value
