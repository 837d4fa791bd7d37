"""Wire model of the liveness and readiness answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Status(BaseModel):
    status: Literal["ok", "ready", "loading"]
