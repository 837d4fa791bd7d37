"""The one way a validation failure becomes the catalogue's AIS.0501."""

from __future__ import annotations

from service.errors import InvalidParameter
from service.protocol.common import invalid_parameter


def test_the_first_problem_is_named_by_where_it_is():
    error = invalid_parameter([
        {"loc": ("body", "items", 2, "name"), "msg": "Value error, too long"},
        {"loc": ("query", "n"), "msg": "Field required"},
    ])
    assert isinstance(error, InvalidParameter) and error.message == "body.items.2.name: too long"


def test_a_problem_of_the_whole_body_is_its_message_alone():
    assert invalid_parameter([{"loc": (), "msg": "Value error, image or url is required"}]).message == (
        "image or url is required")
