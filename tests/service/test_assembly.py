"""One place builds the service: every part from Settings, embedded or remote inference."""

from __future__ import annotations

import asyncio
import logging

from inference.batching import BatchingInference
from inference.remote import RemoteInference
from service.assembly import build_components
from service.settings import Settings
from tests.service.fakes import FakeInference


def close(components) -> None:
    asyncio.run(components.close())


def test_embedded_by_default_with_iam(tmp_path):
    components = build_components(Settings(data_dir=tmp_path, redis_url=None))
    try:
        assert isinstance(components.inference, BatchingInference)
        assert components.authenticator is not None and components.iam is not None
        assert components.tagging.inference is components.inference
        assert (tmp_path / "identity.sqlite3").exists()
    finally:
        close(components)


def test_remote_inference_goes_through_redis(tmp_path, redis_server):
    settings = Settings(data_dir=tmp_path, redis_url=redis_server.url, master_key="m" * 32, inference="remote")
    components = build_components(settings)
    try:
        assert isinstance(components.inference, RemoteInference)
        assert components.backends.redis is not None
    finally:
        close(components)


def test_auth_mode_none_warns_and_builds_no_authenticator(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        components = build_components(Settings(data_dir=tmp_path, auth_mode="none", redis_url=None),
                                      inference=FakeInference())
    try:
        assert components.authenticator is None and components.iam is None
        assert "IMAGETAG_AUTH_MODE=none" in caplog.text
    finally:
        close(components)
