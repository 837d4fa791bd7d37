"""Where identities and rate-limit state live: the embedded default (SQLite and in-process
limits) or the shared one (Redis), chosen by `IMAGETAG_REDIS_URL`. All that `imagetag admin`
needs, so it stays free of the model libraries; `service.assembly` builds the rest on top."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.identity import IdentityStore, RedisIdentityStore, SqliteIdentityStore
from service.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from service.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)


@dataclass
class Backends:
    store: IdentityStore
    limiter: RateLimiter
    redis: Redis | None

    async def close(self) -> None:
        await self.limiter.close()
        await self.store.close()
        if self.redis is not None:
            await self.redis.aclose()


def redis_client(settings: Settings) -> Redis:
    if not settings.redis_url:
        raise ConfigurationError("this needs IMAGETAG_REDIS_URL")
    # One quick retry, then give up: during an outage each request must fail within about two
    # timeouts rather than after redis-py's default round of backed-off retries.
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=10,
    )


def build_backends(settings: Settings) -> Backends:
    master_key = master_key_for(settings)
    if settings.redis_url:
        client = redis_client(settings)
        limiter = RedisRateLimiter(
            client, fail_open=settings.rate_limit_fail_open, timeout_s=settings.redis_timeout_s
        )
        return Backends(RedisIdentityStore(client, master_key), limiter, client)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteIdentityStore(settings.data_dir / "identity.sqlite3", master_key)
    return Backends(store, LocalRateLimiter(), None)


def master_key_for(settings: Settings) -> str:
    if settings.master_key is not None:
        return settings.master_key.get_secret_value()
    if settings.redis_url:
        # Replicas must share one key, and a key made up here would be this process's alone.
        raise ConfigurationError("IMAGETAG_MASTER_KEY must be set when IMAGETAG_REDIS_URL is")
    return _embedded_master_key(settings.data_dir / "master.key")


def _embedded_master_key(path: Path) -> str:
    """The single-process default keeps its key beside its database, readable by its owner only."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process got there first: use its key
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    log.warning("generated a master key at %s; set IMAGETAG_MASTER_KEY to manage it yourself", path)
    return key
