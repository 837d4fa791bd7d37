"""The checks `serve` and `worker` make before binding, on real files, real certificates made by
openssl and a real redis-server. The same failures through the real command: test_cli.py."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from service.preflight import check_data_dir, check_models, check_tls, redacted, wait_for_redis
from service.settings import ConfigurationError, Settings
from tests.conftest import DETECTOR_WEIGHTS, RedisProcess, free_port


def certificate(directory: Path, name: str, *extra: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert), *(extra or ("-nodes",))],
        check=True, capture_output=True,
    )
    return cert, key


def refusal(check, **settings) -> str:
    with pytest.raises(ConfigurationError) as refused:
        check(Settings(**settings))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_tls_files_are_tried_before_serving(tmp_path):
    cert, key = certificate(tmp_path, "server")
    other_cert, other_key = certificate(tmp_path, "other")
    encrypted_cert, encrypted_key = certificate(tmp_path, "locked", "-passout", "pass:secret")
    check_tls(Settings(tls_certfile=cert, tls_keyfile=key))  # a matching pair passes

    assert refusal(check_tls, tls_certfile=tmp_path / "no.crt", tls_keyfile=key) == (
        f"IMAGETAG_TLS_CERTFILE (--certfile): {tmp_path / 'no.crt'}: no such file")
    assert refusal(check_tls, tls_certfile=cert, tls_keyfile=tmp_path) == (
        f"IMAGETAG_TLS_KEYFILE (--keyfile): {tmp_path}: not a file")
    assert refusal(check_tls, tls_certfile=key, tls_keyfile=key).startswith(
        f"IMAGETAG_TLS_CERTFILE (--certfile): {key}: no PEM certificate in it")
    for wrong_key in (other_key, encrypted_key, cert):
        message = refusal(check_tls, tls_certfile=cert, tls_keyfile=wrong_key)
        assert message.startswith(f"IMAGETAG_TLS_KEYFILE (--keyfile): {wrong_key}: not an unencrypted PEM private key")
    assert other_cert.exists() and encrypted_cert.exists()


def test_weights_and_device_are_checked_by_name(tmp_path):
    check_models(Settings(detector_weights=[DETECTOR_WEIGHTS], device="cpu"))
    (tmp_path / "half.pt").write_bytes(DETECTOR_WEIGHTS.read_bytes()[:100_000])
    assert refusal(check_models, detector_weights=f"{DETECTOR_WEIGHTS},{tmp_path / 'half.pt'}") == (
        f"IMAGETAG_DETECTOR_WEIGHTS: {tmp_path / 'half.pt'}: corrupt or truncated: not a PyTorch archive")
    assert refusal(check_models, detector_weights=[tmp_path / "none.pt"]).startswith(
        f"IMAGETAG_DETECTOR_WEIGHTS: {tmp_path / 'none.pt'}: not found; run `imagetag weights fetch yolo11n`")
    assert refusal(check_models, detector_weights=[DETECTOR_WEIGHTS], classifier_weights=tmp_path / "half.pt") == (
        f"IMAGETAG_CLASSIFIER_WEIGHTS: {tmp_path / 'half.pt'}: corrupt or truncated: not a PyTorch archive")
    assert refusal(check_models, detector_weights=[DETECTOR_WEIGHTS], device="tpu") == (
        "IMAGETAG_DEVICE: unknown device 'tpu': use auto, cpu, cuda or cuda:N")


def test_the_data_dir_must_be_a_folder_this_user_can_write(tmp_path):
    check_data_dir(Settings(data_dir=tmp_path / "new" / "data"))
    assert (tmp_path / "new" / "data").is_dir()
    (tmp_path / "file").write_text("a file where the folder should be")
    assert refusal(check_data_dir, data_dir=tmp_path / "file" / "data").startswith(
        f"IMAGETAG_DATA_DIR: {tmp_path / 'file' / 'data'}: cannot be created")


def test_redis_is_waited_for_then_given_up_on(tmp_path):
    port = free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    started = time.monotonic()
    message = refusal(wait_for_redis, redis_url=url, redis_startup_wait_s=1.0)
    assert 0.9 < time.monotonic() - started < 5
    assert message.startswith(f"IMAGETAG_REDIS_URL: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (waited 1 s")
    assert "hunter2" not in message

    # Redis that comes up while the process waits is found.
    server = RedisProcess(tmp_path, port=port)
    later = threading.Timer(1.0, server.start)
    later.start()
    try:
        started = time.monotonic()
        wait_for_redis(Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_startup_wait_s=20))
        assert 0.9 < time.monotonic() - started < 10
        # A Redis that answers "no" is not waited for.
        redis.Redis(port=port).config_set("requirepass", "right")
        started = time.monotonic()
        message = refusal(wait_for_redis, redis_url=url, redis_startup_wait_s=20)
        assert time.monotonic() - started < 5
        assert message.startswith(f"IMAGETAG_REDIS_URL: Redis at redis://:***@127.0.0.1:{port}/0 refused:")
    finally:
        later.join()
        server.stop()


def test_redacted_hides_only_the_password():
    assert redacted("redis://:pw@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
