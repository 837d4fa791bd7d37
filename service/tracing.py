"""OpenTelemetry traces, exported over OTLP/HTTP when an endpoint is configured
(IMAGETAG_OTEL_ENDPOINT, or the standard OTEL_EXPORTER_OTLP_ENDPOINT).

A gateway opens one server span per request (continuing an incoming W3C `traceparent`); in
remote mode each job carries that span's `traceparent` through Redis (`inference.remote`) and the
worker records its queue and model spans under it, so one trace runs gateway -> queue -> worker.
Without an endpoint, `NoTracing` stands in: the OpenTelemetry packages are not even imported.
The provider is this object's own, never OpenTelemetry's global one, so apps and tests in one
process do not share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from service.build import version
from service.settings import Settings

if TYPE_CHECKING:
    from starlette.types import Scope

_PROPAGATED = (b"traceparent", b"tracestate")


class NoTracing:
    """Tracing off: every call does nothing."""

    @contextmanager
    def request_span(self, scope: Scope) -> Iterator[Any]:
        yield None

    def finish_request(self, span: Any, fields: dict[str, object]) -> None:
        pass

    def traceparent(self) -> str:
        return ""

    def record(self, parent: str, name: str, start_s: float, end_s: float, attributes: dict[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


class OtlpTracing:
    def __init__(self, endpoint: str, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._kinds = SpanKind
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name, "service.version": version()})
        )
        # The generic endpoint names the collector; traces go to its /v1/traces (OTLP/HTTP spec).
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("imagetag", version())
        self._propagator = TraceContextTextMapPropagator()

    @contextmanager
    def request_span(self, scope: Scope) -> Iterator[Any]:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _PROPAGATED}
        with self._tracer.start_as_current_span(
            scope["method"], context=self._propagator.extract(carrier), kind=self._kinds.SERVER
        ) as span:
            yield span

    def finish_request(self, span: Any, fields: dict[str, object]) -> None:
        """Names the span by its route once routing has found it, and notes the outcome."""
        span.update_name(f"{fields['method']} {fields['route']}")
        span.set_attributes({
            "http.request.method": str(fields["method"]),
            "http.route": str(fields["route"]),
            "http.response.status_code": int(fields["status"]),  # type: ignore[call-overload]
            "imagetag.request_id": str(fields["request_id"]),
            "imagetag.error_code": str(fields["error_code"]),
            "imagetag.project": str(fields["project"] or ""),
        })

    def traceparent(self) -> str:
        """The current span's context, to travel with a job."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent", "")

    def record(self, parent: str, name: str, start_s: float, end_s: float, attributes: dict[str, object]) -> None:
        span = self._tracer.start_span(
            name,
            context=self._propagator.extract({"traceparent": parent}),
            kind=self._kinds.CONSUMER,
            start_time=int(start_s * 1e9),
            attributes=attributes,  # type: ignore[arg-type]
        )
        span.end(end_time=int(end_s * 1e9))

    def close(self) -> None:
        self._provider.shutdown()  # exports what is still buffered


Tracing = NoTracing | OtlpTracing


def build_tracing(settings: Settings, service_name: str) -> Tracing:
    return OtlpTracing(settings.otel_endpoint, service_name) if settings.otel_endpoint else NoTracing()
