"""Wire models shared by every API area, and the one way a validation failure becomes an error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from service.errors import InvalidParameter


class ErrorBody(BaseModel):
    """The one error envelope of every failure (contract section 4)."""

    error_code: str
    error_msg: str


def invalid_parameter(problems: Sequence[Any]) -> InvalidParameter:
    """AIS.0501 naming the first problem of a pydantic (or FastAPI) validation error."""
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return InvalidParameter(f"{where}: {message}" if where else message)
