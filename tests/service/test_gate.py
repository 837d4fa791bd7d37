"""Admission: which buckets a request draws on, the concurrency cap, and the login limits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from service.errors import RateLimited
from service.gate import Gate, Limits
from service.identity.models import Project
from service.ratelimit import LocalRateLimiter

LIMITS = Limits(rate_per_s=0.001, burst=3, max_concurrent_per_project=1, login_per_minute=2)


def project(**overrides) -> Project:
    return Project("p" * 32, "d" * 32, "cn-north-4", datetime.now(UTC), **overrides)


async def admit_times(gate: Gate, times: int, *args) -> list[dict[str, str]]:
    admitted = []
    for _ in range(times):
        async with gate.admit(*args) as headers:
            admitted.append(headers)
    return admitted


def test_a_project_gets_the_default_burst_then_429_with_retry_after():
    gate = Gate(LocalRateLimiter(), LIMITS)
    admitted = asyncio.run(admit_times(gate, 3, "p", project(), None))
    assert [h["X-RateLimit-Remaining"] for h in admitted] == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        asyncio.run(admit_times(gate, 1, "p", project(), None))
    assert int(refused.value.headers["Retry-After"]) >= 1


def test_a_projects_own_limit_overrides_the_default():
    gate = Gate(LocalRateLimiter(), LIMITS)
    assert len(asyncio.run(admit_times(gate, 5, "p", project(rate_per_second=0.001, burst=5), None))) == 5


def test_an_access_key_has_a_bucket_of_its_own():
    gate = Gate(LocalRateLimiter(), LIMITS)
    asyncio.run(admit_times(gate, 3, "p1", None, "AK1"))
    with pytest.raises(RateLimited):  # another project, the same key: the key's bucket is empty
        asyncio.run(admit_times(gate, 1, "p2", None, "AK1"))


def test_the_concurrency_cap_holds_for_the_whole_request():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> None:
        async with gate.admit("p", None, None):
            with pytest.raises(RateLimited):
                async with gate.admit("p", None, None):
                    pass
        async with gate.admit("p", None, None):  # released with the first request
            pass

    asyncio.run(main())


def test_password_attempts_are_limited_per_user_and_per_address():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> None:
        for _ in range(2):
            await gate.check_login("acme/alice", "10.0.0.1")
        with pytest.raises(RateLimited):
            await gate.check_login("acme/alice", "10.0.0.2")
        for user in ("bob", "carol", "dave", "erin", "frank"):  # an address gets 5x a user's budget
            for _ in range(2):
                await gate.check_login(f"acme/{user}", "10.0.0.9")
        with pytest.raises(RateLimited):
            await gate.check_login("acme/grace", "10.0.0.9")

    asyncio.run(main())
