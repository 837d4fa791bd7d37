import pytest
from pydantic import ValidationError

from service.protocol.health import Status


def test_a_status_is_one_of_the_three_the_probes_answer():
    assert [Status(status=s).status for s in ("ok", "ready", "loading")] == ["ok", "ready", "loading"]
    with pytest.raises(ValidationError):
        Status(status="fine")
