"""What a tagging body asks for, whatever it is encoded as: the contract's JSON (base64 or a
`url`), the raw bytes of one image (`Content-Type: image/jpeg|png|bmp|webp`, the options as
query parameters), or `multipart/form-data` (`image` files, or `image`/`url` text fields, beside
the options). The JSON path is the contract's, unchanged; the other two carry an image as it is,
without base64's third more bytes, and are parsed from the body already read under its cap.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.deps import ReceivedBody, json_object
from service.errors import InvalidJson, InvalidParameter
from service.protocol.tagging import (
    MAX_BATCH_IMAGES,
    BatchTaggingRequest,
    ImageSource,
    TaggingOptions,
    TaggingRequest,
)
from service.tagging import Source

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/webp")
MULTIPART = "multipart/form-data"
IMAGE_FIELDS = ("image", "url")
# The options, the images and nothing else: a form with more parts is not a tagging request.
_MAX_PARTS = MAX_BATCH_IMAGES + len(TaggingOptions.model_fields)

@dataclass(frozen=True)
class Images:
    sources: list[Source]
    options: TaggingOptions


@dataclass(frozen=True)
class _Part:
    name: str
    data: bytes
    is_file: bool

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameter(f"form field {self.name!r} is not UTF-8 text") from None


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def one_image(body: ReceivedBody, content_type: str, query: Mapping[str, str]) -> Images:
    """The single-image paths' request."""
    kind = media_type(content_type)
    if kind in IMAGE_MEDIA_TYPES:
        return Images([body.data], TaggingOptions.parse(dict(query), text=True))
    if kind == MULTIPART:
        fields, sources = _form(body.data, content_type)
        if len(sources) != 1:
            raise InvalidParameter(f"the form holds {len(sources)} images; give exactly one 'image' (or 'url')")
        return Images(sources, TaggingOptions.parse(fields, text=True))
    request = TaggingRequest.parse(json_object(body))
    return Images([request], request)


def several_images(body: ReceivedBody, content_type: str) -> Images:
    """The batch paths' request: JSON `{"images": [...]}`, or a form of several images."""
    kind = media_type(content_type)
    if kind in IMAGE_MEDIA_TYPES:
        raise InvalidJson(f"a batch is JSON or {MULTIPART}; one image's own bytes go to the single-image path")
    if kind == MULTIPART:
        fields, sources = _form(body.data, content_type)
        if not 1 <= len(sources) <= MAX_BATCH_IMAGES:
            raise InvalidParameter(f"the form holds {len(sources)} images; give 1 to {MAX_BATCH_IMAGES}")
        return Images(sources, TaggingOptions.parse(fields, text=True))
    request = BatchTaggingRequest.parse(json_object(body))
    return Images(list(request.images), request)


def _form(data: bytes, content_type: str) -> tuple[dict[str, str], list[Source]]:
    """The options (as text) and the images, in the order of their parts."""
    fields: dict[str, str] = {}
    sources: list[Source] = []
    for part in _parts(data, content_type):
        if part.name == "image" and part.is_file:
            sources.append(part.data)
        elif part.name in IMAGE_FIELDS:
            sources.append(ImageSource.parse({part.name: part.text()}))
        elif part.name in fields:
            raise InvalidParameter(f"form field {part.name!r} is given twice")
        else:
            fields[part.name] = part.text()
    return fields, sources


def _parts(data: bytes, content_type: str) -> list[_Part]:
    boundary = _header_params(f"Content-Type: {content_type}").get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise InvalidJson("a multipart/form-data body needs a boundary in its Content-Type")
    delimiter = b"--" + boundary.encode("latin-1")
    start = data.find(delimiter)
    if start < 0 or (start > 0 and data[start - 2 : start] != b"\r\n"):
        raise InvalidJson("the multipart body does not start with its boundary")
    # Each segment is a part (headers, blank line, content); the last one the closing "--".
    segments = data[start + len(delimiter) :].split(b"\r\n" + delimiter)
    if len(segments) < 2 or not segments[-1].startswith(b"--"):
        raise InvalidJson("the multipart body is not closed by its final boundary")
    if len(segments) - 1 > _MAX_PARTS:
        raise InvalidParameter(f"the form has {len(segments) - 1} parts; a tagging request has at most {_MAX_PARTS}")
    return [_part(segment) for segment in segments[:-1]]


def _part(segment: bytes) -> _Part:
    head, blank, content = segment.partition(b"\r\n\r\n")
    _, newline, head = head.partition(b"\r\n")  # after the boundary: transport padding, then CRLF
    if not blank or not newline:
        raise InvalidJson("a multipart part lacks its headers")
    headers = _header_params(head.decode("latin-1"))
    name = headers.get_param("name", header="content-disposition")
    if headers.get_content_disposition() != "form-data" or not isinstance(name, str):
        raise InvalidJson("every multipart part needs 'Content-Disposition: form-data; name=...'")
    return _Part(name, content, is_file=headers.get_filename() is not None)


def _header_params(head: str) -> email.message.EmailMessage:
    return email.parser.HeaderParser(policy=email.policy.HTTP).parsestr(head + "\r\n\r\n")  # type: ignore[return-value]


def upload_bodies(*, several: bool, raw: bool) -> dict[str, Any]:
    """The OpenAPI media types of the uploads a path takes besides JSON: a form, and with `raw`
    the image's own bytes (the options then as query parameters, `upload_parameters`)."""
    image = {"type": "string", "format": "binary", "description": "a JPG, PNG, BMP or WEBP file, at most 10 MB"}
    form = {
        "title": "BatchTaggingForm" if several else "TaggingForm",
        "type": "object",
        "properties": {
            "image": {"type": "array", "items": image, "maxItems": MAX_BATCH_IMAGES} if several else image,
            **_option_schemas(),
        },
        "required": ["image"],
    }
    content: dict[str, Any] = {MULTIPART: {"schema": form, "encoding": {"image": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}}}
    if raw:
        content |= {kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_MEDIA_TYPES}
    return content


def upload_parameters() -> list[dict[str, Any]]:
    """The options as query parameters, as a raw image body takes them."""
    return [
        {"name": name, "in": "query", "required": False, "schema": schema,
         "description": f"with an image/* body only: {schema.get('description', name)}"}
        for name, schema in _option_schemas().items()
    ]


def _option_schemas() -> dict[str, Any]:
    return TaggingOptions.model_json_schema()["properties"]
