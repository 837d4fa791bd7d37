"""Admission: the rate limits and the concurrency cap a request passes before any model work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service.identity.models import Project
from service.ratelimit import Bucket, RateLimiter, headers, rejection


@dataclass(frozen=True)
class Limits:
    rate_per_s: float
    burst: int
    max_concurrent_per_project: int
    login_per_minute: float


class Gate:
    def __init__(self, limiter: RateLimiter, limits: Limits) -> None:
        self.limiter = limiter
        self.limits = limits

    @asynccontextmanager
    async def admit(self, project_key: str, project: Project | None, access_key: str | None) -> AsyncIterator[dict[str, str]]:
        """Holds a concurrency slot for the block; yields the X-RateLimit-* headers."""
        rate = (project.rate_per_second if project else None) or self.limits.rate_per_s
        burst = (project.burst if project else None) or self.limits.burst
        buckets = [Bucket(f"project:{project_key}", rate, burst)]
        if access_key:
            buckets.append(Bucket(f"ak:{access_key}", self.limits.rate_per_s, self.limits.burst))
        decision = await self.limiter.take(buckets)
        if not decision.allowed:
            raise rejection(decision)
        async with self.limiter.concurrency(f"project:{project_key}", self.limits.max_concurrent_per_project):
            yield headers(decision)

    async def check_login(self, user_key: str, client_host: str | None) -> None:
        """Counts a password attempt per user and per client address, against brute force."""
        rate = self.limits.login_per_minute / 60
        burst = max(1, int(self.limits.login_per_minute))
        buckets = [Bucket(f"login:user:{user_key}", rate, burst)]
        if client_host:
            buckets.append(Bucket(f"login:addr:{client_host}", rate * 5, burst * 5))
        decision = await self.limiter.take(buckets)
        if not decision.allowed:
            raise rejection(decision)
