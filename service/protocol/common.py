"""Wire models shared by every API area."""

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """The one error envelope of every failure (contract section 4)."""

    error_code: str
    error_msg: str
