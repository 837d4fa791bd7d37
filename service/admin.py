"""`imagetag admin`: accounts, users, projects, access keys and rate limits, on the configured
store (the embedded SQLite file, or Redis when IMAGETAG_REDIS_URL is set)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from service.identity import IdentityError, IdentityStore
from service.settings import ConfigurationError, Settings

DEV_DOMAIN, DEV_USER, DEV_PROJECT = "dev", "dev", "cn-north-4"

Action = Callable[[IdentityStore, argparse.Namespace, Settings], Awaitable[int]]


def add_commands(commands: argparse._SubParsersAction) -> None:
    admin = commands.add_parser(
        "admin", help="manage accounts, users, projects and access keys",
        description="Manage identities in the configured store: the embedded SQLite file under "
        "IMAGETAG_DATA_DIR, or Redis when IMAGETAG_REDIS_URL is set (then with IMAGETAG_MASTER_KEY).",
    )
    nouns = admin.add_subparsers(required=True, metavar="WHAT")

    def action(parent, name: str, run: Action, help: str, *arguments: tuple[tuple, dict]):
        parser = parent.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        for args, kwargs in arguments:
            parser.add_argument(*args, **kwargs)
        parser.set_defaults(run=lambda a, s: _run(run, a, s))

    domain = (("--domain",), {"required": True, "help": "account (domain) name"})
    user = (("--user",), {"required": True, "help": "user name"})
    ak = (("ak",), {"help": "the access key's id (AK)"})

    accounts = nouns.add_parser("accounts", help="accounts (domains)").add_subparsers(required=True, metavar="ACTION")
    action(accounts, "create", _create_account, "create an account", (("name",), {"help": "the account's name"}))
    action(accounts, "list", _list_accounts, "list accounts")

    users = nouns.add_parser("users", help="users of an account").add_subparsers(required=True, metavar="ACTION")
    action(users, "create", _create_user, "create a user (asks for the password, or generates one)",
           (("name",), {"help": "the user's name"}), domain,
           (("--password",), {"help": "use this password instead of asking (default: ask, or generate one "
                                      "when not on a terminal)"}))
    action(users, "list", _list_users, "list an account's users", domain)

    projects = nouns.add_parser("projects", help="projects of an account").add_subparsers(required=True, metavar="ACTION")
    action(projects, "create", _create_project, "create a project (named after a region, e.g. cn-north-4)",
           (("name",), {"help": "the project's name, a region"}), domain)
    action(projects, "list", _list_projects, "list an account's projects", domain)
    action(projects, "set-rate-limit", _set_rate_limit, "override the project's rate limit (omit both to reset)",
           (("project_id",), {"help": "the project's id (`imagetag admin projects list`)"}),
           (("--rate",), {"type": float, "help": "requests per second (default: IMAGETAG_RATE_LIMIT_PER_S)"}),
           (("--burst",), {"type": int, "help": "bucket size (default: IMAGETAG_RATE_LIMIT_BURST)"}))

    keys = nouns.add_parser("keys", help="access keys (AK/SK)").add_subparsers(required=True, metavar="ACTION")
    action(keys, "create", _create_key, "issue an AK/SK; the SK is printed once", domain, user,
           (("--description",), {"default": "", "help": "a note kept with the key (default: none)"}))
    action(keys, "list", _list_keys, "list a user's access keys", domain, user)
    action(keys, "disable", _set_key(False), "disable an access key", ak)
    action(keys, "enable", _set_key(True), "enable an access key again", ak)
    action(keys, "delete", _delete_key, "delete an access key", ak)

    tokens = nouns.add_parser("tokens", help="IAM tokens").add_subparsers(required=True, metavar="ACTION")
    action(tokens, "revoke", _revoke_token, "revoke a token (every gateway refuses it at once)", (("token",), {"help": "the token, as sent in X-Auth-Token"}))

    action(nouns, "dev-credentials", _dev_credentials,
           "create (or reuse) a development account, user, password, project and AK/SK",
           (("--json",), {"action": "store_true", "help": "one JSON object (default: lines of text)"}))


def _run(action: Action, args: argparse.Namespace, settings: Settings) -> int:
    from service.backends import build_backends

    async def main() -> int:
        backends = build_backends(settings)
        try:
            return await action(backends.store, args, settings)
        finally:
            await backends.close()

    try:
        return asyncio.run(main())
    except (IdentityError, ConfigurationError) as error:
        print(f"imagetag admin: {error}", file=sys.stderr)
        return 1


def _table(rows: list[tuple]) -> int:
    for row in rows:
        print("\t".join(str(cell) for cell in row))
    return 0


async def _domain_id(store: IdentityStore, name: str) -> str:
    domain = await store.find_domain(name)
    if domain is None:
        raise IdentityError(f"no account named {name!r}")
    return domain.id


async def _user_id(store: IdentityStore, domain: str, name: str) -> str:
    user = await store.find_user(await _domain_id(store, domain), name)
    if user is None:
        raise IdentityError(f"no user {name!r} in account {domain!r}")
    return user.id


async def _create_account(store, args, settings) -> int:
    domain = await store.create_domain(args.name)
    return _table([(domain.id, domain.name)])


async def _list_accounts(store, args, settings) -> int:
    return _table([(d.id, d.name) for d in await store.list_domains()])


async def _create_user(store, args, settings) -> int:
    password = args.password
    generated = False
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.name}: ")
        else:
            password, generated = secrets.token_urlsafe(18), True
    user = await store.create_user(await _domain_id(store, args.domain), args.name, password)
    _table([(user.id, user.name)])
    if generated:
        print(f"password (shown once): {password}")
    return 0


async def _list_users(store, args, settings) -> int:
    users = await store.list_users(await _domain_id(store, args.domain))
    return _table([(u.id, u.name, "enabled" if u.enabled else "disabled") for u in users])


async def _create_project(store, args, settings) -> int:
    project = await store.create_project(await _domain_id(store, args.domain), args.name)
    return _table([(project.id, project.name)])


async def _list_projects(store, args, settings) -> int:
    projects = await store.list_projects(await _domain_id(store, args.domain))
    return _table([(p.id, p.name, _limit(p.rate_per_second, p.burst, settings)) for p in projects])


def _limit(rate: float | None, burst: int | None, settings: Settings) -> str:
    if rate is None and burst is None:
        return f"default ({settings.rate_limit_per_s:g}/s, burst {settings.rate_limit_burst})"
    return f"{rate or settings.rate_limit_per_s:g}/s, burst {burst or settings.rate_limit_burst}"


async def _set_rate_limit(store, args, settings) -> int:
    project = await store.set_project_rate_limit(args.project_id, args.rate, args.burst)
    return _table([(project.id, project.name, _limit(project.rate_per_second, project.burst, settings))])


async def _create_key(store, args, settings) -> int:
    key, secret = await store.create_access_key(await _user_id(store, args.domain, args.user), args.description)
    print(f"AK: {key.ak}\nSK: {secret}\n(the SK is shown this once; store it now)")
    return 0


async def _list_keys(store, args, settings) -> int:
    keys = await store.list_access_keys(await _user_id(store, args.domain, args.user))
    return _table([(k.ak, "enabled" if k.enabled else "disabled", k.created_at.isoformat(), k.description) for k in keys])


def _set_key(enabled: bool) -> Action:
    async def run(store, args, settings) -> int:
        await store.set_access_key_enabled(args.ak, enabled)
        return _table([(args.ak, "enabled" if enabled else "disabled")])

    return run


async def _delete_key(store, args, settings) -> int:
    if not await store.delete_access_key(args.ak):
        raise IdentityError(f"no access key {args.ak}")
    return _table([(args.ak, "deleted")])


async def _revoke_token(store, args, settings) -> int:
    if not await store.revoke_token(args.token):
        raise IdentityError("no such valid token")
    print("revoked")
    return 0


async def _dev_credentials(store, args, settings) -> int:
    credentials = await dev_credentials(store, settings.data_dir / "dev-credentials.json")
    if args.json:
        print(json.dumps(credentials))
    else:
        _table(list(credentials.items()))
    return 0


async def dev_credentials(store: IdentityStore, saved: Path) -> dict[str, str]:
    """A development identity. The store keeps only hashes and sealed secrets, so the plain
    password and SK are kept in a file readable by its owner only, and reused while they work."""
    if saved.exists():
        credentials = json.loads(saved.read_text())
        if await _still_valid(store, credentials):
            return credentials
    domain = await store.find_domain(DEV_DOMAIN) or await store.create_domain(DEV_DOMAIN)
    password = secrets.token_urlsafe(18)
    user = await store.find_user(domain.id, DEV_USER)
    if user is not None:
        raise IdentityError(
            f"user {DEV_USER!r} of account {DEV_DOMAIN!r} exists but {saved} is missing or stale; "
            "delete the account's data or use `imagetag admin keys create`"
        )
    user = await store.create_user(domain.id, DEV_USER, password)
    project = await store.find_project(domain.id, DEV_PROJECT) or await store.create_project(domain.id, DEV_PROJECT)
    key, secret = await store.create_access_key(user.id, "development credentials")
    credentials = {
        "domain": domain.name, "user": user.name, "password": password,
        "project_id": project.id, "project_name": project.name, "ak": key.ak, "sk": secret,
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.touch(mode=0o600)
    saved.write_text(json.dumps(credentials, indent=2) + "\n")
    return credentials


async def _still_valid(store: IdentityStore, credentials: dict[str, str]) -> bool:
    user = await store.authenticate(credentials["domain"], credentials["user"], credentials["password"])
    return user is not None and await store.secret_for(credentials["ak"]) == credentials["sk"]
