"""One place builds the service: every part from Settings, embedded or remote inference."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import redis
import torch

from inference.batching import BatchingInference
from inference.device_images import decode_images
from inference.pipeline import DevicePipeline
from inference.remote import Channels, RemoteInference, encode_result, parse_job
from inference.results import ModelError
from service.assembly import CPU_BATCH_SIZE, GPU_BATCH_SIZE, build_components, engine_factory, model_batch_size
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, REPO
from tests.service.fakes import FakeInference
from tests.service.fakes import cat as fake_cat

CHANNELS = Channels()


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


def test_later_replicas_share_the_first_ones_weights_where_the_runtimes_allow(tmp_path):
    """The worker and the embedded batcher call the factory once per replica."""
    settings = Settings(data_dir=tmp_path, redis_url=None, detector_weights=[DETECTOR_WEIGHTS], torch_threads=2,
                        batch_max_size=2, classifier_runtime="torch", detector_runtime="torch")
    build = engine_factory(settings)
    first, second, third = build(), build(), build()
    assert first.engine is second.engine is third.engine
    assert len({id(pipeline.detectors[0].network) for pipeline in (first, second, third)}) == 3
    exported = engine_factory(settings.model_copy(update={"classifier_runtime": "openvino"}))
    assert exported().engine is not exported().engine  # an OpenVINO request is not shared


GATEWAY_IN_A_FRESH_PROCESS = """
import asyncio, base64, json, sys
import httpx
from service.app import create_app
from service.assembly import build_components
from service.settings import Settings

settings = Settings(inference="remote", redis_url=sys.argv[1], master_key="m" * 32, auth_mode="none",
                    data_dir=sys.argv[2])
app = create_app(build_components(settings))
image = base64.b64encode(open(sys.argv[3], "rb").read()).decode()

async def main():
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
            response = await client.post("/v2.0/image/tagging", json={"image": image, "language": "en", "label_structure": True}, timeout=30)
            metrics = await client.get("/metrics")
    loaded = sorted({"torch", "torchvision", "ultralytics", "opentelemetry.exporter.otlp.proto.http"} & set(sys.modules))
    print(json.dumps({"status": response.status_code, "body": response.json(), "metrics": metrics.status_code,
                      "loaded": loaded, "models": response.headers.get("X-Imagetag-Models")}))

asyncio.run(main())
"""


def test_a_remote_gateway_builds_and_serves_without_the_model_libraries(tmp_path, redis_server):
    """`IMAGETAG_INFERENCE=remote`: the app is built and a request served (a photo tagged by a
    worker played by hand on the real Redis, with label_structure) in a fresh process that never
    imports torch, torchvision or ultralytics, nor (with no endpoint configured) the OTLP exporter."""
    with redis.Redis.from_url(redis_server.url) as control:
        control.flushdb()
        control.zadd(CHANNELS.workers, {"hand-played": time.time() + 60})
        gateway = subprocess.Popen(
            [sys.executable, "-c", GATEWAY_IN_A_FRESH_PROCESS, redis_server.url, str(tmp_path),
             str(PHOTOS / "cat_chelsea.jpg")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            read = control.xread({CHANNELS.stream: "0"}, block=30_000)
            assert read, gateway.stderr.read() if gateway.poll() is not None else "no job queued"
            ((_, [(_, fields)]),) = read
            job = parse_job(fields)
            assert job.image == (PHOTOS / "cat_chelsea.jpg").read_bytes()  # as the client sent it
            assert job.trace == ""  # no tracing configured: no context travels
            control.xadd(job.reply_to, {"result": encode_result(job.id, fake_cat(), "detector=sha256:d1")})
            out, err = gateway.communicate(timeout=60)
        finally:
            gateway.kill()
    assert gateway.returncode == 0, err
    served = json.loads(out.splitlines()[-1])
    assert served["status"] == 200 and served["metrics"] == 200, served
    assert [t["tag"] for t in served["body"]["result"]["tags"]] == ["cat"]
    assert [p["name"] for p in served["body"]["result"]["tags"][0]["parents"]] == ["mammal", "animal"]
    assert served["loaded"] == []  # label_structure's vocabulary included
    assert served["models"] == "detector=sha256:d1"  # named by the worker that answered


def test_batches_default_to_the_devices_size_and_the_setting_wins(tmp_path):
    def size(**settings) -> int:
        return model_batch_size(Settings(data_dir=tmp_path, redis_url=None, **settings))

    assert size(device="cpu") == CPU_BATCH_SIZE == 8
    assert size(device="cpu", batch_max_size=32) == 32
    if torch.cuda.is_available():
        assert size(device="cuda") == GPU_BATCH_SIZE == 64
        assert size(device="cuda", batch_max_size=4) == 4
