"""The process's log: one JSON object per line for collectors, or plain text for a person at a
terminal (IMAGETAG_LOG_FORMAT=auto picks by whether stderr is a TTY).

Each answered request adds one line on the logger `imagetag.access` (written by
`service.metrics.RequestMetricsMiddleware`, which sees every request): time, request id,
project, route, method, status, error code, images and latency. Its fields are set one by one
from the request's state, never from headers or bodies, so no password, token, secret key or
image byte can reach the log through it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Literal

ACCESS_LOGGER = "imagetag.access"
# Where the routes leave what the access line reports, in the request's scope["state"].
PROJECT_STATE = "project"
IMAGES_STATE = "images"
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(
    level: str, log_format: Literal["auto", "json", "text"], stream: IO[str] | None = None
) -> None:
    """The root logger's one handler; uvicorn's loggers propagate to it (service.server)."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    # Not forced: where logging is set up already (a host process, pytest), it stays as it is.
    logging.basicConfig(level=level.upper(), handlers=[handler])


def log_request(fields: dict[str, object]) -> None:
    """The access line: a sentence for text, the same fields as JSON keys for collectors."""
    text = (
        f"{fields['method']} {fields['route']} {fields['status']} {fields['error_code'] or '-'} "
        f"project={fields['project'] or '-'} images={fields['images']} "
        f"{fields['latency_ms']} ms id={fields['request_id']}"
    )
    logging.getLogger(ACCESS_LOGGER).info(text, extra={"fields": fields})
