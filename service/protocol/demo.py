"""What the demo page is told about the service: only what a client could learn by calling it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class DemoConfig(BaseModel):
    auth: Literal["iam", "none"] = Field(description="iam: the page asks for a login; none: it sends no credentials")
    options: dict[str, Any] = Field(description="the JSON Schema of language, threshold and limit: defaults and bounds")
