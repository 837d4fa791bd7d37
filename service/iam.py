"""The IAM use cases clients rely on: password login for a project token, project discovery."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from service.auth.authenticator import Principal
from service.errors import InvalidCredentials, ProjectForbidden
from service.gate import Gate
from service.identity.models import Domain, Project, TokenRecord, User
from service.identity.store import IdentityStore
from service.protocol import iam as wire

ROLE = wire.Role(id="imagetag-tagging-user", name="image_tagging_user")


def iam_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class IamService:
    def __init__(self, store: IdentityStore, gate: Gate, token_ttl: timedelta) -> None:
        self.store = store
        self.gate = gate
        self.token_ttl = token_ttl

    async def login(
        self, request: wire.TokenRequest, *, client_host: str | None, with_catalog: bool, base_url: str
    ) -> tuple[str, wire.TokenResponse]:
        credentials = request.auth.identity.password.user
        domain = await self._domain(credentials.domain)
        domain_name = domain.name if domain else (credentials.domain.name or "")
        async with self.gate.password_attempt(f"{domain_name}/{credentials.name}", client_host):
            # Unknown accounts go through the same slow password check, so timing tells nothing.
            user = await self.store.authenticate(domain_name, credentials.name, credentials.password)
            if user is None or domain is None:
                raise InvalidCredentials("the account, user name or password is wrong")
        project = await self._project(domain, request.auth.scope.project)
        token, record = await self.store.issue_token(user.id, project.id, self.token_ttl)
        return token, wire.TokenResponse(token=_token(record, user, domain, project, with_catalog, base_url))

    async def revoke(self, principal: Principal, token: str) -> None:
        """Revokes a token of the caller's own account (any replica stops accepting it at once)."""
        record = await self.store.validate_token(token)
        if record is None or record.domain_id != principal.domain_id:
            raise InvalidCredentials("X-Subject-Token is not a valid token of this account")
        await self.store.revoke_token(token)

    async def projects(self, principal: Principal, name: str | None) -> wire.ProjectList:
        projects = await self.store.list_projects(principal.domain_id)
        return wire.ProjectList(
            projects=[
                wire.Project(id=p.id, name=p.name, domain_id=p.domain_id)
                for p in projects
                if name is None or p.name == name
            ]
        )

    async def _domain(self, ref: wire.NamedRef) -> Domain | None:
        if ref.id:
            return await self.store.get_domain(ref.id)
        return await self.store.find_domain(ref.name or "")

    async def _project(self, domain: Domain, ref: wire.NamedRef) -> Project:
        if ref.id:
            project = await self.store.get_project(ref.id)
            if project is not None and project.domain_id == domain.id:
                return project
        elif ref.name and (project := await self.store.find_project(domain.id, ref.name)):
            return project
        raise ProjectForbidden(f"account {domain.name} has no project {ref.id or ref.name}")


def _token(
    record: TokenRecord, user: User, domain: Domain, project: Project, with_catalog: bool, base_url: str
) -> wire.Token:
    domain_ref = wire.DomainRef(id=domain.id, name=domain.name)
    catalog = None
    if with_catalog:
        endpoint = wire.Endpoint(
            id=uuid.uuid5(uuid.NAMESPACE_URL, base_url).hex, region=project.name, region_id=project.name, url=base_url
        )
        catalog = [wire.CatalogEntry(id="image", name="image", type="image", endpoints=[endpoint])]
    return wire.Token(
        expires_at=iam_time(record.expires_at),
        issued_at=iam_time(record.issued_at),
        methods=["password"],
        user=wire.UserRef(id=user.id, name=user.name, domain=domain_ref),
        project=wire.ProjectRef(id=project.id, name=project.name, domain=domain_ref),
        roles=[ROLE],
        catalog=catalog,
    )
