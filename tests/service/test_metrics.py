"""Prometheus metrics: the `Metrics` registry alone, an app built in-process, and the real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import requests
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from inference.batching import BatchStats
from service.app import create_app
from service.assembly import build_components
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import photo_base64

PROJECT = "0123456789abcdef0123456789abcdef"
TAGGING = f"/v2/{PROJECT}/image/tagging"
TAGGING_ROUTE = "/v2/{project_id}/image/tagging"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_total(samples: Samples, route: str, status: str, code: str, method: str = "POST") -> float:
    return value(samples, "imagetag_requests_total", route=route, method=method, status=status, code=code)


class FakeInference:
    ready = False


# Metrics alone


def test_a_batch_feeds_its_histograms_and_the_queue_depth():
    metrics = Metrics([0.1, 1.0])
    metrics.observe_batch(BatchStats(size=3, queue_wait_s=(0.004, 0.02, 0.5), model_s=0.2, queue_depth=4))
    sample = metrics.registry.get_sample_value
    assert sample("imagetag_batch_size_count") == 1
    assert sample("imagetag_batch_size_sum") == 3
    assert sample("imagetag_batch_size_bucket", {"le": "2.0"}) == 0
    assert sample("imagetag_batch_size_bucket", {"le": "4.0"}) == 1
    assert sample("imagetag_queue_wait_seconds_count") == 3  # one per image, not per batch
    assert sample("imagetag_queue_wait_seconds_bucket", {"le": "0.005"}) == 1
    assert sample("imagetag_queue_wait_seconds_bucket", {"le": "0.025"}) == 2
    assert sample("imagetag_model_seconds_count") == 1
    assert sample("imagetag_model_seconds_sum") == pytest.approx(0.2)
    assert sample("imagetag_queue_depth") == 4
    metrics.observe_batch(BatchStats(size=1, queue_wait_s=(0.001,), model_s=0.05, queue_depth=0))
    assert sample("imagetag_queue_depth") == 0
    assert sample("imagetag_batch_size_count") == 2


def test_requests_are_counted_by_label_and_timed_in_the_configured_buckets():
    metrics = Metrics([0.5, 2.0])
    metrics.observe_request(TAGGING_ROUTE, "POST", 400, "AIS.0501", 0.7)
    sample = metrics.registry.get_sample_value
    labels = {"route": TAGGING_ROUTE, "method": "POST", "status": "400", "code": "AIS.0501"}
    assert sample("imagetag_requests_total", labels) == 1
    assert sample("imagetag_request_duration_seconds_bucket", {"route": TAGGING_ROUTE, "le": "0.5"}) == 0
    assert sample("imagetag_request_duration_seconds_bucket", {"route": TAGGING_ROUTE, "le": "2.0"}) == 1


def test_every_metrics_has_its_own_registry():
    first, second = Metrics([1.0]), Metrics([1.0])  # the default registry would refuse a second
    first.observe_decode(0.01)
    assert first.registry.get_sample_value("imagetag_decode_seconds_count") == 1
    assert second.registry.get_sample_value("imagetag_decode_seconds_count") == 0
    assert REGISTRY.get_sample_value("imagetag_decode_seconds_count") is None


def test_readiness_and_workers_are_read_at_scrape_time():
    inference = FakeInference()
    metrics = Metrics([1.0])
    metrics.watch(inference)
    assert parse(metrics.exposition().decode())[("imagetag_models_ready", frozenset())] == 0
    assert metrics.registry.get_sample_value("imagetag_workers_alive") == 0
    inference.ready = True
    assert metrics.registry.get_sample_value("imagetag_models_ready") == 1
    assert metrics.registry.get_sample_value("imagetag_workers_alive") == 1  # local: one while ready

    remote = Metrics([1.0])
    remote.watch(inference)
    remote.count_workers(lambda: 3)
    assert remote.registry.get_sample_value("imagetag_workers_alive") == 3


# An app built in-process, wired as `imagetag serve` wires it


class FakeEngine:
    def predict(self, images):
        return [[] for _ in images]


class BrokenInference:
    ready = True

    async def start(self) -> None: ...

    async def tag(self, images, deadline=None):
        raise RuntimeError("a bug")

    async def close(self) -> None: ...


def build_app(tmp_path, **replacements) -> FastAPI:
    settings = Settings(auth_mode="none", data_dir=tmp_path, latency_buckets_s=[0.5, 5.0], batch_max_wait_s=0)
    return create_app(build_components(settings, **replacements))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, once ready; over ASGI, no sockets."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            async with asyncio.timeout(10):
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
            yield client


def test_batches_reach_the_metrics_through_on_batch(tmp_path):
    async def main() -> Samples:
        async with serving(build_app(tmp_path, build_engine=FakeEngine)) as client:
            response = await client.post(TAGGING, json={"image": photo_base64("cat_chelsea.jpg")})
            assert response.status_code == 200, response.text
            return parse((await client.get("/metrics")).text)

    samples = asyncio.run(main())
    assert value(samples, "imagetag_batch_size_count") == 1
    assert value(samples, "imagetag_batch_size_sum") == 1
    assert value(samples, "imagetag_queue_wait_seconds_count") == 1
    assert value(samples, "imagetag_model_seconds_count") == 1
    assert value(samples, "imagetag_decode_seconds_count") == 1
    assert value(samples, "imagetag_models_ready") == 1
    assert value(samples, "imagetag_workers_alive") == 1
    assert requests_total(samples, TAGGING_ROUTE, "200", "") == 1
    assert value(samples, "imagetag_request_duration_seconds_bucket", route=TAGGING_ROUTE, le="5.0") == 1


def test_an_unhandled_error_is_counted_as_the_500_the_client_saw(tmp_path):
    async def main() -> Samples:
        async with serving(build_app(tmp_path, inference=BrokenInference())) as client:
            response = await client.post(TAGGING, json={"image": photo_base64("cat_chelsea.jpg")})
            assert (response.status_code, response.json()["error_code"]) == (500, "AIS.0506")
            return parse((await client.get("/metrics")).text)

    samples = asyncio.run(main())
    assert requests_total(samples, TAGGING_ROUTE, "500", "AIS.0506") == 1
    assert value(samples, "imagetag_requests_in_flight") == 0


# The real server (`imagetag serve`)


def scrape(server) -> Samples:
    response = requests.get(server.url("/metrics"), timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(response.text)


def test_requests_are_counted_with_route_template_status_and_code(server):
    before = scrape(server)
    good = {"image": photo_base64("cat_chelsea.jpg")}
    assert requests.post(server.url(TAGGING), json=good, timeout=60).status_code == 200
    bad = requests.post(server.url(TAGGING), json={**good, "limit": 0}, timeout=60)
    assert (bad.status_code, bad.json()["error_code"]) == (400, "AIS.0501")
    assert requests.get(server.url("/no/such/api"), timeout=10).status_code == 404
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("imagetag_requests_total", route=TAGGING_ROUTE, method="POST", status="200", code="") == 1
    assert moved("imagetag_requests_total", route=TAGGING_ROUTE, method="POST", status="400", code="AIS.0501") == 1
    assert moved("imagetag_requests_total", route="unmatched", method="GET", status="404", code="APIG.0101") == 1
    assert moved("imagetag_request_duration_seconds_count", route=TAGGING_ROUTE) == 2
    assert moved("imagetag_decode_seconds_count") >= 1
    assert value(after, "imagetag_requests_in_flight") == 0
    assert value(after, "imagetag_models_ready") == 1
    assert value(after, "imagetag_workers_alive") == 1
    routes = {dict(labels).get("route") for _, labels in after}
    assert "/metrics" not in routes  # scrapes are not counted
    assert not any(PROJECT in route for route in routes if route)  # templates, never raw paths


def test_the_served_batcher_reports_its_batches(server):
    before = value(scrape(server), "imagetag_batch_size_count")
    body = {"image": photo_base64("cat_chelsea.jpg")}
    assert requests.post(server.url(TAGGING), json=body, timeout=60).status_code == 200
    assert value(scrape(server), "imagetag_batch_size_count") > before
