"""Who is calling, and for which project: `X-Auth-Token` or an SDK-HMAC-SHA256 signature.

No web framework here: the route dependencies hand over an `IncomingRequest` built from the
request head, and get a `Principal` or one of the catalogue's errors back. The body is read only
for a signature whose access key is known and whose date holds, so that a caller without valid
credentials never has its body buffered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from service.auth.signing import ALGORITHM, RequestToSign, check_dated, parse_authorization, verify
from service.errors import InvalidCredentials, MissingCredentials, ProjectForbidden
from service.identity.models import Project
from service.identity.store import IdentityStore
from service.networks import IPNetwork, within


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    raw_path: str
    query: str
    headers: Mapping[str, str]
    """Lower-case names; the first value of a repeated header."""
    body_sha256: Callable[[], Awaitable[str]]
    """Reads the body (within its caps) and gives its hex SHA-256."""
    client_host: str | None


@dataclass(frozen=True)
class Principal:
    user_id: str
    domain_id: str
    project: Project | None
    access_key: str | None
    method: Literal["token", "aksk"]


class Authenticator:
    def __init__(
        self, store: IdentityStore, *, clock_skew: timedelta, trusted_proxies: tuple[IPNetwork, ...]
    ) -> None:
        self.store = store
        self.clock_skew = clock_skew
        self.trusted_proxies = trusted_proxies

    async def identify(self, request: IncomingRequest, path_project: str | None) -> Principal:
        """The caller, scoped to the project of the path, of `X-Project-Id`, or of the token."""
        principal = await self.identify_domain(request)
        wanted = path_project or request.headers.get("x-project-id")
        return await self._scoped(principal, wanted)

    async def identify_domain(self, request: IncomingRequest) -> Principal:
        """The caller, for calls that are about the account rather than one project."""
        if token := request.headers.get("x-auth-token"):
            return await self._from_token(token)
        if authorization := request.headers.get("authorization"):
            return await self._from_signature(request, authorization)
        raise MissingCredentials(
            "no credentials: send an IAM token in X-Auth-Token or sign the request with an AK/SK"
        )

    async def _from_token(self, token: str) -> Principal:
        record = await self.store.validate_token(token)
        if record is None:
            raise InvalidCredentials("the token is invalid, expired or revoked")
        project = await self.store.get_project(record.project_id)
        if project is None:
            raise InvalidCredentials("the token's project no longer exists")
        return Principal(record.user_id, record.domain_id, project, None, "token")

    async def _from_signature(self, request: IncomingRequest, authorization: str) -> Principal:
        if not authorization.startswith(ALGORITHM + " "):
            raise InvalidCredentials(f"unsupported Authorization scheme; expected {ALGORITHM}")
        parsed = parse_authorization(authorization)
        key = await self.store.get_access_key(parsed.access_key)
        # secret_for answers only for an enabled key of an enabled user.
        secret = await self.store.secret_for(parsed.access_key) if key else None
        if key is None or secret is None:
            raise InvalidCredentials("unknown or disabled access key (or its user is disabled)")
        check_dated(request.headers, parsed, now=datetime.now(UTC), max_skew=self.clock_skew)
        signed = RequestToSign(
            method=request.method,
            path=request.raw_path,
            query=request.query,
            headers=self._as_signed(request),
            body_sha256=await request.body_sha256(),
        )
        verify(secret, signed, parsed, now=datetime.now(UTC), max_skew=self.clock_skew)
        return Principal(key.user_id, key.domain_id, None, key.ak, "aksk")

    def _as_signed(self, request: IncomingRequest) -> Mapping[str, str]:
        """The headers as the client signed them: behind a trusted proxy, the original Host."""
        forwarded = request.headers.get("x-forwarded-host")
        if not forwarded or not within(request.client_host, self.trusted_proxies):
            return request.headers
        return {**request.headers, "host": forwarded.split(",")[0].strip()}

    async def _scoped(self, principal: Principal, wanted: str | None) -> Principal:
        if principal.project is not None:
            if wanted and wanted != principal.project.id:
                raise ProjectForbidden(f"the token is scoped to another project than {wanted}")
            return principal
        if wanted:
            project = await self.store.get_project(wanted)
            if project is None or project.domain_id != principal.domain_id:
                raise ProjectForbidden(f"these credentials give no access to project {wanted}")
            return replace(principal, project=project)
        projects = await self.store.list_projects(principal.domain_id)
        if len(projects) != 1:
            raise ProjectForbidden(
                "the account has several projects: name one in the path (/v2/{project_id}/...) or in X-Project-Id"
            )
        return replace(principal, project=projects[0])
