"""One place builds the service: every part from Settings, embedded or remote inference."""

from __future__ import annotations

import asyncio
import logging

import pytest

from inference.batching import BatchingInference
from inference.remote import RemoteInference
from service.assembly import build_components
from service.backends import build_backends, master_key_for
from service.settings import ConfigurationError, Settings
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


def test_embedded_master_key_is_made_once_and_private(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", redis_url=None)
    key = master_key_for(settings)
    assert master_key_for(settings) == key
    assert oct((tmp_path / "data" / "master.key").stat().st_mode & 0o777) == "0o600"


def test_shared_store_needs_an_explicit_master_key(tmp_path):
    with pytest.raises(ConfigurationError, match="IMAGETAG_MASTER_KEY"):
        build_backends(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
