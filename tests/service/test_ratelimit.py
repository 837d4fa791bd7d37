"""Rate limiting against a real redis-server and in-process; behaviour tests run on both."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import requests
from redis.asyncio import Redis

from service.errors import RateLimited, status_and_code
from service.ratelimit import (
    Bucket,
    Decision,
    LocalRateLimiter,
    RateLimiter,
    RateLimiterUnavailable,
    RedisRateLimiter,
    concurrency_rejection,
    headers,
    rejection,
)
from tests.conftest import REPO, RedisProcess, photo_base64
from tests.service.fakes import FakeInference, gateway

OpenLimiter = Callable[..., AbstractAsyncContextManager[RateLimiter]]


def client(url: str) -> Redis:
    # What the gateway will do: short socket timeouts, redis-py's default retries.
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


@asynccontextmanager
async def redis_limiter(url: str, **options) -> AsyncIterator[RedisRateLimiter]:
    redis = client(url)
    options.setdefault("fail_open", False)
    options.setdefault("prefix", f"test:{uuid.uuid4().hex}:")
    try:
        yield RedisRateLimiter(redis, **options)
    finally:
        await redis.aclose()


@asynccontextmanager
async def local_limiter(**options) -> AsyncIterator[LocalRateLimiter]:
    yield LocalRateLimiter(**options)


@pytest.fixture(params=["local", "redis"])
def open_limiter(request, redis_server) -> OpenLimiter:
    """A factory for a fresh limiter (own key space); call it inside the test's event loop."""
    return local_limiter if request.param == "local" else partial(redis_limiter, redis_server.url)


@pytest.fixture
def private_redis(tmp_path: Path):
    """A server this test may stop and restart without disturbing the shared one."""
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path):
    """A private server that keeps its data across a restart, as a production Redis does."""
    server = RedisProcess(tmp_path, persistent=True)
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)  # in case the test froze it
    server.stop()


# Token buckets


def test_burst_then_deny_then_refill_up_to_burst(open_limiter: OpenLimiter) -> None:
    bucket = Bucket("project", rate=20, burst=4)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            burst = [await limiter.take([bucket]) for _ in range(4)]
            assert burst == [Decision(True, 4, left, 0.0) for left in (3, 2, 1, 0)]
            denied = await limiter.take([bucket])
            assert not denied.allowed and denied.remaining == 0
            assert 0 < denied.retry_after_s <= 0.05 + 0.001
            # 0.3 s at 20/s would be 6 tokens: the bucket holds no more than its burst.
            await asyncio.sleep(0.3)
            refilled = [(await limiter.take([bucket])).allowed for _ in range(5)]
            assert refilled == [True, True, True, True, False]

    asyncio.run(scenario())


def test_retry_after_is_the_wait_for_a_token(open_limiter: OpenLimiter) -> None:
    bucket = Bucket("project", rate=4, burst=1)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            assert (await limiter.take([bucket])).allowed
            first = await limiter.take([bucket])
            assert not first.allowed and 0.2 < first.retry_after_s <= 0.251
            await asyncio.sleep(0.1)
            second = await limiter.take([bucket])
            assert not second.allowed
            assert 0 < second.retry_after_s <= first.retry_after_s - 0.09
            await asyncio.sleep(second.retry_after_s + 0.02)
            assert (await limiter.take([bucket])).allowed

    asyncio.run(scenario())


def test_a_denied_request_takes_from_no_bucket(open_limiter: OpenLimiter) -> None:
    # Slow rates: nothing refills during the test.
    project = Bucket("project", rate=0.01, burst=3)
    access_key = Bucket("ak", rate=0.01, burst=1)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            # The tightest bucket (fewest whole tokens left) is the one reported.
            assert await limiter.take([project, access_key]) == Decision(True, 1, 0, 0.0)
            denied = await limiter.take([project, access_key])
            assert (denied.allowed, denied.limit, denied.remaining) == (False, 1, 0)
            assert denied.retry_after_s == pytest.approx(100, rel=0.01)
            assert await limiter.take([project]) == Decision(True, 3, 1, 0.0)
            assert await limiter.take([project]) == Decision(True, 3, 0, 0.0)
            assert not (await limiter.take([project])).allowed

    asyncio.run(scenario())


def test_retry_after_waits_for_every_bucket(open_limiter: OpenLimiter) -> None:
    fast = Bucket("fast", rate=10, burst=1)
    slow = Bucket("slow", rate=2, burst=1)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            assert (await limiter.take([fast, slow])).allowed
            denied = await limiter.take([fast, slow])
            assert not denied.allowed and 0.45 < denied.retry_after_s <= 0.501
            await asyncio.sleep(0.15)
            # `fast` has refilled, and the denied request did not take it back.
            assert (await limiter.take([fast])).allowed
            assert not (await limiter.take([fast, slow])).allowed

    asyncio.run(scenario())


def test_a_refund_gives_a_token_back_up_to_the_burst(open_limiter: OpenLimiter) -> None:
    bucket = Bucket("login", rate=0.01, burst=2)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            await limiter.refund([bucket])  # already full: stays at its burst
            assert [(await limiter.take([bucket])).allowed for _ in range(3)] == [True, True, False]
            await limiter.refund([bucket])
            assert await limiter.take([bucket]) == Decision(True, 2, 0, 0.0)
            assert not (await limiter.take([bucket])).allowed

    asyncio.run(scenario())


def test_remembered_keys_expire(open_limiter: OpenLimiter) -> None:
    async def scenario() -> None:
        async with open_limiter() as limiter:
            assert not await limiter.remembers("alice@10.0.0.1")
            await limiter.remember("alice@10.0.0.1", 0.3)
            assert await limiter.remembers("alice@10.0.0.1")
            assert not await limiter.remembers("alice@10.0.0.2")
            await asyncio.sleep(0.35)
            assert not await limiter.remembers("alice@10.0.0.1")

    asyncio.run(scenario())


def test_bad_buckets_are_refused(open_limiter: OpenLimiter) -> None:
    with pytest.raises(ValueError):
        Bucket("p", rate=0, burst=1)
    with pytest.raises(ValueError):
        Bucket("p", rate=1, burst=0)

    async def scenario() -> None:
        async with open_limiter() as limiter:
            with pytest.raises(ValueError):
                await limiter.take([])
            with pytest.raises(ValueError):
                await limiter.take([Bucket("p", 1, 1), Bucket("p", 2, 2)])

    asyncio.run(scenario())


# Concurrency


def test_concurrency_cap_and_release(open_limiter: OpenLimiter) -> None:
    async def scenario() -> None:
        async with open_limiter() as limiter:
            first, second = await limiter.acquire("p", 2), await limiter.acquire("p", 2)
            assert first is not None and second is not None
            assert await limiter.acquire("p", 2) is None
            assert await limiter.acquire("other", 2) is not None  # a cap per key
            await limiter.release(first)
            assert await limiter.acquire("p", 2) is not None
            assert await limiter.acquire("p", 2) is None

    asyncio.run(scenario())


def test_concurrency_block_releases_even_when_the_request_fails(open_limiter: OpenLimiter) -> None:
    async def scenario() -> None:
        async with open_limiter() as limiter:
            async with limiter.concurrency("p", 1):
                with pytest.raises(RateLimited) as denied:
                    async with limiter.concurrency("p", 1):
                        pass
            assert denied.value.headers == {"Retry-After": "1"}
            with pytest.raises(ZeroDivisionError):
                async with limiter.concurrency("p", 1):
                    1 / 0
            async with limiter.concurrency("p", 1):
                pass

    asyncio.run(scenario())


def test_a_stale_lease_expires(open_limiter: OpenLimiter) -> None:
    async def scenario() -> None:
        async with open_limiter(lease_ttl_s=0.3) as limiter:
            assert await limiter.acquire("p", 2) is not None  # never released: its holder "crashed"
            await asyncio.sleep(0.2)
            # A live lease keeps the set itself alive: the stale one must be purged by its score.
            assert await limiter.acquire("p", 2) is not None
            assert await limiter.acquire("p", 2) is None
            await asyncio.sleep(0.2)
            assert await limiter.acquire("p", 2) is not None
            assert await limiter.acquire("p", 2) is None

    asyncio.run(scenario())


def test_idle_redis_keys_vanish(redis_server) -> None:
    async def scenario() -> None:
        async with redis_limiter(redis_server.url, prefix="test:ttl:", lease_ttl_s=60) as limiter:
            await limiter.take([Bucket("p", rate=10, burst=5)])
            lease = await limiter.acquire("p", 3)
            inspect = client(redis_server.url)
            try:
                # One token short refills in 0.1 s; the script adds a second of slack.
                assert 1000 < await inspect.pttl("test:ttl:bucket:p") <= 1100
                assert 59_000 < await inspect.pttl("test:ttl:leases:p") <= 60_000
                await limiter.release(lease)
                assert await inspect.exists("test:ttl:leases:p") == 0
            finally:
                await inspect.aclose()

    asyncio.run(scenario())


# Two gateway processes

WORKER = textwrap.dedent("""
    import asyncio, sys, time
    from redis.asyncio import Redis
    from service.ratelimit import Bucket, RedisRateLimiter

    async def main(url, prefix, start, duration):
        redis = Redis.from_url(url, socket_timeout=1)
        limiter = RedisRateLimiter(redis, fail_open=False, prefix=prefix)
        bucket = Bucket("shared", rate=50, burst=10)
        await asyncio.sleep(start - time.time())
        allowed = tries = 0
        while time.time() < start + duration:
            allowed += (await limiter.take([bucket])).allowed
            tries += 1
        await redis.aclose()
        print(allowed, tries)

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
""")


def test_two_processes_share_one_limit(redis_server) -> None:
    rate, burst, duration = 50, 10, 1.0
    start = time.time() + 2.0  # both past their imports before the first request
    argv = [redis_server.url, f"test:{uuid.uuid4().hex}:", str(start), str(duration)]
    workers = [
        subprocess.Popen([sys.executable, "-W", "error", "-c", WORKER, *argv], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        results.append(tuple(map(int, out.split())))
    allowed = sum(a for a, _ in results)
    assert all(a > 0 and tries > 10 * a for a, tries in results), results  # both hammered
    # Redis time spans at most the window plus one in-flight call.
    assert burst + rate * duration * 0.8 <= allowed <= burst + rate * (duration + 0.05), results


# Redis slow, down, restarted


def test_redis_down_fails_closed_within_the_bound(private_redis: RedisProcess) -> None:
    async def scenario() -> None:
        async with redis_limiter(private_redis.url, timeout_s=0.3, cooldown_s=0) as limiter:
            lease = await limiter.acquire("p", 5)
            assert lease is not None
            private_redis.stop()
            for call in (lambda: limiter.take([Bucket("p", 1, 1)]), lambda: limiter.acquire("p", 5)):
                started = time.monotonic()
                with pytest.raises(RateLimiterUnavailable):
                    await call()
                assert time.monotonic() - started < 0.6
            started = time.monotonic()
            await limiter.release(lease)  # never raises: the lease expires by its TTL
            assert time.monotonic() - started < 0.6

    asyncio.run(scenario())
    assert status_and_code(RateLimiterUnavailable()) == (503, "AIS.0506")


def test_redis_down_fails_open_and_warns_once(
    private_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with redis_limiter(private_redis.url, fail_open=True, timeout_s=0.3) as limiter:
            private_redis.stop()
            started = time.monotonic()
            for _ in range(30):
                assert (await limiter.take([Bucket("p", rate=1, burst=2)])).allowed
                async with limiter.concurrency("p", 1):
                    pass
            # Only the first call waited on Redis; the rest were answered during the cool-down.
            assert time.monotonic() - started < 0.6

    with caplog.at_level(logging.WARNING, logger="service.ratelimit"):
        asyncio.run(scenario())
    assert len(caplog.records) == 1
    assert "fail open" in caplog.records[0].getMessage()


def test_slow_redis_is_bounded_and_leaves_the_client_usable(private_redis: RedisProcess) -> None:
    async def scenario() -> None:
        async with redis_limiter(private_redis.url, timeout_s=0.2, cooldown_s=0) as limiter:
            assert (await limiter.take([Bucket("a", rate=1, burst=3)])).allowed
            admin = client(private_redis.url)
            await admin.execute_command("CLIENT", "PAUSE", 700, "ALL")
            await admin.aclose()
            started = time.monotonic()
            with pytest.raises(RateLimiterUnavailable):
                await limiter.take([Bucket("a", rate=1, burst=3)])
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0.7)
            # A connection still owed the cancelled reply would hand `a`'s answer (burst 3) here.
            assert await limiter.take([Bucket("b", rate=1, burst=7)]) == Decision(True, 7, 6, 0.0)
            assert await limiter.acquire("p", 1) is not None

    asyncio.run(scenario())


def test_redis_restart_recovers_without_a_new_limiter(private_redis: RedisProcess) -> None:
    bucket = Bucket("p", rate=1, burst=5)

    async def scenario() -> None:
        async with redis_limiter(private_redis.url, timeout_s=0.3, cooldown_s=0.1) as limiter:
            assert (await limiter.take([bucket])).allowed  # script cached on the first server
            private_redis.stop()
            with pytest.raises(RateLimiterUnavailable):
                await limiter.take([bucket])
            private_redis.start()  # same port, empty script cache: NOSCRIPT must be handled
            started = time.monotonic()
            while True:
                try:
                    decision = await limiter.take([bucket])
                    break
                except RateLimiterUnavailable:
                    assert time.monotonic() - started < 3, "the limiter did not recover"
                    await asyncio.sleep(0.05)
            assert decision == Decision(True, 5, 4, 0.0)  # the restarted server kept no data
            async with limiter.concurrency("p", 1):
                pass

    asyncio.run(scenario())


async def acquired_within(limiter: RateLimiter, key: str, limit: int, seconds: float) -> float:
    """How long until `limit` slots can be held at once again; fails after `seconds`."""
    started = time.monotonic()
    while True:
        leases = []
        try:
            for _ in range(limit):
                if (lease := await limiter.acquire(key, limit)) is not None:
                    leases.append(lease)
        except RateLimiterUnavailable:
            pass
        for lease in leases:
            await limiter.release(lease)
        elapsed = time.monotonic() - started
        if len(leases) == limit:
            return elapsed
        assert elapsed < seconds, f"only {len(leases)} of {limit} slots free after {elapsed:.1f} s"
        await asyncio.sleep(0.05)


def test_releases_that_fail_while_redis_is_down_are_retried_when_it_returns(durable_redis: RedisProcess) -> None:
    async def scenario() -> None:
        async with redis_limiter(durable_redis.url, timeout_s=0.3, lease_ttl_s=60) as limiter:
            leases = [await limiter.acquire("p", 3) for _ in range(3)]
            durable_redis.stop()
            for lease in leases:
                await limiter.release(lease)  # fails: Redis is down, and keeps the leases on disk
            await asyncio.sleep(1)
            durable_redis.start()
            assert await acquired_within(limiter, "p", 3, seconds=2) < 2
            await limiter.close()

    asyncio.run(scenario())


def test_releases_and_acquires_that_time_out_leak_no_slot(durable_redis: RedisProcess) -> None:
    async def scenario() -> None:
        async with redis_limiter(durable_redis.url, timeout_s=0.3, cooldown_s=0, lease_ttl_s=60) as limiter:
            held = await limiter.acquire("p", 2)
            durable_redis.process.send_signal(signal.SIGSTOP)  # hung, not gone: calls time out
            try:
                # Written on the pooled connection, so the server runs it when it wakes: a lease
                # nobody hears of. The timeout drops that connection, so the release then waits
                # for a new one's handshake and never reaches the server.
                with pytest.raises(RateLimiterUnavailable):
                    await limiter.acquire("p", 2)
                await limiter.release(held)
            finally:
                durable_redis.process.send_signal(signal.SIGCONT)
            assert await acquired_within(limiter, "p", 2, seconds=2) < 2

    asyncio.run(scenario())


def test_closing_tries_the_pending_releases_once_more(durable_redis: RedisProcess) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def scenario() -> None:
        async with redis_limiter(durable_redis.url, prefix=prefix, timeout_s=0.3, retry_s=3600) as limiter:
            lease = await limiter.acquire("p", 1)
            durable_redis.stop()
            await limiter.release(lease)
            durable_redis.start()
            await limiter.close()  # the hour-long retry period never came round
            async with redis_limiter(durable_redis.url, prefix=prefix) as other_gateway:
                assert await other_gateway.acquire("p", 1) is not None

    asyncio.run(scenario())


def test_an_outage_with_requests_in_flight_costs_no_capacity_after_it(durable_redis: RedisProcess, tmp_path) -> None:
    """Over HTTP: 8 requests hold every slot when Redis stops; once it is back, all 8 are free."""
    slots = 8
    body = {"image": photo_base64("cat_chelsea.jpg")}
    with gateway(tmp_path, FakeInference(delay_s=1.5), redis_url=durable_redis.url, master_key="k",
                 max_concurrent_per_project=slots, rate_limit_per_s=1000, rate_limit_burst=1000) as server:

        def tag(_=None) -> int:
            return requests.post(server.url("/v1.0/image/tagging"), json=body, timeout=30).status_code

        with ThreadPoolExecutor(slots) as pool:
            in_flight = [pool.submit(tag) for _ in range(slots)]
            time.sleep(0.5)  # all admitted, none finished
            durable_redis.stop()
            assert [f.result() for f in in_flight] == [200] * slots  # their releases failed
        durable_redis.start()
        back = time.monotonic()
        with ThreadPoolExecutor(slots) as pool:
            while True:
                round_started = time.monotonic() - back
                if (statuses := list(pool.map(tag, range(slots)))) == [200] * slots:
                    break
                assert round_started < 2, statuses
        assert round_started < 2


# Helpers for the gateway


def test_rejections_follow_the_contract() -> None:
    denied = rejection(Decision(False, 10, 0, 0.2))
    assert status_and_code(denied) == (429, "APIG.0308")
    assert denied.headers == {"Retry-After": "1", "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0"}
    assert rejection(Decision(False, 10, 0, 2.01)).headers["Retry-After"] == "3"
    assert headers(Decision(True, 10, 7, 0.0)) == {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "7"}
    too_many = concurrency_rejection(10)
    assert status_and_code(too_many) == (429, "APIG.0308") and too_many.headers == {"Retry-After": "1"}
