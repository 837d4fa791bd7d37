"""The error catalogue: every failure a client can see, as data.

Domain code raises one of the exceptions below with a message written for the caller; the
handlers in `service.app` (and `imagetag tag`) look the exception type up in `CATALOGUE`, the one
place that holds each HTTP status and vendor `error_code`, and answer with the one error envelope
`{"error_code": ..., "error_msg": ...}`.

    ServiceError
     ├── InvalidJson           the body is not a JSON object
     ├── UnknownField          a field the API does not define
     ├── InvalidParameter      missing/both image and url, bad type, range, base64
     ├── UnsupportedImage      the bytes are not JPG/PNG/BMP/WEBP
     ├── CorruptImage          a supported format that fails to decode
     ├── ImageSizeInvalid      size rules broken (also a too-large download)
     ├── UrlNotAllowed         a `url` the downloader may not reach
     ├── DownloadFailed        a `url` (or file) that could not be read
     ├── BodyTooLarge          the request body is over the cap
     ├── HeadersTooLarge       the request line and headers are over the cap
     ├── IncompleteRequest     the head or body did not arrive whole in time
     ├── MissingCredentials    no token and no signature
     ├── InvalidCredentials    a bad token, signature or password
     ├── ProjectForbidden      credentials of another project's account
     ├── RouteNotFound         no API at this method and path
     ├── RateLimited           over a rate or concurrency limit
     ├── ModelFailed           the models failed on this image
     ├── InternalError         a bug: the request id is in the message and the log
     └── Overloaded            queue full, models loading, deadline passed, Redis away
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see; `message` becomes `error_msg`."""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidJson(ServiceError): ...
class UnknownField(ServiceError): ...
class InvalidParameter(ServiceError): ...
class UnsupportedImage(ServiceError): ...
class CorruptImage(ServiceError): ...
class ImageSizeInvalid(ServiceError): ...
class UrlNotAllowed(ServiceError): ...
class DownloadFailed(ServiceError): ...
class BodyTooLarge(ServiceError): ...
class HeadersTooLarge(ServiceError): ...
class IncompleteRequest(ServiceError): ...
class MissingCredentials(ServiceError): ...
class InvalidCredentials(ServiceError): ...
class ProjectForbidden(ServiceError): ...
class RouteNotFound(ServiceError): ...
class RateLimited(ServiceError): ...
class ModelFailed(ServiceError): ...
class InternalError(ServiceError): ...
class Overloaded(ServiceError): ...


CATALOGUE: dict[type[ServiceError], tuple[int, str]] = {
    InvalidJson: (400, "AIS.0014"),
    UnknownField: (400, "AIS.0012"),
    InvalidParameter: (400, "AIS.0501"),
    UnsupportedImage: (400, "AIS.0502"),
    CorruptImage: (400, "AIS.0503"),
    ImageSizeInvalid: (400, "AIS.0504"),
    UrlNotAllowed: (400, "ModelArts.4601"),
    DownloadFailed: (400, "ModelArts.4603"),
    BodyTooLarge: (413, "APIG.0201"),
    # The vendor's gateway answers every request it cannot take whole with APIG.0201.
    HeadersTooLarge: (431, "APIG.0201"),
    IncompleteRequest: (408, "APIG.0201"),
    MissingCredentials: (401, "ModelArts.4101"),
    InvalidCredentials: (401, "APIG.0301"),
    ProjectForbidden: (403, "ModelArts.4203"),
    RouteNotFound: (404, "APIG.0101"),
    RateLimited: (429, "APIG.0308"),
    ModelFailed: (500, "AIS.0505"),
    InternalError: (500, "AIS.0506"),
    Overloaded: (503, "AIS.0506"),
}


def status_and_code(error: ServiceError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in CATALOGUE:
            return CATALOGUE[cls]
    return CATALOGUE[InternalError]


def error_body(error: ServiceError) -> dict[str, str]:
    """The envelope's fields, for HTTP and for `imagetag tag`'s JSON lines alike."""
    return {"error_code": status_and_code(error)[1], "error_msg": error.message}
