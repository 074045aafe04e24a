"""The login-provider contract (issue 15, item 1): the password grant runs through the
providers registered with ``qimem_register_auth_providers``, the built-in password provider
among them, in the order a realm's configuration names; external identities map to users
and roles; refusals are uniform, lockout is shared, outages are 503; the configuration is
sealed under the root key and set only by master realm administrators.

A third-party provider is an in-process plugin here (:class:`TableAuth`, a real provider
with its own user table and an outage switch), registered exactly as a package would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from identity_helpers import (
    ADMIN_PASSWORD,
    STORES,
    add_user,
    fast_settings,
    password_login,
    password_of,
    raw_sql,
    serving,
    store_url,
)

from qimem import services
from qimem.app import AppContext
from qimem.config import Config
from qimem.errors import AuthError, ForbiddenError, ValidationError
from qimem.hooks import hookimpl
from qimem.identity.providers import (
    Authenticated,
    LoginAttempt,
    ProviderUnavailableError,
    external_marker,
)
from qimem.registry import Registry, make_plugin_manager
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

TABLE_USERS = {
    "erin": ("erin-Table-Pass-1", ["ops", "crypto"]),
    "frank": ("frank-Table-Pass-2", []),
    "gina": ("gina-Table-Pass-3", ["ops"]),
}


class TableAuth:
    """A third-party login provider: users from a table, groups and a claim; ``down``
    makes it answer 'cannot decide'."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[str] = []

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if set(options) - {"department"}:
            raise ValidationError("table: unknown option")
        return dict(options)

    def authenticate(self, attempt: LoginAttempt) -> Authenticated | None:
        self.calls.append(attempt.username)
        if self.down:
            raise ProviderUnavailableError("the table is offline")
        entry = TABLE_USERS.get(attempt.username)
        if entry is None or not attempt.password or attempt.password != entry[0]:
            return None
        claims = {"department": attempt.options.get("department", "eng")}
        return Authenticated(attempt.username, groups=tuple(entry[1]), claims=claims)


class TablePlugin:
    def __init__(self) -> None:
        self.provider = TableAuth()

    @hookimpl
    def qimem_register_auth_providers(self, register: Any) -> None:
        register("table", self.provider)


@pytest.fixture(params=STORES)
def world(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[AppContext, TableAuth, str]]:
    """An app (SQLite file or PostgreSQL) with the table plugin; realm acme with user
    'local-lou' (password) and 'erin' (a local *password* user, for the conflict test in
    realm 'clash' only)."""
    url = store_url(request, tmp_path, request.param)
    plugin = TablePlugin()
    pm = make_plugin_manager()
    pm.register(plugin, name="table-auth")
    app = AppContext(Config(store_url=url, root_key_b64=root_key_b64), pm=pm)
    ids.configure(app, fast_settings(lockout_threshold=3))
    ids.bootstrap(app, ADMIN_PASSWORD)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "local-lou", ["encryptor"])
    yield app, plugin.provider, url
    ids.close_identity(app)
    app.close()


def _chain(app: AppContext, realm: str = "acme", **mapping: Any) -> None:
    aps.set_realm_providers(
        app,
        realm,
        {
            "providers": ["password", "table"],
            "mapping": {
                "groups": {"ops": "admin", "crypto": ["encryptor"]},
                "claims": {"department": {"audit": "auditor"}},
                "default_roles": [],
                "jit_users": True,
                **mapping,
            },
        },
    )


def _roles(app: AppContext, realm: str, username: str) -> list[str]:
    return next(u.roles for u in ids.list_users(app, realm) if u.username == username)


def _refused(app: AppContext, realm: str, username: str, password: str) -> str:
    with pytest.raises(AuthError) as info:
        password_login(app, realm, username, password)
    return str(info.value)


def _last_login(app: AppContext, realm: str) -> Any:
    return ids.audit_events(app, realm, limit=1, action="login")[0]


# -- the hook is real --------------------------------------------------------------------


def test_builtin_providers_come_through_the_hook() -> None:
    pm = make_plugin_manager()
    registered = Registry(pm).auth_providers
    assert set(registered) >= {"password", "ldap"}
    owners = {impl.plugin_name for impl in pm.hook.qimem_register_auth_providers.get_hookimpls()}
    assert {"qimem.builtin_plugins.password_auth", "qimem.builtin_plugins.ldap_auth"} <= owners
    # Without the password plugin, there is no password login at all.
    bare = make_plugin_manager(
        builtins=("qimem.builtin_plugins.memory_keystore", "qimem.builtin_plugins.aes_gcm")
    )
    with AppContext(Config(store_url="memory://"), pm=bare) as app:
        ids.configure(app, fast_settings())
        ids.bootstrap(app, ADMIN_PASSWORD)
        with pytest.raises(ProviderUnavailableError):
            password_login(app, "master", "admin", ADMIN_PASSWORD)


def test_password_login_names_its_provider(world: tuple[AppContext, TableAuth, str]) -> None:
    app, table, _ = world
    password_login(app, "acme", "local-lou", password_of("local-lou"))
    assert _last_login(app, "acme").detail["provider"] == "password"
    assert table.calls == []  # the default chain is the password provider alone


# -- the chain ---------------------------------------------------------------------------


def test_external_login_maps_groups_and_claims_to_roles(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, table, _ = world
    _chain(app)
    token = password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
    principal = ids.authenticate(app, token.access_token)
    assert principal.username == "erin" and set(principal.roles) == {"admin", "encryptor"}
    assert _last_login(app, "acme").detail["provider"] == "table"
    # The local user still logs in with his password; the table is not asked for him.
    table.calls.clear()
    password_login(app, "acme", "local-lou", password_of("local-lou"))
    assert table.calls == []
    # A claim mapping and the default roles.
    _chain(app, default_roles=["encryptor"])
    aps.set_realm_providers(
        app,
        "acme",
        {
            "providers": ["table"],
            "table": {"department": "audit"},
            "mapping": {
                "claims": {"department": {"audit": "auditor"}},
                "default_roles": "encryptor",
                "jit_users": True,
            },
        },
    )
    password_login(app, "acme", "frank", TABLE_USERS["frank"][0])
    assert _roles(app, "acme", "frank") == ["auditor", "encryptor"]


def test_roles_follow_the_directory_at_each_login(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, _ = world
    _chain(app)
    first = password_login(app, "acme", "gina", TABLE_USERS["gina"][0])
    assert _roles(app, "acme", "gina") == ["admin"]
    TABLE_USERS["gina"] = (TABLE_USERS["gina"][0], [])
    try:
        password_login(app, "acme", "gina", TABLE_USERS["gina"][0])
        assert _roles(app, "acme", "gina") == []
        # The token that named the admin role stopped working when the role went.
        with pytest.raises(AuthError):
            ids.authenticate(app, first.access_token)
    finally:
        TABLE_USERS["gina"] = (TABLE_USERS["gina"][0], ["ops"])


def test_uniform_refusal_across_providers(world: tuple[AppContext, TableAuth, str]) -> None:
    app, _, _ = world
    _chain(app)
    answers = {
        _refused(app, "acme", "erin", "wrong-Table-Pass"),  # external, wrong password
        _refused(app, "acme", "local-lou", "wrong-password-x"),  # local, wrong password
        _refused(app, "acme", "nobody-at-all", "whatever-pass"),  # nobody
        _refused(app, "nope-realm", "erin", TABLE_USERS["erin"][0]),  # no such realm
    }
    assert answers == {"invalid username or password"}


def test_jit_off_refuses_an_unprovisioned_identity(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, _ = world
    _chain(app, jit_users=False)
    assert _refused(app, "acme", "erin", TABLE_USERS["erin"][0])
    assert _last_login(app, "acme").detail["reason"] == "not_provisioned"
    assert "erin" not in [u.username for u in ids.list_users(app, "acme")]
    # Provisioned by an administrator, the same identity logs in, roles from the mapping.
    aps.add_external_user(app, "acme", "erin", "table")
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
    assert _roles(app, "acme", "erin") == ["admin", "encryptor"]


def test_a_helpdesk_cannot_provision_an_identity_the_mapping_makes_admin(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    """Red team: with just-in-time users off, provisioning decides who may log in; the
    mapping gives erin (group ops) admin. A helpdesk (users:admin only) provisioning her
    would hand out admin: escalation_denied, and nothing created."""
    app, _, _ = world
    _chain(app, jit_users=False)
    ids.create_role(app, "acme", "helpdesk", ["users:admin"])
    add_user(app, "acme", "hal", ["helpdesk"])
    hal = ids.authenticate(app, password_login(app, "acme", "hal", password_of("hal")).access_token)
    with pytest.raises(ForbiddenError, match="admin"):
        aps.add_external_user(app, "acme", "erin", "table", principal=hal)
    assert "erin" not in [u.username for u in ids.list_users(app, "acme")]
    assert _refused(app, "acme", "erin", TABLE_USERS["erin"][0])
    # An administrator of the realm (who holds every mapped role) may.
    add_user(app, "acme", "ada", ["admin"])
    ada = ids.authenticate(app, password_login(app, "acme", "ada", password_of("ada")).access_token)
    aps.add_external_user(app, "acme", "erin", "table", principal=ada)
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])


def test_external_identity_never_takes_over_a_local_account(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, _ = world
    ids.create_realm(app, "clash")
    add_user(app, "clash", "erin", ["encryptor"])  # a local password user called erin
    _chain(app, "clash")
    assert _refused(app, "clash", "erin", TABLE_USERS["erin"][0])
    # the external provider is asked with a decoy, never erin's password: a wrong password
    assert _last_login(app, "clash").detail["reason"] == "bad_password"
    # ... and an external user has no password the password provider would accept.
    _chain(app)
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
    stored = raw_sql_hash(world, "acme", "erin")
    assert stored == external_marker("table")
    aps.set_realm_providers(app, "acme", {"providers": ["password"]})
    assert _refused(app, "acme", "erin", external_marker("table"))


def raw_sql_hash(world: tuple[AppContext, TableAuth, str], realm: str, username: str) -> str:
    from qimem.identity import users

    app = world[0]
    with ids.identity(app).db.begin() as conn:
        found = users.find(conn, realm, username)
    assert found is not None
    return found.secret_hash


def test_cross_realm_a_realm_without_the_provider_cannot_use_it(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, table, _ = world
    ids.create_realm(app, "plain")
    _chain(app, "acme")
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
    table.calls.clear()
    assert _refused(app, "plain", "erin", TABLE_USERS["erin"][0])
    assert table.calls == []  # realm 'plain' never asks the table


def test_outage_is_503_not_wrong_password(world: tuple[AppContext, TableAuth, str]) -> None:
    app, table, _ = world
    _chain(app)
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
    table.down = True
    for _ in range(5):  # more than the lockout threshold: outages are not failures
        with pytest.raises(ProviderUnavailableError) as info:
            password_login(app, "acme", "erin", TABLE_USERS["erin"][0])
        assert info.value.http_status == 503
    assert _last_login(app, "acme").detail["reason"] == "provider_unavailable"
    # A local user whose password is right is not held up by the table's outage, and a
    # wrong guess at his password is the counted 401, not an uncounted 503 (an oracle).
    password_login(app, "acme", "local-lou", password_of("local-lou"))
    assert _refused(app, "acme", "local-lou", "guess-guess-guess")
    assert _last_login(app, "acme").detail["reason"] == "bad_password"
    # An unknown name during the outage: 503 like any other (the table might know it).
    with pytest.raises(ProviderUnavailableError):
        password_login(app, "acme", "nobody-known", "guess-guess-guess")
    table.down = False
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])  # not locked


def test_lockout_is_shared_across_providers(world: tuple[AppContext, TableAuth, str]) -> None:
    app, table, _ = world
    _chain(app)
    password_login(app, "acme", "erin", TABLE_USERS["erin"][0])  # JIT: erin has a row now
    for _ in range(3):  # threshold 3: both providers refuse each guess, one failure each
        _refused(app, "acme", "erin", "guess-guess-guess")
    table.calls.clear()
    assert _refused(app, "acme", "erin", TABLE_USERS["erin"][0])  # locked: right password
    assert table.calls == []  # ... and the external provider is not even asked
    assert _last_login(app, "acme").detail["reason"] == "locked"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"providers": []}, "non-empty list"),
        ({"providers": ["password", "password"]}, "twice"),
        ({"providers": ["nosuch"]}, "no login provider 'nosuch'"),
        ({"providers": ["password"], "table": {}}, "not in 'providers'"),
        ({"providers": ["table"], "table": {"evil": 1}}, "unknown option"),
        ({"providers": ["password"], "mapping": {"groups": {"g": "no-such-role"}}}, "no-such"),
        ({"providers": ["password"], "mapping": {"jit_users": "yes"}}, "true or false"),
        ({"providers": ["password"], "mapping": {"extra": 1}}, "unknown field"),
        (["password"], "JSON object"),
    ],
)
def test_bad_configuration_is_refused(
    world: tuple[AppContext, TableAuth, str], document: Any, message: str
) -> None:
    app, _, _ = world
    with pytest.raises(ValidationError, match=message):
        aps.set_realm_providers(app, "acme", document)
    assert aps.realm_providers(app, "acme").providers == ("password",)


def test_only_master_admins_configure_providers(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, _ = world
    add_user(app, "acme", "acme-admin", ["admin"])
    acme_admin = ids.authenticate(
        app, password_login(app, "acme", "acme-admin", password_of("acme-admin")).access_token
    )
    with pytest.raises(ForbiddenError):
        aps.set_realm_providers(app, "acme", {"providers": ["table"]}, principal=acme_admin)
    with pytest.raises(ForbiddenError):
        aps.realm_providers(app, "acme", principal=acme_admin)
    master = ids.authenticate(
        app, password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    )
    aps.set_realm_providers(app, "acme", {"providers": ["table"]}, principal=master)
    assert aps.realm_providers(app, "acme").providers == ("table",)


def test_configuration_is_sealed_against_a_database_writer(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, url = world
    _chain(app)
    # A writer without the root key swaps in a configuration mapping everyone to admin:
    # it does not unseal, so the realm falls back to passwords only.
    forged = json.dumps(
        {"providers": ["table"], "mapping": {"default_roles": ["admin"], "jit_users": True}}
    ).encode()
    assert raw_sql(url, "UPDATE qimem_realm_auth SET config = :c", c=forged) == 1
    ids.identity(app).invalidate_caches()
    assert aps.realm_providers(app, "acme").providers == ("password",)
    assert _refused(app, "acme", "erin", TABLE_USERS["erin"][0])
    # Copying another realm's sealed row does not work either (bound to the realm).
    ids.create_realm(app, "other")
    _chain(app, "other")
    raw_sql(
        url,
        "UPDATE qimem_realm_auth SET config = "
        "(SELECT config FROM qimem_realm_auth WHERE realm = 'other') WHERE realm = 'acme'",
    )
    assert aps.realm_providers(app, "acme").providers == ("password",)


def test_secret_options_are_redacted_and_kept(tmp_path: Path, root_key_b64: str) -> None:
    class Secretive:
        def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
            return dict(options)

        def authenticate(self, attempt: LoginAttempt) -> Authenticated | None:
            ok = attempt.options.get("bind_password") == "s3cret-value"
            return Authenticated(attempt.username) if ok else None

    class Plugin:
        @hookimpl
        def qimem_register_auth_providers(self, register: Any) -> None:
            register("secretive", Secretive())

    pm = make_plugin_manager()
    pm.register(Plugin(), name="secretive")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with AppContext(Config(store_url=url, root_key_b64=root_key_b64), pm=pm) as app:
        ids.configure(app, fast_settings())
        ids.bootstrap(app, ADMIN_PASSWORD)
        doc = {
            "providers": ["secretive"],
            "secretive": {"bind_password": "s3cret-value", "host": "x"},
            "mapping": {"jit_users": True},
        }
        shown = aps.set_realm_providers(app, "master", doc).to_dict()
        assert shown["secretive"] == {"bind_password": "(set)", "host": "x"}
        assert b"s3cret-value" not in Path(tmp_path / "q.db").read_bytes()
        # Re-submitting what was shown keeps the secret.
        aps.set_realm_providers(app, "master", {**shown, "secretive": {**shown["secretive"]}})
        password_login(app, "master", "someone", "any-password-1")
        records = ids.audit_events(app, "master", limit=20)
        assert "s3cret" not in json.dumps([r.to_dict() for r in records])
        ids.close_identity(app)


# -- HTTP and CLI ------------------------------------------------------------------------


def test_http_admin_endpoints_and_login(world: tuple[AppContext, TableAuth, str]) -> None:
    app, table, _ = world
    with serving(app) as url:
        base = f"{url}/v1/auth/realms"
        master = requests.post(
            f"{base}/master/token",
            data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
            timeout=10,
        ).json()["access_token"]
        admin = {"Authorization": f"Bearer {master}"}
        shown = requests.get(f"{base}/acme/providers", headers=admin, timeout=10)
        assert shown.status_code == 200 and shown.json()["providers"] == ["password"]
        body = {"providers": ["password", "table"], "mapping": {"jit_users": True}}
        put = requests.put(f"{base}/acme/providers", json=body, headers=admin, timeout=10)
        assert put.status_code == 200, put.text
        assert requests.put(f"{base}/acme/providers", json=body, timeout=10).status_code == 401
        bad = requests.put(
            f"{base}/acme/providers", json={"providers": "x"}, headers=admin, timeout=10
        )
        assert bad.status_code == 400 and "providers" in bad.json()["error"]["message"]
        login = requests.post(
            f"{base}/acme/token",
            data={"grant_type": "password", "username": "erin", "password": "nope-nope-1"},
            timeout=10,
        )
        assert login.status_code == 401
        assert login.json()["error"]["message"] == "invalid username or password"
        table.down = True
        down = requests.post(
            f"{base}/acme/token",
            data={"grant_type": "password", "username": "erin", "password": "nope-nope-1"},
            timeout=10,
        )
        assert down.status_code == 503 and down.headers["Retry-After"] == "10"
        assert down.json()["error"]["code"] == "provider_unavailable"
        table.down = False
        reset = requests.delete(f"{base}/acme/providers", headers=admin, timeout=10)
        assert reset.status_code == 200 and reset.json()["providers"] == ["password"]


def test_qauth_set_providers_and_login(tmp_path: Path, qimem_home: Path) -> None:
    from qimem.cli import cli as qimem_cli
    from qimem.cli.qauth import qauth

    runner = CliRunner()
    init = runner.invoke(qimem_cli, ["init", "--admin-password-stdin"], input=ADMIN_PASSWORD)
    assert init.exit_code == 0, init.output
    secret = tmp_path / "bind.pw"
    secret.write_text("svc-password\n")
    config = tmp_path / "providers.json"
    config.write_text(
        json.dumps(
            {
                "providers": ["password", "ldap"],
                "ldap": {
                    "url": "ldap://127.0.0.1:1",
                    "allow_plain": True,
                    "bind_dn": "cn=svc,dc=example,dc=org",
                    "bind_password_file": str(secret),
                    "user_search_base": "dc=example,dc=org",
                },
                "mapping": {"groups": {"kim-admins": "admin"}, "jit_users": False},
            }
        )
    )
    done = runner.invoke(
        qauth, ["realm", "set-providers", "master", "--config", str(config), "--json"]
    )
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert shown["ldap"]["bind_password"] == "(set)" and "bind_password_file" not in shown["ldap"]
    assert "svc-password" not in done.output
    listed = runner.invoke(qauth, ["realm", "providers", "master"])
    assert listed.exit_code == 0 and "password, ldap" in listed.output
    # qauth login goes through the chain: the directory (port 1) is down, the admin's
    # password is right and the password provider comes first.
    ok = runner.invoke(
        qauth, ["login", "--user", "admin", "--password-stdin"], input=ADMIN_PASSWORD + "\n"
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        qauth, ["login", "--user", "admin", "--password-stdin"], input="wrong-one-1\n"
    )
    assert bad.exit_code == 4 and "invalid username or password" in bad.output
    unknown = runner.invoke(
        qauth, ["login", "--user", "somebody", "--password-stdin"], input="wrong-one-1\n"
    )
    assert unknown.exit_code == 10 and "retry" in unknown.output  # the directory is down
    missing = runner.invoke(
        qauth, ["realm", "set-providers", "master", "--config", str(tmp_path / "none.json")]
    )
    assert missing.exit_code != 0 and "Traceback" not in missing.output
    reset = runner.invoke(qauth, ["realm", "set-providers", "master", "--reset"])
    assert reset.exit_code == 0, reset.output


def test_plugins_list_shows_the_providers(memory_app: AppContext) -> None:
    listed = {p.name: p for p in services.plugins.list_plugins(memory_app)}
    assert listed["password-auth"].manifest["provides"]["auth_providers"] == ["password"]  # type: ignore[index]
    assert listed["ldap-auth"].manifest["provides"]["auth_providers"] == ["ldap"]  # type: ignore[index]
    assert listed["ldap-auth"].loaded and listed["ldap-auth"].builtin


def test_qauth_against_a_server(world: tuple[AppContext, TableAuth, str], tmp_path: Path) -> None:
    """The same commands with --server: GET/PUT/DELETE .../providers, .../providers/users."""
    from qimem.cli.qauth import qauth

    app, _, _ = world
    config = tmp_path / "chain.json"
    config.write_text(json.dumps({"providers": ["table"], "mapping": {"jit_users": False}}))
    with serving(app) as url:
        master = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
        add_user(app, "acme", "acme-boss", ["admin"])
        boss = password_login(app, "acme", "acme-boss", password_of("acme-boss")).access_token
        remote = ["--server", url, "--token", master]
        runner = CliRunner()
        done = runner.invoke(
            qauth, [*remote, "realm", "set-providers", "acme", "--config", str(config), "--json"]
        )
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["providers"] == ["table"]
        shown = runner.invoke(qauth, [*remote, "realm", "providers", "acme"])
        assert "providers table" in shown.output and "just-in-time users: off" in shown.output
        added = runner.invoke(
            qauth,
            [*remote, "user", "add-external", "--realm", "acme", "erin", "--provider", "table"],
        )
        assert added.exit_code == 0, added.output
        login = runner.invoke(
            qauth,
            ["--server", url, "login", "--realm", "acme", "--user", "erin", "--password-stdin"],
            input=TABLE_USERS["erin"][0] + "\n",
        )
        assert login.exit_code == 0, login.output
        # A realm admin of acme (not master) may not change it.
        refused = runner.invoke(
            qauth, ["--server", url, "--token", boss, "realm", "set-providers", "acme", "--reset"]
        )
        assert refused.exit_code == 4 and "master realm administrators" in refused.output
        reset = runner.invoke(qauth, [*remote, "realm", "set-providers", "acme", "--reset"])
        assert reset.exit_code == 0, reset.output
    assert aps.realm_providers(app, "acme").providers == ("password",)


def test_deleting_a_realm_deletes_its_configuration(
    world: tuple[AppContext, TableAuth, str],
) -> None:
    app, _, url = world
    ids.create_realm(app, "gone")
    _chain(app, "gone")
    ids.delete_realm(app, "gone")
    assert raw_sql(url, "DELETE FROM qimem_realm_auth WHERE realm = 'gone'") == 0
    ids.create_realm(app, "gone")  # a new tenant of the same name starts with passwords only
    assert aps.realm_providers(app, "gone").providers == ("password",)
