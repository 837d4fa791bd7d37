"""The one Settings class: values from IMAGETAG_* variables, refused when they cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_runtime_state_defaults_to_the_current_directory_never_the_package():
    settings = Settings()
    assert settings.data_dir == Path("data") and not settings.data_dir.is_absolute()
    assert settings.weights_dir == Path("weights")
    assert settings.detector_weights == [Path("weights") / "yolo11n.pt"]


def test_lists_come_comma_separated(monkeypatch):
    monkeypatch.setenv("IMAGETAG_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1/24")
    monkeypatch.setenv("IMAGETAG_LATENCY_BUCKETS_S", "1, 0.5,2")
    monkeypatch.setenv("IMAGETAG_DETECTOR_WEIGHTS", "weights/yolo11n.pt, weights/yolov8s-oiv7.pt")
    settings = Settings()
    assert settings.detector_weights == [Path("weights/yolo11n.pt"), Path("weights/yolov8s-oiv7.pt")]
    assert [str(n) for n in settings.proxy_networks()] == ["10.0.0.0/8", "192.168.1.0/24"]
    assert settings.latency_buckets_s == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"url_allowed_networks": ["not-a-network"]}, "does not appear to be an IPv4 or IPv6 network"),
        ({"tls_certfile": Path("cert.pem")}, "HTTPS needs both a certificate"),
        ({"inference": "remote"}, "IMAGETAG_INFERENCE=remote needs IMAGETAG_REDIS_URL"),
        ({"port": 0}, "greater than or equal to 1"),
    ],
)
def test_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(redis_url=None, **values)
