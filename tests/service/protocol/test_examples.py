"""The documented examples are real messages of the protocol."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from service.errors import CATALOGUE
from service.protocol import iam, tagging
from service.protocol.examples import ERROR_MESSAGES, EXAMPLES, SMALL_PNG_BASE64



def form_options(value: dict):
    """A form's fields other than its files, as the service reads them."""
    return tagging.TaggingOptions.parse({k: v for k, v in value.items() if k != "image"}, text=True)


MODELS = {
    "TaggingRequest": tagging.TaggingRequest.parse,
    "TaggingForm": form_options,
    "BatchTaggingRequest": tagging.BatchTaggingRequest.parse,
    "BatchTaggingForm": form_options,
    "BatchTaggingResponse": tagging.BatchTaggingResponse.model_validate,
    "TaggingResponse": tagging.TaggingResponse.model_validate,
    "TokenRequest": iam.TokenRequest.parse,
    "TokenResponse": iam.TokenResponse.model_validate,
    "ProjectList": iam.ProjectList.model_validate,
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_parses_as_its_model(name):
    assert EXAMPLES[name]
    for example in EXAMPLES[name].values():
        MODELS[name](example["value"])


def test_the_image_example_is_an_image_the_service_accepts():
    image = Image.open(io.BytesIO(base64.b64decode(SMALL_PNG_BASE64)))
    assert image.format == "PNG" and min(image.size) >= 15


def test_every_error_of_the_catalogue_has_an_example_message():
    assert ERROR_MESSAGES.keys() == CATALOGUE.keys()
    assert all(message and not message.endswith(".") for message in ERROR_MESSAGES.values())
