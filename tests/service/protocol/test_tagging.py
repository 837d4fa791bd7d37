"""The tagging wire models: what a body may hold, and the catalogue error when it may not."""

from __future__ import annotations

import pytest

from service.errors import InvalidParameter, UnknownField
from service.protocol.tagging import BatchTaggingRequest, TaggingOptions, TaggingRequest


def test_null_and_empty_count_as_absent_and_defaults_fill_in():
    request = TaggingRequest.parse({"image": "abc", "url": None, "threshold": None})
    assert (request.image, request.url, request.language, request.threshold, request.limit) == ("abc", None, "zh", 60.0, 50)
    assert TaggingRequest.parse({"image": "", "url": "http://x/y.jpg"}).url == "http://x/y.jpg"


@pytest.mark.parametrize(
    "body, error, words",
    [
        ({"image": "abc", "imgae": "x"}, UnknownField, "unknown field 'imgae'"),
        ({}, InvalidParameter, "exactly one of 'image'"),
        ({"image": "abc", "limit": 151}, InvalidParameter, "limit:"),
        ({"image": "abc", "threshold": "60"}, InvalidParameter, "threshold:"),  # strict: no strings for numbers
        ({"image": "abc", "language": "fr"}, InvalidParameter, "language:"),
    ],
)
def test_bad_bodies_raise_the_catalogue_error(body, error, words):
    with pytest.raises(error, match=words):
        TaggingRequest.parse(body)


def test_options_alone_are_the_clis_flags():
    assert TaggingOptions.parse({"language": "en", "threshold": 0.0, "limit": 1}).limit == 1
    with pytest.raises(InvalidParameter, match="limit"):
        TaggingOptions.parse({"limit": 0})
    with pytest.raises(UnknownField):
        TaggingOptions.parse({"image": "abc"})  # an image is a request's, not an option


def test_a_batch_names_the_unknown_field_where_it_is():
    with pytest.raises(UnknownField) as raised:
        BatchTaggingRequest.parse({"images": [{"image": "aGVsbG8="}, {"imgae": "aGVsbG8="}]})
    assert raised.value.message == "unknown field 'images.1.imgae'; the API accepts image, url"
    with pytest.raises(UnknownField) as raised:
        BatchTaggingRequest.parse({"images": [{"image": "aGVsbG8="}], "image": "aGVsbG8="})
    assert raised.value.message == (
        "unknown field 'image'; the API accepts language, threshold, limit, label_structure, images")
