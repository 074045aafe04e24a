"""Finding 1 (HIGH): privilege escalation through ``users:admin``.

A user whose only permission was ``users:admin`` could make himself admin, create admin
users, create roles holding ``realms:admin``, take over the ``admin`` account's password and,
in a tenant realm, grant himself what key export needs. Now nobody hands out (or acts on an
account holding) a permission he lacks, and realm administration is for master admins.

The matrix runs every identity-admin endpoint, over HTTP and as the matching ``qauth
--server`` command, for four callers, against a live server with real tokens, and asserts
exactly which cells are served and which are refused (and how).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, password_login, serving, unique, with_identity

from qimem.app import AppContext
from qimem.cli.qauth import qauth
from qimem.errors import ForbiddenError
from qimem.services import identity as ids

PW = "steady-copper-orchard-7"  # every test user's password (passes the policy)
CALLERS = ("helpdesk", "key_manager", "realm_admin", "master_admin")


@dataclass
class World:
    url: str
    app: AppContext
    tokens: dict[str, str] = field(default_factory=dict)

    def user(self, *roles: str, realm: str = "acme") -> str:
        """A fresh account holding ``roles`` (made by the local operator)."""
        name = unique("t")
        ids.add_user(self.app, realm, name, PW, list(roles))
        return name

    def http(self, who: str, method: str, path: str, body: object = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return requests.request(method, self.url + path, json=body, headers=headers, timeout=10)

    def cli(self, who: str, *args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
        argv = ["--server", self.url, "--token", self.tokens[who], *args]
        return CliRunner().invoke(qauth, argv, input=stdin, catch_exceptions=False)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    app = with_identity(make_app("memory://", None))
    for realm in ("acme", "beta"):
        ids.create_realm(app, realm)
    for realm in ("master", "acme"):
        ids.create_role(app, realm, "helpdesk", ["users:admin"], "resets passwords")
    ids.add_user(app, "master", "mhelp", PW, ["helpdesk"])
    ids.add_user(app, "acme", "helpdesk", PW, ["helpdesk"])
    ids.add_user(app, "acme", "keymgr", PW, ["key-manager"])
    ids.add_user(app, "acme", "boss", PW, ["admin"])
    ids.add_user(app, "acme", "scoped", PW, ["helpdesk"])
    ids.grant_role(app, "acme", "scoped", "encryptor", "payroll-eu-*")
    ids.add_user(app, "beta", "intruder", PW, ["admin"])
    with serving(app) as url:
        w = World(url, app)
        for who, realm, name, password in (
            ("master_admin", "master", "admin", ADMIN_PASSWORD),
            ("mhelp", "master", "mhelp", PW),
            ("helpdesk", "acme", "helpdesk", PW),
            ("key_manager", "acme", "keymgr", PW),
            ("realm_admin", "acme", "boss", PW),
            ("scoped", "acme", "scoped", PW),
            ("intruder", "beta", "intruder", PW),
        ):
            w.tokens[who] = password_login(app, realm, name, password).access_token
        yield w
    ids.close_identity(app)
    app.close()


# -- the matrix ------------------------------------------------------------------------

OK, DENIED, ESCALATION, NOT_FOUND = "ok", "forbidden", "escalation_denied", "not_found"
_HTTP = {DENIED: (403, "forbidden"), ESCALATION: (403, "escalation_denied")}
_EXIT = {OK: 0, DENIED: 4, ESCALATION: 4, NOT_FOUND: 5}

# (HTTP method, path, body) and the qauth argv (and stdin) of one attempt, from fresh targets.
Request = tuple[str, str, object]
Attempt = Callable[[World], tuple[Request, list[str], str | None]]


@dataclass(frozen=True)
class Case:
    name: str
    attempt: Attempt
    expect: dict[str, str]  # caller -> outcome; a caller left out is not run

    def __str__(self) -> str:
        return self.name


def _who(ok: tuple[str, ...], refused: str = ESCALATION, **others: str) -> dict[str, str]:
    """``ok`` callers are served; the helpdesk gets ``refused``; the key manager (no
    users:admin) is plainly forbidden, unless ``others`` say otherwise."""
    table = {c: (OK if c in ok else refused) for c in CALLERS}
    table["key_manager"] = DENIED
    table.update(others)
    return table


ADMINS = ("realm_admin", "master_admin")
USER_ADMINS = ("helpdesk", *ADMINS)
A = "/v1/auth/realms"


def _new_realm(w: World) -> tuple[Request, list[str], str | None]:
    name = unique("r")
    return ("POST", A, {"name": name}), ["realm", "create", name], None


def _delete_realm(w: World) -> tuple[Request, list[str], str | None]:
    victim = unique("victim")
    ids.create_realm(w.app, victim)
    return ("DELETE", f"{A}/{victim}", None), ["realm", "delete", victim, "--yes"], None


def _add_user(*roles: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        name = unique("new")
        argv = ["user", "add", "--realm", "acme", name, "--password-stdin"]
        for role in roles:
            argv += ["--role", role]
        body = {"username": name, "password": PW, "roles": list(roles)}
        return ("POST", f"{A}/acme/users", body), argv, PW + "\n"

    return attempt


def _passwd(*target_roles: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        target = w.user(*target_roles)
        argv = ["user", "passwd", "--realm", "acme", target, "--password-stdin"]
        body = {"password": "fresh-walnut-signal-3"}
        return ("PATCH", f"{A}/acme/users/{target}", body), argv, "fresh-walnut-signal-3\n"

    return attempt


def _enabled(enabled: bool, *target_roles: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        target = w.user(*target_roles)
        verb = "enable" if enabled else "disable"
        body = {"enabled": enabled}
        return (
            ("PATCH", f"{A}/acme/users/{target}", body),
            ["user", verb, "--realm", "acme", target],
            None,
        )

    return attempt


def _grant(role: str, *target_roles: str, scope: str | None = None) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        target = w.user(*target_roles)
        argv = ["role", "grant", "--realm", "acme", target, role]
        argv += ["--scope", scope] if scope else []
        body = {"role": role, "scope": scope}
        return ("POST", f"{A}/acme/users/{target}/roles", body), argv, None

    return attempt


def _revoke(role: str, *target_roles: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        target = w.user(role, *target_roles)
        body = {"role": role}
        argv = ["role", "revoke", "--realm", "acme", target, role]
        return ("DELETE", f"{A}/acme/users/{target}/roles", body), argv, None

    return attempt


def _new_role(*perms: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        name = unique("role")
        argv = ["role", "create", "--realm", "acme", name]
        for perm in perms:
            argv += ["-p", perm]
        body = {"name": name, "permissions": list(perms)}
        return ("POST", f"{A}/acme/roles", body), argv, None

    return attempt


def _new_client(*roles: str) -> Attempt:
    def attempt(w: World) -> tuple[Request, list[str], str | None]:
        name = unique("svc")
        argv = ["client", "create", "--realm", "acme", name]
        for role in roles:
            argv += ["--role", role]
        return ("POST", f"{A}/acme/clients", {"client_id": name, "roles": list(roles)}), argv, None

    return attempt


def _fixed(method: str, path: str, argv: list[str]) -> Attempt:
    return lambda w: ((method, path, None), argv, None)


MATRIX = [
    # realm administration: master admins only; another realm does not exist for a tenant
    Case("realm list", _fixed("GET", A, ["realm", "list"]), _who(("master_admin",), DENIED)),
    Case("realm create", _new_realm, _who(("master_admin",), DENIED)),
    Case("realm delete", _delete_realm, _who(("master_admin",), NOT_FOUND, key_manager=NOT_FOUND)),
    Case(
        "realm delete own realm",
        _fixed("DELETE", f"{A}/acme", ["realm", "delete", "acme", "--yes"]),
        {"helpdesk": DENIED, "key_manager": DENIED, "realm_admin": DENIED},
    ),
    Case(
        "signing key rotate",
        _fixed("POST", f"{A}/acme/signing-key/rotate", ["rotate-signing-key", "--realm", "acme"]),
        _who(ADMINS, DENIED),
    ),
    Case(
        "audit read",
        _fixed("GET", f"{A}/acme/audit", ["audit", "--realm", "acme"]),
        _who(ADMINS, DENIED),
    ),
    # users
    Case(
        "user list",
        _fixed("GET", f"{A}/acme/users", ["user", "list", "--realm", "acme"]),
        _who(USER_ADMINS),
    ),
    Case("user add without roles", _add_user(), _who(USER_ADMINS)),
    Case("user add with a role the caller holds", _add_user("helpdesk"), _who(USER_ADMINS)),
    Case("user add as admin", _add_user("admin"), _who(ADMINS)),
    Case("user add as encryptor", _add_user("encryptor"), _who(ADMINS)),
    Case("passwd of a peer", _passwd("helpdesk"), _who(USER_ADMINS)),
    Case("passwd of a user without roles", _passwd(), _who(USER_ADMINS)),
    Case("passwd of an admin", _passwd("admin"), _who(ADMINS)),
    Case("passwd of an encryptor", _passwd("encryptor"), _who(ADMINS)),
    Case("disable a peer", _enabled(False, "helpdesk"), _who(USER_ADMINS)),
    Case("disable an admin", _enabled(False, "admin"), _who(ADMINS)),
    Case("enable an auditor", _enabled(True, "auditor"), _who(ADMINS)),
    # grants
    Case("grant a held role", _grant("helpdesk"), _who(USER_ADMINS)),
    Case("grant admin", _grant("admin"), _who(ADMINS)),
    Case("grant encryptor", _grant("encryptor"), _who(ADMINS)),
    Case("grant encryptor scoped", _grant("encryptor", scope="payroll-*"), _who(ADMINS)),
    Case("grant a held role to a stronger user", _grant("helpdesk", "auditor"), _who(ADMINS)),
    Case("revoke a held role", _revoke("helpdesk"), _who(USER_ADMINS)),
    Case("revoke admin", _revoke("admin"), _who(ADMINS)),
    Case("revoke a held role from a stronger user", _revoke("helpdesk", "admin"), _who(ADMINS)),
    # roles
    Case(
        "role list",
        _fixed("GET", f"{A}/acme/roles", ["role", "list", "--realm", "acme"]),
        _who(USER_ADMINS),
    ),
    Case("role create of held permissions", _new_role("users:admin"), _who(USER_ADMINS)),
    Case("role create with keys:read", _new_role("keys:read"), _who(ADMINS)),
    Case("role create with realms:admin", _new_role("users:admin", "realms:admin"), _who(ADMINS)),
    # service accounts
    Case("client create without roles", _new_client(), _who(USER_ADMINS)),
    Case("client create with a held role", _new_client("helpdesk"), _who(USER_ADMINS)),
    Case("client create as encryptor", _new_client("encryptor"), _who(ADMINS)),
    Case("client create as admin", _new_client("admin"), _who(ADMINS)),
]

CELLS = [(case, who) for case in MATRIX for who in CALLERS if who in case.expect]


@pytest.mark.parametrize(("case", "who"), CELLS, ids=lambda v: str(v).replace(" ", "-"))
def test_finding1_matrix_http(world: World, case: Case, who: str) -> None:
    (method, path, body), _, _ = case.attempt(world)
    response = world.http(who, method, path, body)
    expected = case.expect[who]
    if expected == OK:
        assert response.status_code < 300, (response.status_code, response.text)
    elif expected == NOT_FOUND:
        assert response.status_code == 404, (response.status_code, response.text)
    else:
        status, code = _HTTP[expected]
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
            response.text
        )


@pytest.mark.parametrize(("case", "who"), CELLS, ids=lambda v: str(v).replace(" ", "-"))
def test_finding1_matrix_qauth_server(world: World, case: Case, who: str) -> None:
    _, argv, stdin = case.attempt(world)
    result = world.cli(who, *argv, stdin=stdin)
    expected = case.expect[who]
    assert result.exit_code == _EXIT[expected], (result.exit_code, result.output, result.stderr)
    if expected == ESCALATION:
        assert "no escalation" in result.stderr and "which you do not hold" in result.stderr


def test_finding1_introspect_needs_only_a_token(world: World) -> None:
    for who in CALLERS:
        response = world.http(who, "POST", f"{A}/acme/introspect", {"token": "x" * 20})
        assert response.status_code == 200 and response.json() == {"active": False}


# -- the concrete attacks ------------------------------------------------------------------


def _roles_of(world: World, realm: str, username: str) -> list[str]:
    return ids.identity(world.app).get_user(realm, username).roles


def test_finding1_helpdesk_cannot_assign_admin_role_to_himself(world: World) -> None:
    response = world.http("mhelp", "POST", f"{A}/master/users/mhelp/roles", {"role": "admin"})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "escalation_denied"
    assert "role 'admin'" in error["message"] and "which you do not hold" in error["message"]
    assert _roles_of(world, "master", "mhelp") == ["helpdesk"]
    fresh = password_login(world.app, "master", "mhelp", PW).access_token
    assert ids.authenticate(world.app, fresh).roles == ("helpdesk",)
    denied = ids.audit_events(world.app, "master", action="role.grant", actor="mhelp@master")
    assert denied and denied[0].outcome == "denied" and denied[0].target == "mhelp"


def test_finding1_helpdesk_cannot_create_admin_user(world: World) -> None:
    body = {"username": "sleeper", "password": PW, "roles": ["admin"]}
    response = world.http("mhelp", "POST", f"{A}/master/users", body)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "escalation_denied")
    assert "sleeper" not in [u.username for u in ids.list_users(world.app, "master")]


def test_finding1_helpdesk_cannot_create_role_holding_realms_admin(world: World) -> None:
    body = {"name": "backdoor", "permissions": ["users:admin", "realms:admin"]}
    response = world.http("mhelp", "POST", f"{A}/master/roles", body)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "escalation_denied")
    assert "realms:admin" in response.json()["error"]["message"]
    assert "backdoor" not in [r.name for r in ids.list_roles(world.app, "master")]


def test_finding1_helpdesk_cannot_take_over_the_admin_account(world: World) -> None:
    stolen = "mine-now-crimson-lake"
    response = world.http("mhelp", "PATCH", f"{A}/master/users/admin", {"password": stolen})
    assert (response.status_code, response.json()["error"]["code"]) == (403, "escalation_denied")
    assert "'admin' holds" in response.json()["error"]["message"]
    login = requests.post(
        f"{world.url}{A}/master/token",
        data={"grant_type": "password", "username": "admin", "password": stolen},
        timeout=10,
    )
    assert login.status_code == 401
    assert password_login(world.app, "master", "admin", ADMIN_PASSWORD).access_token
    for attempt in ({"enabled": False}, {"enabled": True, "password": stolen}):
        response = world.http("mhelp", "PATCH", f"{A}/master/users/admin", attempt)
        assert response.status_code == 403, response.text
    response = world.http("mhelp", "DELETE", f"{A}/master/users/admin/roles", {"role": "admin"})
    assert response.status_code == 403 and _roles_of(world, "master", "admin") == ["admin"]
    assert ids.identity(world.app).get_user("master", "admin").enabled


def test_finding1_tenant_helpdesk_cannot_grant_himself_key_export(world: World) -> None:
    """Export needs realms:admin in the realm: neither the admin role nor a role of his own
    making gets him there, nor a service account holding it."""
    me = f"{A}/acme/users/helpdesk"
    assert world.http("helpdesk", "POST", me + "/roles", {"role": "admin"}).status_code == 403
    made = world.http(
        "helpdesk", "POST", f"{A}/acme/roles", {"name": "exporter", "permissions": ["realms:admin"]}
    )
    assert made.status_code == 403
    client = world.http(
        "helpdesk", "POST", f"{A}/acme/clients", {"client_id": "x", "roles": ["admin"]}
    )
    assert client.status_code == 403
    assert _roles_of(world, "acme", "helpdesk") == ["helpdesk"]
    key = ids.identity(world.app)  # the key export endpoint still refuses his fresh token
    fresh = password_login(world.app, "acme", "helpdesk", PW).access_token
    assert not key.authenticate(fresh).allows("realms:admin")


def test_finding1_scoped_grants_are_no_wider_than_the_callers(world: World) -> None:
    """``scoped`` holds encryptor on payroll-eu-* (and users:admin)."""

    def grant(scope: str | None) -> int:
        target = world.user()
        body = {"role": "encryptor", "scope": scope}
        return world.http("scoped", "POST", f"{A}/acme/users/{target}/roles", body).status_code

    assert grant("payroll-*") == 403  # wider
    assert grant(None) == 403  # every key
    assert grant("*") == 403
    assert grant("payroll-us-*") == 403  # beside
    assert grant("payroll-e*") == 403
    assert grant("payroll-eu-*") == 200  # the same
    assert grant("payroll-eu-fr-*") == 200  # narrower
    assert grant("payroll-eu-2026") == 200  # one key
    target = world.user()
    ids.grant_role(world.app, "acme", target, "encryptor", "payroll-eu-*")
    response = world.http("scoped", "PATCH", f"{A}/acme/users/{target}", {"enabled": False})
    assert response.status_code == 200  # a peer holding no more than him
    ids.grant_role(world.app, "acme", target, "encryptor", "payroll-us-*")
    response = world.http("scoped", "PATCH", f"{A}/acme/users/{target}", {"enabled": True})
    assert response.status_code == 403 and "payroll-eu-*" in response.json()["error"]["message"]


def test_finding1_scope_inclusion_is_conservative() -> None:
    from qimem.identity.escalation import scope_covered

    assert scope_covered({""}, "") and scope_covered({""}, "payroll-*")
    assert scope_covered({"payroll-*"}, "payroll-eu-[ab]*")
    assert scope_covered({"pay*"}, "payroll")
    assert scope_covered({"payroll-?"}, "payroll-1")
    assert not scope_covered({"payroll-*"}, "")
    assert not scope_covered({"payroll-?"}, "payroll-*")  # '*' matched by '?' as text
    assert not scope_covered({"a*!b*"}, "a[!b]")  # a bracket spanning the held literal
    assert not scope_covered({"a*b*"}, "a[b-d]")
    assert not scope_covered({"payroll-*"}, "payroll*")


def test_finding1_cross_realm_admins_touch_only_their_realm(world: World) -> None:
    boss_in_master = [
        ("GET", f"{A}/master/users", None),
        ("POST", f"{A}/master/users/boss/roles", {"role": "admin"}),
        ("POST", f"{A}/master/users/admin/roles", {"role": "auditor"}),
        ("PATCH", f"{A}/master/users/admin", {"password": "mine-now-crimson-lake"}),
        ("POST", f"{A}/master/users", {"username": "x", "password": PW, "roles": ["admin"]}),
        ("POST", f"{A}/master/roles", {"name": "x", "permissions": ["keys:read"]}),
        ("POST", f"{A}/master/clients", {"client_id": "x"}),
        ("POST", f"{A}/master/signing-key/rotate", None),
        ("GET", f"{A}/master/audit", None),
        ("DELETE", f"{A}/master", None),
    ]
    for method, path, body in boss_in_master:
        response = world.http("realm_admin", method, path, body)
        assert response.status_code == 404, (path, response.text)
        other = path.replace("/master", "/beta")
        assert world.http("realm_admin", method, other, body).status_code == 404, other
        acme = path.replace("/master", "/acme")
        assert world.http("intruder", method, acme, body).status_code == 404, acme
        assert world.http("mhelp", method, acme, body).status_code == 404, acme
    assert ids.identity(world.app).get_user("master", "admin").roles == ["admin"]
    # The Python API refuses the same, with the caller's principal.
    boss = ids.authenticate(world.app, world.tokens["realm_admin"])
    with pytest.raises(Exception) as caught:
        ids.grant_role(world.app, "master", "boss", "admin", principal=boss)
    assert getattr(caught.value, "code", None) == "realm_not_found"


def test_finding1_python_api_checks_the_principal(world: World) -> None:
    helpdesk = ids.authenticate(world.app, world.tokens["helpdesk"])
    target = world.user()
    with pytest.raises(ForbiddenError) as caught:
        ids.grant_role(world.app, "acme", target, "admin", principal=helpdesk)
    assert caught.value.code == "escalation_denied" and caught.value.http_status == 403
    assert caught.value.exit_code == 4
    with pytest.raises(ForbiddenError):
        ids.create_realm(world.app, unique("r"), principal=helpdesk)
    with pytest.raises(ForbiddenError):
        ids.add_user(world.app, "acme", unique("u"), PW, ["auditor"], principal=helpdesk)
    ids.grant_role(world.app, "acme", target, "helpdesk", principal=helpdesk)
    # Without a principal: the local operator (root key and database), who may do anything.
    assert ids.grant_role(world.app, "acme", target, "admin")
    assert _roles_of(world, "acme", target) == ["admin", "helpdesk"]
