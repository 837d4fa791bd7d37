"""What `imagetag serve` and `imagetag worker` check before they bind a port.

A process that binds and then cannot serve looks alive to everything that watches it: a probe
that reads only /healthz, an operator who sees "Uvicorn running". So the settings that name
files, devices and services are tried first, cheaply: the TLS files load, the data folder can be
written, Redis answers, the device exists, the weights files are whole. Each failure is a
`ConfigurationError` whose message is one line naming the variable (or flag) and the file at
fault; the CLI prints it and exits with status 2. What only loading the models can tell (a sound
archive that holds no model) shows after start: /readyz says "failed" and the process exits.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from inference.files import weights_problem
from service.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

_CERTFILE = "IMAGETAG_TLS_CERTFILE (--certfile)"
_KEYFILE = "IMAGETAG_TLS_KEYFILE (--keyfile)"
_REDIS_RETRY_S = 0.5


def check_serve(settings: Settings) -> None:
    check_tls(settings)
    if settings.redis_url:
        wait_for_redis(settings)
    else:
        check_data_dir(settings)
    if settings.inference == "local":
        check_models(settings)


def check_worker(settings: Settings) -> None:
    check_models(settings)
    wait_for_redis(settings)


def check_models(settings: Settings) -> None:
    """The weights files first (a read each), then the device (imports torch)."""
    for path in settings.detector_weights:
        if problem := weights_problem(path):
            hint = (
                "; run `imagetag weights fetch yolo11n` (on a machine with internet access) or point "
                "IMAGETAG_DETECTOR_WEIGHTS at weights you have"
                if problem == "not found"
                else ""
            )
            raise ConfigurationError(f"IMAGETAG_DETECTOR_WEIGHTS: {path}: {problem}{hint}")
    if settings.classifier_weights is not None and (problem := weights_problem(settings.classifier_weights)):
        raise ConfigurationError(f"IMAGETAG_CLASSIFIER_WEIGHTS: {settings.classifier_weights}: {problem}")
    from inference.devices import DeviceUnavailable, resolve_device

    try:
        resolve_device(settings.device)
    except DeviceUnavailable as error:
        raise ConfigurationError(f"IMAGETAG_DEVICE: {error}") from None


def check_tls(settings: Settings) -> None:
    certfile, keyfile = settings.tls_certfile, settings.tls_keyfile
    if certfile is None or keyfile is None:  # Settings refuses one without the other
        return
    for variable, path in ((_CERTFILE, certfile), (_KEYFILE, keyfile)):
        if problem := _unreadable(path):
            raise ConfigurationError(f"{variable}: {path}: {problem}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
    except ssl.SSLError as error:
        raise ConfigurationError(f"{_CERTFILE}: {certfile}: no PEM certificate in it ({error.reason})") from None
    try:
        # An empty password rather than OpenSSL's prompt on the terminal for an encrypted key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=lambda: b"")
    except ssl.SSLError as error:
        raise ConfigurationError(
            f"{_KEYFILE}: {keyfile}: not an unencrypted PEM private key of the certificate in {certfile} "
            f"({error.reason})"
        ) from None


def check_data_dir(settings: Settings) -> None:
    """The embedded identity store and its key are written under IMAGETAG_DATA_DIR."""
    directory = settings.data_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(f"IMAGETAG_DATA_DIR: {directory}: cannot be created ({error.strerror})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(f"IMAGETAG_DATA_DIR: {directory}: not writable by this user")


def wait_for_redis(settings: Settings) -> None:
    """PING until Redis answers or IMAGETAG_REDIS_STARTUP_WAIT_S has passed: Redis may be starting
    beside this process, but a wrong address or password is never right a moment later."""
    assert settings.redis_url
    shown = redacted(settings.redis_url)
    try:
        client = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
    except ValueError as error:
        raise ConfigurationError(f"IMAGETAG_REDIS_URL: {shown}: {error}") from None
    deadline = time.monotonic() + settings.redis_startup_wait_s
    with client:
        while True:
            try:
                client.ping()
                return
            except (AuthenticationError, ResponseError) as error:  # it answered, and said no
                raise ConfigurationError(f"IMAGETAG_REDIS_URL: Redis at {shown} refused: {error}") from None
            except RedisError as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConfigurationError(
                        f"IMAGETAG_REDIS_URL: cannot reach Redis at {shown} "
                        f"(waited {settings.redis_startup_wait_s:g} s, IMAGETAG_REDIS_STARTUP_WAIT_S): {error}"
                    ) from None
                log.info("waiting for Redis at %s: %s", shown, error)
                time.sleep(min(_REDIS_RETRY_S, remaining))


def redacted(url: str) -> str:
    """`url` without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _unreadable(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    try:
        with path.open("rb"):
            return None
    except OSError as error:
        return f"cannot be read ({error.strerror})"
