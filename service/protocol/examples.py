"""Example messages of the wire protocol, for the OpenAPI document (and so for /docs and /redoc).

Keyed by the name of the wire model each one is an instance of; `tests/service/protocol/test_examples.py`
parses every example with its model, so an example cannot drift from the protocol unnoticed.
"""

from __future__ import annotations

from typing import Any

from service.errors import (
    BodyTooLarge,
    CorruptImage,
    DownloadFailed,
    HeadersTooLarge,
    ImageSizeInvalid,
    IncompleteRequest,
    InternalError,
    InvalidCredentials,
    InvalidJson,
    InvalidParameter,
    MissingCredentials,
    ModelFailed,
    Overloaded,
    ProjectForbidden,
    RateLimited,
    RouteNotFound,
    ServiceError,
    UnknownField,
    UnsupportedImage,
    UrlNotAllowed,
)

# A real 16x16 PNG, so that "Try it out" in /docs gets a real answer rather than an error.
SMALL_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8UaHBQApgYiARjGoY1TB0NAAAgJwBiHEHVqAAAAAASUVORK5CYII="
)


def _animal_tag(en: str, zh: str, kind: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "confidence": "97.12",
        "type": kind,
        "tag": en,
        "i18n_tag": {"zh": zh, "en": en},
        "i18n_type": {"zh": "动物", "en": "Animal"},
        "instances": instances,
    }


_BOX = {"top_left_x": 53.13, "top_left_y": 24.21, "width": 312.5, "height": 276.0}
_CAT = _animal_tag("cat", "猫", "object", [{"confidence": "91.40", "bounding_box": _BOX}])
_ANIMAL = _animal_tag("animal", "动物", "concept", [])
_DOMAIN = {"id": "8f2c1e6d4b3a49c0a1b2c3d4e5f60718", "name": "demo-account"}
_PROJECT = {"id": "0123456789abcdef0123456789abcdef", "name": "cn-north-4", "domain": _DOMAIN}

EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "TaggingRequest": {
        "image": {
            "summary": "An image in base64",
            "value": {"image": SMALL_PNG_BASE64, "language": "en", "threshold": 60, "limit": 5},
        },
        "url": {
            "summary": "An image the service downloads",
            "value": {"url": "https://images.example.com/cat.jpg", "language": "zh"},
        },
    },
    "TaggingForm": {
        "file": {
            "summary": "The image's file beside the options (the file's bytes stand for the placeholder)",
            "value": {"image": "(the bytes of cat.jpg)", "language": "en", "limit": 5},
        }
    },
    "BatchTaggingRequest": {
        "mixed": {
            "summary": "Two images, one in base64 and one to download",
            "value": {
                "images": [{"image": SMALL_PNG_BASE64}, {"url": "https://images.example.com/cat.jpg"}],
                "language": "en",
                "limit": 5,
            },
        }
    },
    "BatchTaggingForm": {
        "files": {
            "summary": "Several files, each an 'image' part, beside the options",
            "value": {"image": ["(the bytes of cat.jpg)", "(the bytes of bus.jpg)"], "language": "en"},
        }
    },
    "BatchTaggingResponse": {
        "mixed": {
            "summary": "Tags for the first image; the second was not an image",
            "value": {
                "results": [
                    {"result": {"tags": [_CAT, _ANIMAL]}},
                    {"error_code": "AIS.0502", "error_msg": "the image is not JPG, PNG, BMP or WEBP"},
                ]
            },
        }
    },
    "TaggingResponse": {
        "cat": {"summary": "A cat, with its box", "value": {"result": {"tags": [_CAT, _ANIMAL]}}},
        "nothing": {"summary": "Nothing above the threshold", "value": {"result": {"tags": []}}},
        "label_structure": {
            "summary": "With label_structure: true (an extension), each tag's place in the vocabulary",
            "value": {"result": {"tags": [_CAT | {
                "parents": [
                    {"name": "mammal", "i18n": {"zh": "哺乳动物", "en": "mammal"}},
                    {"name": "animal", "i18n": {"zh": "动物", "en": "animal"}},
                ],
                "aliases": [],
                "category_ids": ["animal"],
            }]}},
        },
    },
    "TokenRequest": {
        "password": {
            "summary": "Password login scoped to a project by name",
            "value": {
                "auth": {
                    "identity": {
                        "methods": ["password"],
                        "password": {
                            "user": {"name": "demo-user", "password": "********", "domain": {"name": "demo-account"}}
                        },
                    },
                    "scope": {"project": {"name": "cn-north-4"}},
                }
            },
        }
    },
    "TokenResponse": {
        "token": {
            "summary": "The token's details (the token itself is in X-Subject-Token)",
            "value": {
                "token": {
                    "expires_at": "2026-12-01T21:00:00.000000Z",
                    "issued_at": "2026-11-30T21:00:00.000000Z",
                    "methods": ["password"],
                    "user": {"id": "5e7a0c1d2b3f4a5968778695a4b3c2d1", "name": "demo-user", "domain": _DOMAIN},
                    "project": _PROJECT,
                    "roles": [{"id": "0", "name": "te_admin"}],
                }
            },
        }
    },
    "ProjectList": {
        "projects": {
            "summary": "The caller's projects",
            "value": {
                "projects": [
                    {
                        "id": _PROJECT["id"],
                        "name": _PROJECT["name"],
                        "domain_id": _DOMAIN["id"],
                        "enabled": True,
                        "is_domain": False,
                        "description": "",
                    }
                ]
            },
        }
    },
}

# One message per catalogue entry, as the service words it: the error examples of every operation.
ERROR_MESSAGES: dict[type[ServiceError], str] = {
    InvalidJson: "the request body is not valid JSON",
    UnknownField: "unknown field 'imgae'; the API accepts image, url, language, threshold, limit, label_structure",
    InvalidParameter: "threshold: Input should be less than or equal to 100",
    UnsupportedImage: "the image is not JPG, PNG, BMP or WEBP",
    CorruptImage: "the image could not be decoded",
    ImageSizeInvalid: "the image is 8 px wide; each side must be 15 to 4096 px",
    UrlNotAllowed: "the url points to a private address the service may not reach",
    DownloadFailed: "the url could not be downloaded: timed out",
    BodyTooLarge: "the request body is larger than 12582912 bytes",
    HeadersTooLarge: "the request line and headers are over 32768 bytes",
    IncompleteRequest: "the request body did not arrive within 60 s",
    MissingCredentials: "no credentials: send an IAM token in X-Auth-Token or sign the request with an AK/SK",
    InvalidCredentials: "the token is invalid, expired or revoked",
    ProjectForbidden: "these credentials are not for project 0123456789abcdef0123456789abcdef",
    RouteNotFound: "no API at GET /v2/image/tagging",
    RateLimited: "rate limit exceeded; retry after 1 s",
    ModelFailed: "the models failed on this image",
    InternalError: "internal error; request id 3f1c9a0e5b7d4e2a8c6b1d0f9e8a7b6c",
    Overloaded: "the models are still loading; retry shortly",
}
