"""Finding 15 (issue 12): write access to the database was enough to become admin (an
``INSERT`` into ``qimem_grants`` gave an auditor export rights). Authorization rows now
carry an HMAC under a key derived from the root key, bound to the row's identity: a database
writer without the root key gains nothing, and each forged row is reported (log warning,
``integrity.violation`` audit record, ``qimem_authz_integrity_failures_total``).

Every attack is plain SQL from a separate connection, on a real SQLite file and a real
PostgreSQL database."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from identity_helpers import (
    STORES,
    add_user,
    close_app,
    identity_app,
    integrity_failures,
    password_login,
    password_of,
    raw_sql,
    serving,
    store_url,
)
from migration_helpers import downgrade

from qimem import services
from qimem.app import AppContext
from qimem.builtin_plugins.sql.migrations import HEAD
from qimem.errors import AuthError, QimemError
from qimem.services import identity as ids


@dataclass
class World:
    app: AppContext
    url: str  # the database URL (for the attacker's raw SQL)

    def user_id(self, username: str) -> str:
        return ids.identity(self.app).get_user("acme", username).user_id

    def login(self, username: str, password: str | None = None) -> str:
        answer = password_login(self.app, "acme", username, password or password_of(username))
        return str(answer.access_token)

    def can(self, username: str, permission: str) -> bool:
        principal = ids.identity(self.app).authenticate(self.login(username))
        return principal.allows(permission)


@pytest.fixture(params=STORES)
def world(request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str) -> Iterator[World]:
    url = store_url(request, tmp_path, request.param)
    app = identity_app(url, root_key_b64)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "eve", ["auditor"])  # the attacker's own account
    add_user(app, "acme", "boss", ["admin"])
    ids.create_role(app, "acme", "reader", ["keys:read"])
    add_user(app, "acme", "rita", ["reader"])
    yield World(app, url)
    close_app(app)


failures = integrity_failures


def assert_reported(
    world: World, table: str, before: float, caplog: pytest.LogCaptureFixture
) -> None:
    assert failures(table) > before
    events = ids.identity(world.app).audit_events("acme", action="integrity.violation")
    assert any(e.detail.get("table") == table for e in events), events
    warnings = [r.getMessage() for r in caplog.records if "integrity violation" in r.getMessage()]
    assert warnings
    for text in warnings:  # no secrets in the report
        assert "argon2" not in text and "sha256$" not in text


def test_finding15_inserted_grant_gives_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qimem.identity")
    before = failures("grants")
    raw_sql(
        world.url,
        "INSERT INTO qimem_grants (realm, user_id, role, scope) VALUES ('acme', :u, 'admin', '')",
        u=world.user_id("eve"),
    )
    assert not world.can("eve", "crypto:decrypt")
    assert world.can("eve", "audit:read")  # his real grant still works
    assert "admin" not in ids.identity(world.app).get_user("acme", "eve").roles
    assert_reported(world, "grants", before, caplog)


def test_finding15_copied_grant_mac_does_not_verify(world: World) -> None:
    """The MAC is bound to the row: boss's valid admin-grant MAC on eve's row fails."""
    raw_sql(
        world.url,
        "INSERT INTO qimem_grants (realm, user_id, role, scope, mac) SELECT realm, :eve, role, "
        "scope, mac FROM qimem_grants WHERE user_id = :boss AND role = 'admin'",
        eve=world.user_id("eve"),
        boss=world.user_id("boss"),
    )
    assert not world.can("eve", "crypto:decrypt")
    assert world.can("boss", "crypto:decrypt")


def test_finding15_revoked_grant_cannot_be_put_back(world: World) -> None:
    """A grant row saved before its revoke and re-inserted (with its old MAC) is refused."""
    boss_id = world.user_id("boss")
    ids.grant_role(world.app, "acme", "eve", "encryptor")
    eve_id = world.user_id("eve")
    saved = [(r, s, m) for r, s, m in _grant_rows(world.url, eve_id) if r == "encryptor"]
    ids.revoke_role(world.app, "acme", "eve", "encryptor")
    for role, scope, mac in saved:
        raw_sql(
            world.url,
            "INSERT INTO qimem_grants (realm, user_id, role, scope, mac) "
            "VALUES ('acme', :u, :r, :s, :m)",
            u=eve_id,
            r=role,
            s=scope,
            m=mac,
        )
    assert not world.can("eve", "crypto:decrypt")
    assert boss_id  # boss untouched


def _grant_rows(url: str, user_id: str) -> list[tuple[str, str, str]]:
    import sqlalchemy as sa

    from qimem.sql import create_engine

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            rows = conn.execute(
                sa.text("SELECT role, scope, mac FROM qimem_grants WHERE user_id = :u"),
                {"u": user_id},
            ).all()
        return [(r.role, r.scope, r.mac) for r in rows]
    finally:
        engine.dispose()


def test_finding15_changed_role_permissions_give_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qimem.identity")
    before = failures("roles")
    assert world.can("rita", "keys:read") and not world.can("rita", "crypto:decrypt")
    raw_sql(
        world.url,
        "UPDATE qimem_roles SET permissions = 'keys:read crypto:decrypt users:admin' "
        "WHERE realm = 'acme' AND name = 'reader'",
    )
    ids.identity(world.app).invalidate_caches()
    assert not world.can("rita", "crypto:decrypt") and not world.can("rita", "users:admin")
    assert not world.can("rita", "keys:read")  # the tampered role is ignored as a whole
    reader = [r for r in ids.list_roles(world.app, "acme") if r.name == "reader"]
    assert reader[0].permissions == ()
    assert_reported(world, "roles", before, caplog)


def test_finding15_reenabled_user_stays_out(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="qimem.identity")
    before = failures("users")
    ids.set_user_enabled(world.app, "acme", "eve", False)
    raw_sql(world.url, "UPDATE qimem_users SET enabled = true WHERE username = 'eve'")
    with pytest.raises(AuthError):
        world.login("eve")
    assert_reported(world, "users", before, caplog)


def test_finding15_replaced_password_hash_gives_no_login(world: World) -> None:
    """The attacker copies his own (known) password hash onto boss, the realm admin."""
    raw_sql(
        world.url,
        "UPDATE qimem_users SET secret_hash = (SELECT secret_hash FROM qimem_users "
        "WHERE username = 'eve') WHERE username = 'boss'",
    )
    with pytest.raises(AuthError):
        world.login("boss", password_of("eve"))
    with pytest.raises(AuthError):
        world.login("boss")  # the real password no longer matches the row either


def test_finding15_replaced_client_secret_gives_nothing(world: World) -> None:
    made = ids.create_client(world.app, "acme", "batch-job", ["encryptor"])
    mine = "qcs_" + base64.urlsafe_b64encode(b"attacker-chosen-secret-32-bytes!").decode()
    forged = "sha256$" + hashlib.sha256(mine.encode()).hexdigest()
    raw_sql(
        world.url,
        "UPDATE qimem_users SET secret_hash = :h WHERE username = 'batch-job'",
        h=forged,
    )
    form = {"grant_type": "client_credentials", "client_id": "batch-job"}
    with pytest.raises(AuthError):
        ids.token(world.app, "acme", {**form, "client_secret": mine})
    with pytest.raises(AuthError):
        ids.token(world.app, "acme", {**form, "client_secret": made.secret})


def test_finding15_forged_grant_is_refused_over_http(world: World) -> None:
    """End to end through the real server: the forged grant does not open decryption."""
    services.create_key(world.app, name="payroll", realm="acme")
    sealed = services.encrypt(world.app, "payroll", b"salaries", realm="acme")
    raw_sql(
        world.url,
        "INSERT INTO qimem_grants (realm, user_id, role, scope) "
        "VALUES ('acme', :u, 'encryptor', '')",
        u=world.user_id("eve"),
    )
    with serving(world.app) as base:
        before = _grant_failures(requests.get(f"{base}/metrics", timeout=10).text)
        token = world.login("eve")
        answer = requests.post(
            f"{base}/v1/security/decrypt",
            json={"envelope": base64.b64encode(sealed.envelope).decode()},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        after = _grant_failures(requests.get(f"{base}/metrics", timeout=10).text)
    assert answer.status_code == 403, answer.text
    assert after == before + 1  # reported on the server's /metrics, once


def _grant_failures(metrics: str) -> float:
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('qimem_authz_integrity_failures_total{table="grants"}')
    )
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("kind", STORES)
def test_finding15_existing_rows_are_sealed_once_on_first_start(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str, kind: str
) -> None:
    """A store from before migration 0005: its rows are sealed by the process that upgrades
    it (it opened the key store, so it holds the root key), and only then; a row added
    without a MAC after that stays ignored across restarts."""
    url = store_url(request, tmp_path, kind)
    app = identity_app(url, root_key_b64)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "eve", ["auditor"])
    add_user(app, "acme", "boss", ["admin"])
    close_app(app)
    downgrade(url, "0004")  # no MAC columns; the rows stay

    app = identity_app(url, root_key_b64)  # migrates to 0005, then seals the old rows
    try:
        world = World(app, url)
        assert world.can("boss", "crypto:decrypt") and world.can("eve", "audit:read")
        seals = ids.identity(app).audit_events("master", action="integrity.seal")
        assert len(seals) == 1 and int(seals[0].detail["grants"]) >= 2
        raw_sql(
            url,
            "INSERT INTO qimem_grants (realm, user_id, role, scope) "
            "VALUES ('acme', :u, 'admin', '')",
            u=world.user_id("eve"),
        )
    finally:
        close_app(app)
    app = identity_app(url, root_key_b64)  # a restart does not seal the forged row
    try:
        world = World(app, url)
        assert not world.can("eve", "crypto:decrypt")
        assert len(ids.identity(app).audit_events("master", action="integrity.seal")) == 1
    finally:
        close_app(app)


def test_finding15_nulling_every_mac_does_not_reopen_first_use_sealing(
    tmp_path: Path, root_key_b64: str
) -> None:
    """A database writer sets every ``mac`` to NULL (the state right after migration 0005)
    and inserts his grant: the next process with the root key seals it as a legacy row."""
    url = f"sqlite:///{tmp_path / 'qimem.db'}"
    _null_every_mac_and_forge_an_admin_grant(url, root_key_b64)
    app = identity_app(url, root_key_b64)  # any later start: qimem serve, qauth, qimem init
    try:
        _assert_nothing_sealed(app, url)
    finally:
        close_app(app)


def _null_every_mac_and_forge_an_admin_grant(url: str, root_key_b64: str) -> None:
    """Realm acme with auditor eve; then, as a database writer without the root key, every
    ``mac`` set to NULL (the state right after migration 0005) and an admin grant for eve."""
    app = identity_app(url, root_key_b64)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "eve", ["auditor"])
    eve_id = ids.identity(app).get_user("acme", "eve").user_id
    close_app(app)
    for table in ("qimem_users", "qimem_roles", "qimem_grants"):
        raw_sql(url, f"UPDATE {table} SET mac = NULL")  # noqa: S608 (fixed table names)
    raw_sql(
        url,
        "INSERT INTO qimem_grants (realm, user_id, role, scope) VALUES ('acme', :u, 'admin', '')",
        u=eve_id,
    )


def _assert_nothing_sealed(app: AppContext, url: str) -> None:
    """No row got a MAC back, so eve (whose own row is now unsealed) cannot even log in."""
    for table in ("qimem_users", "qimem_roles", "qimem_grants"):
        sealed = raw_sql(url, f"UPDATE {table} SET mac = mac WHERE mac IS NOT NULL")  # noqa: S608
        assert sealed == 0, table
    with pytest.raises(AuthError):
        World(app, url).login("eve")
    assert not ids.identity(app).audit_events("master", action="integrity.seal")


@pytest.mark.parametrize("kind", STORES)
def test_finding15_rewinding_the_schema_version_does_not_reopen_sealing(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str, kind: str
) -> None:
    """The writer also sets ``alembic_version`` back to 0004 so the next start "upgrades"
    again: that upgrade fails (the MAC columns exist) and nothing is sealed."""
    url = store_url(request, tmp_path, kind)
    _null_every_mac_and_forge_an_admin_grant(url, root_key_b64)
    raw_sql(url, "UPDATE alembic_version SET version_num = '0004'")
    with pytest.raises(QimemError):
        identity_app(url, root_key_b64)
    # The operator repairs it (back to the newest revision, which the schema has).
    raw_sql(url, "UPDATE alembic_version SET version_num = :head", head=HEAD)
    app = identity_app(url, root_key_b64)
    try:
        _assert_nothing_sealed(app, url)
    finally:
        close_app(app)
