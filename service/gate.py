"""Admission: the rate limits and the concurrency cap a request passes before any model work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from service.errors import InvalidCredentials
from service.identity.models import Project
from service.ratelimit import Bucket, Lease, RateLimiter, RateLimiterUnavailable, headers, rejection

# How long a successful login makes its address one the user may always try from.
KNOWN_ADDRESS_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Limits:
    rate_per_s: float
    burst: int
    max_concurrent_per_project: int
    login_per_minute: float
    login_failures_per_hour: float
    max_concurrent_downloads_per_project: int


@dataclass(frozen=True)
class Admission:
    """A request past the rate limits. It holds a project's concurrency slot only while it uses
    one, so that a slow `url` download does not keep the project's other requests from the models."""

    limiter: RateLimiter
    limits: Limits
    project_key: str
    headers: dict[str, str]  # X-RateLimit-*
    buckets: list[Bucket] = field(default_factory=list)

    async def count_images(self, images: int) -> dict[str, str]:
        """A call of several images costs a token per image: takes those beyond the call's own,
        all or none (429 when the buckets hold fewer, the call's own given back); the
        X-RateLimit-* headers after it."""
        if images > 1:
            decision = await self.limiter.take(self.buckets, images - 1)
            if not decision.allowed:
                await _give_back(self.limiter, self.buckets)
                raise rejection(decision)
            self.headers.update(headers(decision))
        return self.headers

    def inference(self) -> AbstractAsyncContextManager[Lease]:
        """One of the project's `max_concurrent_per_project` slots; 429 at once when none is free."""
        return self.limiter.concurrency(f"project:{self.project_key}", self.limits.max_concurrent_per_project)

    def download(self) -> AbstractAsyncContextManager[Lease]:
        """One of the project's download slots, a budget of their own; 429 at once when none is free."""
        return self.limiter.concurrency(
            f"downloads:{self.project_key}", self.limits.max_concurrent_downloads_per_project
        )


class Gate:
    def __init__(self, limiter: RateLimiter, limits: Limits) -> None:
        self.limiter = limiter
        self.limits = limits

    async def admit(self, project_key: str, project: Project | None, access_key: str | None) -> Admission:
        """Takes the request's tokens from the rate limits; 429 when a bucket is empty."""
        rate = (project.rate_per_second if project else None) or self.limits.rate_per_s
        burst = (project.burst if project else None) or self.limits.burst
        buckets = [Bucket(f"project:{project_key}", rate, burst)]
        if access_key:
            buckets.append(Bucket(f"ak:{access_key}", self.limits.rate_per_s, self.limits.burst))
        decision = await self.limiter.take(buckets)
        if not decision.allowed:
            raise rejection(decision)
        return Admission(self.limiter, self.limits, project_key, headers(decision), buckets)

    @asynccontextmanager
    async def password_attempt(self, user_key: str, client_host: str | None) -> AsyncIterator[None]:
        """Counts the block as a failed password attempt when it raises `InvalidCredentials`.

        Failures are limited per user and address, so a guesser locks out only its own address;
        per address (5x), against one address trying many users; and, more slowly, per user from
        addresses new to that user, against guessers on many addresses. An address the user has
        logged in from in the last 30 days skips that brake, so that nobody can lock a user out.
        The attempt is counted before the password is checked, so parallel guesses cannot outrun
        the count, and given back when the password was right.
        """
        address = client_host or "unknown"
        per_minute = self.limits.login_per_minute
        buckets = [
            _per(f"login:user-address:{user_key}|{address}", per_minute, 60),
            _per(f"login:address:{address}", 5 * per_minute, 60),
        ]
        known = f"login:known:{user_key}|{address}"
        if not await self.limiter.remembers(known):
            buckets.append(_per(f"login:user:{user_key}", self.limits.login_failures_per_hour, 3600))
        decision = await self.limiter.take(buckets)
        if not decision.allowed:
            raise rejection(decision)
        try:
            yield
        except InvalidCredentials:
            raise  # a failure: it stays counted
        except Exception:
            await _give_back(self.limiter, buckets)
            raise
        await _give_back(self.limiter, buckets)
        await self.limiter.remember(known, KNOWN_ADDRESS_TTL_S)


async def _give_back(limiter: RateLimiter, buckets: list[Bucket]) -> None:
    try:
        await limiter.refund(buckets)
    except RateLimiterUnavailable:
        pass  # logged by the limiter; the tokens stay spent, which costs the caller one try


def _per(key: str, count: float, seconds: int) -> Bucket:
    """`count` per `seconds`, all of which may come at once."""
    return Bucket(key, count / seconds, max(1, int(count)))
