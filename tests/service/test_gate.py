"""Admission: which buckets a request draws on, the concurrency cap, and the login limits."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from service.errors import InvalidCredentials, RateLimited
from service.gate import Gate, Limits
from service.identity.models import Project
from service.ratelimit import LocalRateLimiter

LIMITS = Limits(rate_per_s=0.001, burst=3, max_concurrent_per_project=1, login_per_minute=2,
                login_failures_per_hour=6, max_concurrent_downloads_per_project=2)


def project(**overrides) -> Project:
    return Project("p" * 32, "d" * 32, "cn-north-4", datetime.now(UTC), **overrides)


async def admit_times(gate: Gate, times: int, *args) -> list[dict[str, str]]:
    admitted = []
    for _ in range(times):
        admission = await gate.admit(*args)
        async with admission.inference():
            admitted.append(admission.headers)
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


def test_the_concurrency_cap_holds_while_the_models_run():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> None:
        first, second = await gate.admit("p", None, None), await gate.admit("p", None, None)
        async with first.inference():
            with pytest.raises(RateLimited):
                async with second.inference():
                    pass
        async with second.inference():  # released with the first request's model work
            pass

    asyncio.run(main())


def test_downloads_have_a_budget_of_their_own():
    gate = Gate(LocalRateLimiter(), replace(LIMITS, burst=10))  # 2 downloads and 1 inference slot per project

    async def main() -> None:
        slow_urls = [await gate.admit("p", None, None) for _ in range(3)]
        async with slow_urls[0].download(), slow_urls[1].download():
            with pytest.raises(RateLimited):
                async with slow_urls[2].download():
                    pass
            async with (await gate.admit("p", None, None)).inference():  # the models are still free
                pass
            async with (await gate.admit("other", None, None)).download():  # a budget per project
                pass

    asyncio.run(main())


async def attempt(gate: Gate, user: str, address: str | None, *, right: bool, seconds: float = 0) -> None:
    """A login whose password check takes `seconds` and finds the password right or wrong."""
    async with gate.password_attempt(user, address):
        await asyncio.sleep(seconds)
        if not right:
            raise InvalidCredentials("the account, user name or password is wrong")


def test_password_failures_are_limited_per_user_and_address_and_per_address():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                await attempt(gate, "acme/alice", "10.0.0.1", right=False)
        with pytest.raises(RateLimited):  # this address has had its tries, even with the right password
            await attempt(gate, "acme/alice", "10.0.0.1", right=True)
        await attempt(gate, "acme/alice", "10.0.0.2", right=True)  # the user elsewhere is not locked out
        for user in ("bob", "carol", "dave", "erin", "frank"):  # an address gets 5x a user's budget
            for _ in range(2):
                with pytest.raises(InvalidCredentials):
                    await attempt(gate, f"acme/{user}", "10.0.0.9", right=False)
        with pytest.raises(RateLimited):
            await attempt(gate, "acme/grace", "10.0.0.9", right=False)

    asyncio.run(main())


def test_right_passwords_and_other_errors_are_not_failures():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> None:
        for _ in range(10):
            await attempt(gate, "acme/alice", "10.0.0.1", right=True)
        for _ in range(10):
            with pytest.raises(ConnectionError):
                async with gate.password_attempt("acme/alice", "10.0.0.1"):
                    raise ConnectionError("the store is down: nothing was learnt about the password")
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                await attempt(gate, "acme/alice", "10.0.0.1", right=False)

    asyncio.run(main())


def test_parallel_guesses_cannot_outrun_the_count():
    gate = Gate(LocalRateLimiter(), LIMITS)

    async def main() -> list[BaseException | None]:
        guesses = [attempt(gate, "acme/alice", "10.0.0.1", right=False, seconds=0.05) for _ in range(6)]
        return await asyncio.gather(*guesses, return_exceptions=True)

    outcomes = [type(outcome) for outcome in asyncio.run(main())]
    assert sorted(outcome.__name__ for outcome in outcomes) == ["InvalidCredentials"] * 2 + ["RateLimited"] * 4


def test_the_brake_stops_guessers_on_many_addresses_but_not_the_user_where_they_logged_in():
    gate = Gate(LocalRateLimiter(), LIMITS)  # 6 failures an hour from addresses new to the user

    async def main() -> None:
        await attempt(gate, "acme/alice", "10.0.0.1", right=True)  # alice's own address
        for address in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
            for _ in range(2):
                with pytest.raises(InvalidCredentials):
                    await attempt(gate, "acme/alice", address, right=False)
        with pytest.raises(RateLimited):
            await attempt(gate, "acme/alice", "10.0.1.4", right=False)
        with pytest.raises(RateLimited):  # a new address waits, right password or not
            await attempt(gate, "acme/alice", "10.0.1.5", right=True)
        await attempt(gate, "acme/alice", "10.0.0.1", right=True)
        await attempt(gate, "acme/bob", "10.0.1.4", right=True)  # other users are not braked

    asyncio.run(main())
