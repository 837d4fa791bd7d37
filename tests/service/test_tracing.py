"""Traces over OTLP/HTTP, gateway -> queue -> worker, received by a real HTTP server speaking the
OTLP protobuf export."""

from __future__ import annotations

import base64
import hashlib
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from service.weights import packaged_classifier
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, RedisProcess, start_server, stop_server
from tests.inference.test_remote import CHANNELS, fresh_db, start_worker


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


class OtlpReceiver:
    """Accepts `POST /v1/traces` (application/x-protobuf) and keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.paths.append(self.path)
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    service = next(a.value.string_value for a in resource_spans.resource.attributes
                                   if a.key == "service.name")
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans += [
                            ReceivedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                         span.parent_span_id.hex(),
                                         {a.key: _value(a.value) for a in span.attributes})
                            for span in scope_spans.spans
                        ]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, trace_id: str, count: int, timeout_s: float = 30) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = [s for s in self.spans if s.trace_id == trace_id]
            if len(spans) >= count:
                return spans
            time.sleep(0.1)
        raise AssertionError(f"{count} spans of trace {trace_id} never came; got {self.spans}")


def _value(value) -> object:
    return getattr(value, value.WhichOneof("value"))


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_trace_runs_from_the_gateway_through_the_queue_to_the_worker(
    receiver: OtlpReceiver, redis_server: RedisProcess, tmp_path, monkeypatch
):
    url = fresh_db(redis_server, 5)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)  # the standard variable...
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    worker = start_worker(url, tmp_path)
    gateway = None
    try:
        with redis.Redis.from_url(url) as client:
            deadline = time.monotonic() + 180
            while not client.zcard(CHANNELS.workers):
                assert worker.process.poll() is None, worker.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the worker did not start"
                time.sleep(0.2)
        gateway = start_server(tmp_path, env={
            "IMAGETAG_INFERENCE": "remote", "IMAGETAG_REDIS_URL": url, "IMAGETAG_MASTER_KEY": "m" * 32,
            "OTEL_EXPORTER_OTLP_ENDPOINT": None, "IMAGETAG_OTEL_ENDPOINT": receiver.url})  # ...or ours
        # The caller's own trace, continued by the gateway.
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        image = base64.b64encode((PHOTOS / "cat_chelsea.jpg").read_bytes()).decode()
        response = requests.post(gateway.url("/v2.0/image/tagging"), json={"image": image, "language": "en"},
                                 headers={"traceparent": f"00-{trace_id}-{caller_span}-01"}, timeout=60)
        assert response.status_code == 200, response.text
        assert "cat" in [t["tag"] for t in response.json()["result"]["tags"]]

        spans = receiver.wait_for(trace_id, 3)
        assert set(receiver.paths) == {"/v1/traces"}
        (request,) = [s for s in spans if s.service == "imagetag-gateway"]
        assert request.name == "POST /v2.0/image/tagging" and request.parent_id == caller_span
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["imagetag.request_id"] == response.headers["X-Request-Id"]
        on_worker = {s.name: s for s in spans if s.service == "imagetag-worker"}
        assert set(on_worker) == {"imagetag.queue", "imagetag.worker.predict"}
        assert {s.parent_id for s in on_worker.values()} == {request.span_id}  # under the gateway's span
        assert on_worker["imagetag.queue"].attributes["imagetag.job"] == on_worker[
            "imagetag.worker.predict"].attributes["imagetag.job"]

        # The worker that answered names its weights; so does its build_info.
        expected = (f"detector=sha256:{sha256(DETECTOR_WEIGHTS)},"
                    f"classifier=sha256:{sha256(packaged_classifier())}")
        assert response.headers["X-Imagetag-Models"] == expected
        assert response.headers["X-Imagetag-Version"]
        metrics = worker.metrics()
        assert [k for k in metrics if k.startswith("imagetag_build_info")] == [
            f'imagetag_build_info{{"models": "{expected}", "version": "{response.headers["X-Imagetag-Version"]}"}}']
        gateway_metrics = requests.get(gateway.url("/metrics"), timeout=10).text
        assert f'models="{expected}"' in gateway_metrics

        # A request without a trace of its own starts one; the job still carries it to the worker.
        plain = requests.post(gateway.url("/v2.0/image/tagging"), json={"image": image}, timeout=60)
        assert plain.status_code == 200
        deadline = time.monotonic() + 30
        while True:
            fresh = {s.trace_id for s in receiver.spans if s.trace_id != trace_id}
            traced = [t for t in fresh if {s.service for s in receiver.spans if s.trace_id == t} == {
                "imagetag-gateway", "imagetag-worker"}]
            if traced or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(traced) == 1, receiver.spans
    finally:
        if gateway is not None:
            stop_server(gateway)
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.process.kill()
