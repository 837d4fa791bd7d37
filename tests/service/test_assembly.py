"""One place builds the service: every part from Settings, embedded or remote inference."""

from __future__ import annotations

import asyncio
import logging

import torch

from inference.batching import BatchingInference
from inference.device_images import decode_images
from inference.pipeline import DevicePipeline
from inference.remote import RemoteInference
from inference.results import ModelError
from service.assembly import build_components, engine_factory
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS
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


def test_the_served_models_count_failed_batches_into_the_metrics(tmp_path, caplog):
    """The embedded service and `imagetag worker` build their models with `engine_factory`, on
    their own metrics' counter; a batch that fails is logged and counted, not only slow."""
    settings = Settings(data_dir=tmp_path, redis_url=None, detector_weights=[DETECTOR_WEIGHTS], torch_threads=2,
                        batch_max_size=4)
    service = Metrics([1.0])
    pipeline = engine_factory(settings, service.failed_batches)()
    assert isinstance(pipeline, DevicePipeline) and pipeline.buckets == (1, 2, 4)
    (cat,) = decode_images([(PHOTOS / "cat_chelsea.jpg").read_bytes()], pipeline.device)
    four_channels = torch.cat([cat, cat[:1]])  # pixels the models cannot take
    with caplog.at_level(logging.ERROR):
        results = pipeline.predict_pixels([cat, four_channels])
    assert isinstance(results[1], ModelError) and "cat" in {t.tag.key for t in results[0]}
    assert "a batch of 2 images failed" in caplog.text
    assert service.registry.get_sample_value("imagetag_failed_batches_total") == 1
