"""SDK-HMAC-SHA256, the AK/SK request signature of the vendor's SDK (contract section 5).

The server recomputes the client's signature from the request exactly as it arrived: the raw
path and query, the header values, the hash of the raw body bytes. Nothing here knows about the
web framework; the auth dependency builds a `RequestToSign` and calls `verify`, after
`check_dated` has refused what can be refused before the body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote

from service.errors import InvalidCredentials

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# A signature that covers neither Host nor the date could be replayed at another host or forever.
REQUIRED_SIGNED_HEADERS = ("host", "x-sdk-date")

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SDK_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_HEADER_NAME = re.compile(r"[0-9a-z!#$%&'*+.^_`|~-]+")
_ACCESS_KEY = re.compile(r"[!-~]+")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_SHAPE = f"Authorization must be '{ALGORITHM} Access=<AK>, SignedHeaders=<h1;h2>, Signature=<hex>'"


class SignatureError(InvalidCredentials):
    """The AK/SK signature does not hold; the message is written for the client and never holds a
    secret or the expected signature."""


@dataclass(frozen=True)
class SdkAuthorization:
    access_key: str
    signed_headers: tuple[str, ...]
    signature: str


@dataclass(frozen=True)
class RequestToSign:
    """A request as received: `path` and `query` raw from the wire (still percent-encoded), header
    names in any case; the body by its hex SHA-256, taken as it streamed in."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body_sha256: str


def parse_authorization(value: str) -> SdkAuthorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureError(f"{_SHAPE}; other signing algorithms are not supported")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, field = part.strip().partition("=")
        if not equals or name not in ("Access", "SignedHeaders", "Signature") or name in fields:
            raise SignatureError(_SHAPE)
        fields[name] = field.strip()
    if len(fields) != 3 or not _ACCESS_KEY.fullmatch(fields["Access"]):
        raise SignatureError(_SHAPE)
    names = tuple(fields["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(name) for name in names) or len(set(names)) != len(names):
        raise SignatureError("SignedHeaders must list distinct lower-case header names separated by ';'")
    signature = fields["Signature"].lower()
    if not _SIGNATURE.fullmatch(signature):
        raise SignatureError("Signature must be 64 hex digits")
    return SdkAuthorization(fields["Access"], names, signature)


def canonical_request(request: RequestToSign, signed_headers: Sequence[str]) -> str:
    """The text whose hash is signed; `signed_headers` are used in the order given (the SDK sorts them)."""
    headers = _lowered(request.headers)
    names = [name.lower() for name in signed_headers]
    for name in names:
        if name not in headers:
            raise SignatureError(f"signed header {name!r} is missing from the request")
    canonical_headers = "".join(f"{name}:{headers[name].strip()}\n" for name in names)
    return "\n".join([
        request.method.upper(),
        _canonical_uri(request.path),
        _canonical_query(request.query),
        canonical_headers,
        ";".join(names),
        _payload_hash(request.body_sha256, headers),
    ])


def signature(secret_key: str, request: RequestToSign, signed_headers: Sequence[str]) -> str:
    """Hex HMAC-SHA256 over the string to sign, dated by the request's own X-Sdk-Date header."""
    sdk_date = _lowered(request.headers).get("x-sdk-date")
    if sdk_date is None:
        raise SignatureError("the X-Sdk-Date header is missing")
    digest = hashlib.sha256(canonical_request(request, signed_headers).encode()).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{sdk_date.strip()}\n{digest}"
    return hmac.new(secret_key.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


def verify(
    secret_key: str,
    request: RequestToSign,
    authorization: SdkAuthorization,
    *,
    now: datetime,
    max_skew: timedelta = timedelta(minutes=15),
) -> None:
    """Raise `SignatureError` unless `authorization` signs this very request, dated near `now`
    (timezone-aware)."""
    check_dated(request.headers, authorization, now=now, max_skew=max_skew)
    headers = _lowered(request.headers)
    claimed = headers.get("x-sdk-content-sha256", "").strip()
    # The header stands in for the body's hash when it is present, so a copied signature could
    # carry any other body: it must be the real hash (which also refuses UNSIGNED-PAYLOAD).
    if request.body_sha256 != _EMPTY_SHA256 and claimed and claimed.lower() != request.body_sha256:
        raise SignatureError(
            "X-Sdk-Content-Sha256 must be the SHA-256 of the body; unsigned payloads are refused"
        )
    expected = signature(secret_key, request, authorization.signed_headers)
    if not hmac.compare_digest(expected, authorization.signature):
        raise SignatureError(
            "the signature does not match the request: check the SK, and that the path, query, body "
            "and signed headers (Host included) reach the service unchanged"
        )


def check_dated(
    headers: Mapping[str, str], authorization: SdkAuthorization, *, now: datetime, max_skew: timedelta
) -> None:
    """What `verify` refuses without the body: a signature that covers neither Host nor the date,
    or one dated too far from `now` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    for name in REQUIRED_SIGNED_HEADERS:
        if name not in authorization.signed_headers:
            raise SignatureError(f"SignedHeaders must include {name}")
    if abs(now - _sdk_date(_lowered(headers).get("x-sdk-date"))) > max_skew:
        raise SignatureError(
            f"X-Sdk-Date is more than {max_skew.total_seconds() / 60:g} minutes off the server's clock"
        )


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        lowered.setdefault(name.lower(), value)  # the first of repeated headers, as Starlette reads it
    return lowered


def _encode(text: str) -> str:
    return quote(text, safe="~")


def _canonical_uri(path: str) -> str:
    # Decoding before splitting means an encoded "/" separates segments too, as in the SDK.
    uri = "/".join(_encode(segment) for segment in unquote(path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def _canonical_query(query: str) -> str:
    pairs = []
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            pairs.append((unquote(key), unquote(value)))  # "+" stays a plus: the SDK sends spaces as %20
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(pairs))


def _payload_hash(body_sha256: str, headers: Mapping[str, str]) -> str:
    if body_sha256 == _EMPTY_SHA256:
        return _EMPTY_SHA256  # the SDK ignores X-Sdk-Content-Sha256 when there is no body
    return headers.get("x-sdk-content-sha256", "").strip() or body_sha256


def _sdk_date(value: str | None) -> datetime:
    if value is None:
        raise SignatureError("the X-Sdk-Date header is missing")
    if _SDK_DATE.fullmatch(value.strip()):
        try:
            return datetime.strptime(value.strip(), DATE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    raise SignatureError("X-Sdk-Date must be a UTC time written YYYYMMDDTHHMMSSZ")
