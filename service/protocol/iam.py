"""Wire models of the IAM subset that clients use (contract section 6)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.protocol.common import invalid_parameter

# A login is a few hundred bytes (names, a password of at most 1 KiB): a body this large is
# refused before it is parsed.
MAX_TOKEN_REQUEST_BYTES = 64 * 1024


class _Lenient(BaseModel):
    # IAM clients send more than we read (the SDK adds fields across versions); ignore the rest.
    model_config = ConfigDict(extra="ignore")


class NamedRef(_Lenient):
    name: str | None = None
    id: str | None = None


class PasswordUser(_Lenient):
    name: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)
    domain: NamedRef


class PasswordIdentity(_Lenient):
    user: PasswordUser


class Identity(_Lenient):
    methods: list[str]
    password: PasswordIdentity

    @model_validator(mode="after")
    def _password_method(self) -> Identity:
        if "password" not in self.methods:
            raise ValueError("only the password method is supported")
        return self


class ProjectScope(_Lenient):
    project: NamedRef

    @model_validator(mode="after")
    def _named(self) -> ProjectScope:
        if not (self.project.id or self.project.name):
            raise ValueError("scope.project needs a name or an id")
        return self


class Auth(_Lenient):
    identity: Identity
    scope: ProjectScope


class TokenRequest(_Lenient):
    auth: Auth

    @classmethod
    def parse(cls, payload: object) -> TokenRequest:
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            raise invalid_parameter(error.errors(include_url=False)) from None


class DomainRef(BaseModel):
    id: str
    name: str


class UserRef(BaseModel):
    id: str
    name: str
    domain: DomainRef


class ProjectRef(BaseModel):
    id: str
    name: str
    domain: DomainRef


class Role(BaseModel):
    id: str
    name: str


class Endpoint(BaseModel):
    id: str
    interface: Literal["public"] = "public"
    region: str
    region_id: str
    url: str


class CatalogEntry(BaseModel):
    id: str
    name: str
    type: str
    endpoints: list[Endpoint]


class Token(BaseModel):
    expires_at: str
    issued_at: str
    methods: list[str]
    user: UserRef
    project: ProjectRef
    roles: list[Role]
    catalog: list[CatalogEntry] | None = None


class TokenResponse(BaseModel):
    token: Token


class Project(BaseModel):
    id: str
    name: str
    domain_id: str
    enabled: bool = True
    is_domain: bool = False
    description: str = ""


class ProjectList(BaseModel):
    projects: list[Project]
