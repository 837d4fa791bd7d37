"""Rate limiting for the gateway: token buckets and a per-project cap on concurrent requests.

One interface, `RateLimiter`, two implementations chosen at start-up:

- `RedisRateLimiter`: shared by every gateway process. Each decision is one Lua script, so it is
  atomic across processes and uses Redis's clock, not the gateways'.
- `LocalRateLimiter`: in-process, for the single-process embedded default.

The gateway turns a denial into the contract's errors with `rejection()` (429 APIG.0308 with
`Retry-After`) and `concurrency_rejection()`; `RateLimiterUnavailable` (Redis down and not
failing open) is an `Overloaded`, so the error catalogue answers it with 503 AIS.0506.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import Overloaded, RateLimited

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Bucket:
    key: str
    rate: float  # tokens added per second
    burst: int  # capacity: how many requests may arrive at once after a quiet spell

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burst < 1:
            raise ValueError(f"bucket {self.key!r} needs rate > 0 and burst >= 1")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int  # burst of the tightest bucket (the one with the fewest whole tokens left)
    remaining: int  # whole tokens left in that bucket
    retry_after_s: float  # 0 when allowed; else until every bucket holds a token


@dataclass(frozen=True)
class Lease:
    key: str
    id: str
    tracked: bool = True  # False when granted without the backend (failing open)


class RateLimiterUnavailable(Overloaded):
    """The shared limiter cannot be reached and the limiter is configured to fail closed."""

    def __init__(self) -> None:
        super().__init__("rate limiting is unavailable; retry shortly", headers={"Retry-After": "1"})


def rejection(decision: Decision) -> RateLimited:
    retry_after = max(1, math.ceil(decision.retry_after_s))
    return RateLimited(
        f"The request is sent too fast and exceeds the rate limit; retry after {retry_after} s.",
        headers={"Retry-After": str(retry_after), **headers(decision)},
    )


def concurrency_rejection(limit: int) -> RateLimited:
    return RateLimited(
        f"Too many concurrent requests for this project (limit {limit}); retry shortly.",
        headers={"Retry-After": "1"},
    )


def headers(decision: Decision) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}


class RateLimiter(ABC):
    async def take(self, buckets: Sequence[Bucket], tokens: int = 1) -> Decision:
        """Take `tokens` from every bucket if each holds them; otherwise take none and deny."""
        return await self._spend(buckets, tokens)

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        """Give back a token `take` took from each bucket (none beyond its burst)."""
        await self._spend(buckets, -1)

    @abstractmethod
    async def _spend(self, buckets: Sequence[Bucket], tokens: int) -> Decision:
        """Take `tokens` from every bucket if each holds them (a negative count gives them back)."""

    @abstractmethod
    async def remember(self, key: str, ttl_s: float) -> None:
        """Note `key` for `ttl_s` seconds; best effort, never raises."""

    @abstractmethod
    async def remembers(self, key: str) -> bool:
        """Whether `key` was noted by `remember` and has not expired."""

    @abstractmethod
    async def acquire(self, key: str, limit: int) -> Lease | None:
        """A concurrency slot under `key`, or None when `limit` leases are already held."""

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """Give a slot back; never raises, since it runs after the response is decided."""

    @asynccontextmanager
    async def concurrency(self, key: str, limit: int) -> AsyncIterator[Lease]:
        """Hold a slot for the block; raises `concurrency_rejection` at once when none is free."""
        lease = await self.acquire(key, limit)
        if lease is None:
            raise concurrency_rejection(limit)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def close(self) -> None:
        """Stop background work; the process is shutting down."""


def _check(buckets: Sequence[Bucket]) -> None:
    # A key named twice would be read twice and written once, so it would lose a token.
    if not buckets or len({b.key for b in buckets}) != len(buckets):
        raise ValueError("take() needs at least one bucket and distinct bucket keys")


# Both scripts read the clock with TIME: Redis >= 5 replicates scripts by effects, which allows
# that before writes, and one clock for all gateways means their own clocks never matter.
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cost = tonumber(ARGV[1])
local levels, wait_s = {}, 0
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'tokens', 'updated_at')
  local level = burst
  if state[1] and state[2] then
    -- max(0, ...): after a failover the new primary's clock may be behind
    level = math.min(burst, tonumber(state[1]) + math.max(0, now_ms - tonumber(state[2])) * rate / 1000)
  end
  levels[i] = level
  if level < cost then wait_s = math.max(wait_s, (cost - level) / rate) end
end
local allowed = wait_s == 0
local tightest = 1
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if allowed then
    levels[i] = math.min(burst, levels[i] - cost)
    redis.call('HSET', key, 'tokens', levels[i], 'updated_at', now_ms)
    -- once refilled, a bucket is the same as a missing one, so it may vanish
    redis.call('PEXPIRE', key, math.ceil((burst - levels[i]) * 1000 / rate) + 1000)
  end
  local whole, best = math.floor(levels[i]), math.floor(levels[tightest])
  if whole < best or (whole == best and burst < tonumber(ARGV[2 * tightest + 1])) then tightest = i end
end
return {allowed and 1 or 0, tonumber(ARGV[2 * tightest + 1]), math.floor(levels[tightest]), math.ceil(wait_s * 1000)}
"""

_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local limit, ttl_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
-- leases whose gateway died before releasing them
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now_ms + ttl_ms, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl_ms then redis.call('PEXPIRE', KEYS[1], ttl_ms) end
return 1
"""


class RedisRateLimiter(RateLimiter):
    """Limits shared through Redis; the caller builds `client` with socket timeouts.

    Every call is bounded by `timeout_s`. After a failure Redis is left alone for `cooldown_s`, so
    during an outage requests get their answer at once instead of each waiting out the bound: with
    `fail_open` they are allowed, otherwise `RateLimiterUnavailable` is raised.

    A release that fails (or an acquire whose reply was lost, which Redis may have applied) is
    retried every `retry_s` in the background until it succeeds, so a project's capacity is back
    one round trip after Redis is; the lease TTL only covers a gateway that died holding leases.
    Retrying beats short leases renewed while requests run: it costs Redis nothing in steady state
    and frees a slot exactly, where a renewal period trades Redis traffic against recovery time.
    """

    def __init__(
        self,
        client: Redis,
        *,
        fail_open: bool,
        timeout_s: float = 0.2,
        cooldown_s: float = 1.0,
        lease_ttl_s: float = 60.0,
        prefix: str = "imagetag:ratelimit:",
        warn_every_s: float = 30.0,
        retry_s: float = 0.2,
    ) -> None:
        self._fail_open = fail_open
        self._timeout_s = timeout_s
        self._cooldown_s = cooldown_s
        self._lease_ttl_s = lease_ttl_s
        self._lease_ttl_ms = math.ceil(lease_ttl_s * 1000)
        self._retry_s = retry_s
        self._unreleased: dict[Lease, float] = {}  # lease -> when Redis expires it anyway
        self._releasing: asyncio.Task[None] | None = None
        self._prefix = prefix
        # register_script runs EVALSHA and reloads the script on NOSCRIPT (a restarted Redis).
        self._take = client.register_script(_TAKE)
        self._acquire = client.register_script(_ACQUIRE)
        self._client = client
        self._skip_until = 0.0
        self._warnings = _ThrottledWarning(warn_every_s)

    async def _spend(self, buckets: Sequence[Bucket], tokens: int) -> Decision:
        _check(buckets)
        keys = [self._prefix + "bucket:" + b.key for b in buckets]
        args = [tokens, *(x for b in buckets for x in (repr(float(b.rate)), b.burst))]
        try:
            allowed, limit, remaining, wait_ms = await self._call(lambda: self._take(keys, args), True)
        except RateLimiterUnavailable:
            if not self._fail_open:
                raise
            limit = min(b.burst for b in buckets)
            return Decision(True, limit, limit - 1, 0.0)  # remaining is a guess: nothing to count with
        return Decision(bool(allowed), int(limit), int(remaining), int(wait_ms) / 1000)

    async def acquire(self, key: str, limit: int) -> Lease | None:
        lease = Lease(key, uuid.uuid4().hex)
        args = [lease.id, limit, self._lease_ttl_ms]
        try:
            granted = await self._call(lambda: self._acquire([self._leases(key)], args), True)
        except RateLimiterUnavailable as unavailable:
            if unavailable.__cause__ is not None:  # sent: Redis may hold the lease though the reply was lost
                self._release_later(lease)
            if not self._fail_open:
                raise
            return Lease(key, lease.id, tracked=False)
        return lease if granted else None

    async def release(self, lease: Lease) -> None:
        if not lease.tracked:
            return
        try:
            await self._call(lambda: self._client.zrem(self._leases(lease.key), lease.id), True)
        except RateLimiterUnavailable:
            self._release_later(lease)

    async def remember(self, key: str, ttl_s: float) -> None:
        noted = self._prefix + "noted:" + key
        try:
            await self._call(lambda: self._client.set(noted, 1, px=math.ceil(ttl_s * 1000)), True)
        except RateLimiterUnavailable:
            pass  # already logged; forgetting costs only a later exemption

    async def remembers(self, key: str) -> bool:
        try:
            return bool(await self._call(lambda: self._client.exists(self._prefix + "noted:" + key), True))
        except RateLimiterUnavailable:
            if not self._fail_open:
                raise
            return False

    async def close(self) -> None:
        if self._releasing is not None:
            self._releasing.cancel()
            await asyncio.gather(self._releasing, return_exceptions=True)
        if self._unreleased:  # one last try, so that a restart does not strand them
            await self._release_pending()

    def _leases(self, key: str) -> str:
        return self._prefix + "leases:" + key

    def _release_later(self, lease: Lease) -> None:
        self._unreleased[lease] = time.monotonic() + self._lease_ttl_s
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.create_task(self._retry_releases())

    async def _retry_releases(self) -> None:
        while self._unreleased:
            await asyncio.sleep(self._retry_s)
            await self._release_pending()

    async def _release_pending(self) -> None:
        now = time.monotonic()
        self._unreleased = {lease: until for lease, until in self._unreleased.items() if until > now}
        batch = list(self._unreleased)
        if not batch:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for lease in batch:
                        pipe.zrem(self._leases(lease.key), lease.id)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            return  # still down; the next round tries again
        for lease in batch:
            self._unreleased.pop(lease, None)
        # Redis answers again: stop turning requests away for the rest of the cool-down.
        self._skip_until = 0.0
        self._warnings.recovered()

    async def _call(self, call: Callable[[], Awaitable[T]], may_skip: bool) -> T:
        # `call` is a factory so that a skipped call creates no coroutine left unawaited.
        if may_skip and time.monotonic() < self._skip_until:
            self._warnings.failed(None, self._fail_open)
            raise RateLimiterUnavailable()
        try:
            # redis-py disconnects a connection whose command was cancelled mid-reply, so a
            # timeout here cannot leave a stale reply for the next command to read.
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._skip_until = time.monotonic() + self._cooldown_s
            self._warnings.failed(exc, self._fail_open)
            raise RateLimiterUnavailable() from exc
        self._warnings.recovered()
        return result


class _ThrottledWarning:
    """One warning per `every_s` while Redis fails, with a count, rather than one per request."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._next_at = 0.0
        self._failures = 0  # since the last warning
        self._down = False

    def failed(self, error: BaseException | None, fail_open: bool) -> None:
        self._down = True
        self._failures += 1
        now = time.monotonic()
        if error is not None and now >= self._next_at:
            log.warning(
                "rate limiter: Redis unavailable (%r); %s; %d requests affected since the last warning",
                error, "allowing requests (fail open)" if fail_open else "rejecting requests with 503",
                self._failures,
            )
            self._next_at, self._failures = now + self._every_s, 0

    def recovered(self) -> None:
        if self._down:
            log.info("rate limiter: Redis reachable again")
            self._down, self._next_at, self._failures = False, 0.0, 0


class LocalRateLimiter(RateLimiter):
    """The same limits inside one process (single-threaded asyncio: no awaits, so no locks)."""

    def __init__(self, *, lease_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, float]] = {}  # key -> tokens, updated_at, full_at
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease id -> expires_at
        self._noted: dict[str, float] = {}  # key -> expires_at
        self._sweep_at = 0.0

    async def _spend(self, buckets: Sequence[Bucket], tokens: int) -> Decision:
        _check(buckets)
        now = self._clock()
        self._sweep(now)
        levels = [self._level(b, now) for b in buckets]
        wait_s = max(((tokens - level) / b.rate for b, level in zip(buckets, levels) if level < tokens), default=0.0)
        if wait_s == 0:
            levels = [min(b.burst, level - tokens) for b, level in zip(buckets, levels)]
            for b, level in zip(buckets, levels):
                self._buckets[b.key] = (level, now, now + (b.burst - level) / b.rate)
        tightest = min(range(len(buckets)), key=lambda i: (math.floor(levels[i]), buckets[i].burst))
        return Decision(wait_s == 0, buckets[tightest].burst, math.floor(levels[tightest]), wait_s)

    async def acquire(self, key: str, limit: int) -> Lease | None:
        now = self._clock()
        held = {i: t for i, t in self._leases.get(key, {}).items() if t > now}
        if len(held) >= limit:
            self._leases[key] = held
            return None
        lease = Lease(key, uuid.uuid4().hex)
        held[lease.id] = now + self._lease_ttl_s
        self._leases[key] = held
        return lease

    async def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.key, {})
        held.pop(lease.id, None)
        if not held:
            self._leases.pop(lease.key, None)

    async def remember(self, key: str, ttl_s: float) -> None:
        self._noted[key] = self._clock() + ttl_s

    async def remembers(self, key: str) -> bool:
        return self._noted.get(key, -math.inf) > self._clock()

    def _level(self, bucket: Bucket, now: float) -> float:
        state = self._buckets.get(bucket.key)
        if state is None:
            return float(bucket.burst)
        tokens, updated_at, _ = state
        return min(bucket.burst, tokens + max(0.0, now - updated_at) * bucket.rate)

    def _sweep(self, now: float) -> None:
        # Without this, every access key ever seen would stay in memory.
        if now < self._sweep_at:
            return
        self._sweep_at = now + 60
        self._buckets = {k: s for k, s in self._buckets.items() if s[2] > now}
        self._noted = {k: t for k, t in self._noted.items() if t > now}
        for key in list(self._leases):
            self._leases[key] = {i: t for i, t in self._leases[key].items() if t > now}
            if not self._leases[key]:
                del self._leases[key]
