"""QAuth identity library: realms, users, passwords, lockout, roles, refresh tokens, audit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, fast_settings, password_login, with_identity

from qimem import services
from qimem.app import AppContext
from qimem.errors import AuthError, ConflictError, NotFoundError, ValidationError
from qimem.identity import IdentitySettings
from qimem.identity.passwords import LoginBusyError, PasswordHashing
from qimem.identity.permissions import PERMISSIONS, Principal, permission_map
from qimem.services import identity as ids


@pytest.fixture
def app() -> Iterator[AppContext]:
    ctx = with_identity(make_app("memory://", None), lockout_threshold=3)
    yield ctx
    ids.close_identity(ctx)
    ctx.close()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_app(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[AppContext]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'qimem.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ctx = with_identity(make_app(url, root_key_b64), lockout_threshold=3)
    yield ctx
    ids.close_identity(ctx)
    ctx.close()


def test_realms_lifecycle(app: AppContext) -> None:
    ids.create_realm(app, "acme")
    assert [r.name for r in ids.list_realms(app)] == ["acme", "master"]
    with pytest.raises(ConflictError):
        ids.create_realm(app, "acme")
    with pytest.raises(ValidationError):
        ids.create_realm(app, "Bad Realm!")
    with pytest.raises(ValidationError):
        ids.delete_realm(app, "master")
    # A realm that still holds keys is not deleted.
    services.create_key(app, realm="acme", name="k1")
    with pytest.raises(ConflictError):
        ids.delete_realm(app, "acme")
    ids.create_realm(app, "empty")
    ids.add_user(app, "empty", "bob", "obo-password", ["admin"])
    ids.delete_realm(app, "empty")
    assert "empty" not in [r.name for r in ids.list_realms(app)]
    with pytest.raises(NotFoundError):
        ids.list_users(app, "empty")
    with pytest.raises(NotFoundError):
        ids.add_user(app, "nope", "bob", "obo-password")


def test_builtin_roles_and_custom_roles(app: AppContext) -> None:
    roles = {r.name: r for r in ids.list_roles(app, "master")}
    assert set(roles) == {"admin", "key-manager", "encryptor", "auditor"}
    assert set(roles["admin"].permissions) == set(PERMISSIONS)
    assert len(PERMISSIONS) == 16
    custom = ids.create_role(app, "master", "signer", ["crypto:encrypt", "keys:read"])
    assert custom.permissions == ("crypto:encrypt", "keys:read") and not custom.builtin
    with pytest.raises(ValidationError):
        ids.create_role(app, "master", "bad", ["crypto:everything"])
    with pytest.raises(ConflictError):
        ids.create_role(app, "master", "signer", ["keys:read"])
    with pytest.raises(NotFoundError):
        ids.grant_role(app, "master", "admin", "no-such-role")


def test_password_login_issues_tokens_with_roles(app: AppContext) -> None:
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "alice", "nyvpr-password", ["encryptor", "auditor"])
    response = password_login(app, "acme", "alice", "nyvpr-password")
    assert response.refresh_token and response.refresh_token.startswith("qrt_")
    principal = ids.authenticate(app, response.access_token)
    assert principal.realm == "acme" and principal.username == "alice"
    assert set(principal.roles) == {"encryptor", "auditor"}
    assert principal.allows("crypto:encrypt") and principal.allows("audit:read")
    assert not principal.allows("keys:create") and not principal.allows("users:admin")
    assert not principal.can_act_in("master")


def test_scoped_grants_cover_matching_key_names_only(app: AppContext) -> None:
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "pat", "cng-password-1")
    ids.grant_role(app, "acme", "pat", "encryptor", "payroll-*")
    principal = ids.authenticate(
        app, password_login(app, "acme", "pat", "cng-password-1").access_token
    )
    assert principal.allows("crypto:encrypt", "payroll-2026")
    assert not principal.allows("crypto:encrypt", "hr-2026")
    assert not principal.allows("crypto:encrypt")  # realm-wide needs an unscoped grant
    assert principal.allows_any("crypto:encrypt")
    # Revoking the scoped grant removes it.
    ids.revoke_role(app, "acme", "pat", "encryptor")
    principal = ids.authenticate(
        app, password_login(app, "acme", "pat", "cng-password-1").access_token
    )
    assert not principal.allows_any("crypto:encrypt")
    with pytest.raises(NotFoundError):
        ids.revoke_role(app, "acme", "pat", "encryptor")


def test_permission_map_unions_grants() -> None:
    perms = permission_map(
        [("encryptor", "payroll-*"), ("auditor", "")],
        {"encryptor": ("crypto:encrypt", "keys:read"), "auditor": ("keys:read", "audit:read")},
    )
    p = Principal("s", "u", "r", ("encryptor", "auditor"), perms)
    assert p.allows("keys:read") and p.allows("crypto:encrypt", "payroll-x")
    assert not p.allows("crypto:encrypt", "other")


def test_master_admin_may_act_in_other_realms(app: AppContext) -> None:
    admin = ids.authenticate(
        app, password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    )
    assert admin.can_act_in("acme") and admin.can_act_in("master")
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "root", "ebbg-password", ["admin"])
    acme_admin = ids.authenticate(
        app, password_login(app, "acme", "root", "ebbg-password").access_token
    )
    assert acme_admin.can_act_in("acme") and not acme_admin.can_act_in("master")


def test_failed_logins_are_uniform_and_lock_per_user(app: AppContext) -> None:
    ids.add_user(app, "master", "carol", "pneby-password")
    ids.add_user(app, "master", "dave", "qnir-password")

    def attempt(username: str, password: str, realm: str = "master") -> tuple[str, str, int]:
        with pytest.raises(AuthError) as info:
            password_login(app, realm, username, password)
        return info.value.code, info.value.message, info.value.http_status

    wrong = attempt("carol", "not-her-password")
    assert wrong == ("invalid_grant", "invalid username or password", 401)
    assert attempt("nobody", "jungrire-pass") == wrong
    assert attempt("carol", "x", realm="no-such-realm") == wrong
    attempt("carol", "still-wrong-1")
    attempt("carol", "still-wrong-2")  # third failure: locked
    # The right password now gets exactly the jebat-password answer.
    assert attempt("carol", "pneby-password") == wrong
    # Lockout is per user: dave is unaffected.
    assert password_login(app, "master", "dave", "qnir-password").access_token
    # Disabled users get the same answer too; enabling clears the lockout.
    ids.set_user_enabled(app, "master", "dave", False)
    assert attempt("dave", "qnir-password") == wrong
    ids.set_user_enabled(app, "master", "carol", True)
    assert password_login(app, "master", "carol", "pneby-password").access_token
    records = ids.audit_events(app, "master", action="login")
    reasons = [r.detail.get("reason") for r in records if r.outcome == "failure"]
    assert {"bad_password", "locked", "unknown_user", "disabled"} <= set(reasons)


def test_unknown_user_is_hashed_against_a_dummy(
    app: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashing = ids.identity(app).hashing
    real = hashing._hasher
    seen: list[str] = []

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def verify(self, stored: str, password: str) -> bool:
            seen.append(stored)
            return real.verify(stored, password)

    monkeypatch.setattr(hashing, "_hasher", Spy())
    with pytest.raises(AuthError):
        password_login(app, "master", "ghost", "fbzr-password")
    with pytest.raises(AuthError):
        password_login(app, "master", "admin", "jebat-password")
    assert len(seen) == 2
    # Same algorithm and parameters for the unknown user as for the real one.
    assert seen[0].rsplit("$", 2)[0] == seen[1].rsplit("$", 2)[0]


def test_default_argon2_parameters_are_owasp_and_rehash_on_login(
    sqlite_url: str, root_key_b64: str
) -> None:
    default = IdentitySettings()
    assert (default.argon2_memory_kib, default.argon2_time_cost, default.argon2_parallelism) == (
        19456,
        2,
        1,
    )
    assert PasswordHashing(default).hash("a-password").startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    app = with_identity(make_app(sqlite_url, root_key_b64))
    ids.add_user(app, "master", "erin", "reva-password")
    ids.close_identity(app)
    app.close()

    def stored_hash() -> str:
        engine = sa.create_engine(sqlite_url)
        with engine.connect() as conn:
            value = conn.execute(
                sa.text("SELECT secret_hash FROM qimem_users WHERE username = 'erin'")
            ).scalar_one()
        engine.dispose()
        return value

    assert stored_hash().startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    app = make_app(sqlite_url, root_key_b64)
    ids.configure(app, fast_settings(argon2_memory_kib=2048, argon2_time_cost=2))
    password_login(app, "master", "erin", "reva-password")
    ids.close_identity(app)
    app.close()
    assert stored_hash().startswith("$argon2id$v=19$m=2048,t=2,p=1$")


def test_hashing_is_bounded() -> None:
    hashing = PasswordHashing(
        fast_settings(max_concurrent_hashes=1, max_waiting_hashes=0, hash_wait_seconds=0.1)
    )
    stored = hashing.hash("a-password")
    gate = hashing._gate()
    gate.__enter__()
    try:
        with pytest.raises(LoginBusyError) as info:
            hashing.verify(stored, "a-password")
        assert info.value.http_status == 503
    finally:
        gate.__exit__(None, None, None)
    assert hashing.verify(stored, "a-password")


def test_password_rules_and_changes(app: AppContext) -> None:
    with pytest.raises(ValidationError):
        ids.add_user(app, "master", "frank", "short")
    with pytest.raises(ValidationError):
        ids.add_user(app, "master", "bad name!", "long-enough-password")
    ids.add_user(app, "master", "frank", "senax-password")
    with pytest.raises(ConflictError):
        ids.add_user(app, "master", "frank", "senax-password")
    first = password_login(app, "master", "frank", "senax-password")
    ids.set_password(app, "master", "frank", "senax-new-password")
    with pytest.raises(AuthError):
        password_login(app, "master", "frank", "senax-password")
    assert password_login(app, "master", "frank", "senax-new-password").access_token
    # A password change ends existing sessions (refresh tokens).
    with pytest.raises(AuthError):
        ids.token(
            app, "master", {"grant_type": "refresh_token", "refresh_token": first.refresh_token}
        )


def test_refresh_rotates_and_reuse_revokes_the_family(app: AppContext) -> None:
    first = password_login(app, "master", "admin", ADMIN_PASSWORD)
    second = ids.token(
        app, "master", {"grant_type": "refresh_token", "refresh_token": first.refresh_token}
    )
    assert second.refresh_token != first.refresh_token
    third = ids.token(
        app, "master", {"grant_type": "refresh_token", "refresh_token": second.refresh_token}
    )
    # Replaying an old token revokes the whole chain, including the newest one.
    with pytest.raises(AuthError) as info:
        ids.token(
            app, "master", {"grant_type": "refresh_token", "refresh_token": first.refresh_token}
        )
    assert info.value.code == "invalid_grant"
    with pytest.raises(AuthError):
        ids.token(
            app, "master", {"grant_type": "refresh_token", "refresh_token": third.refresh_token}
        )
    # Another login starts a fresh family that works.
    fresh = password_login(app, "master", "admin", ADMIN_PASSWORD)
    assert ids.token(
        app, "master", {"grant_type": "refresh_token", "refresh_token": fresh.refresh_token}
    )
    # A refresh token only works in its realm.
    ids.create_realm(app, "acme")
    other = password_login(app, "master", "admin", ADMIN_PASSWORD)
    with pytest.raises(AuthError):
        ids.token(
            app, "acme", {"grant_type": "refresh_token", "refresh_token": other.refresh_token}
        )
    actions = [
        (r.action, r.outcome, r.detail.get("reason")) for r in ids.audit_events(app, "master")
    ]
    assert ("token.refresh", "failure", "reuse") in actions


def test_concurrent_refresh_of_one_token_succeeds_once(sql_app: AppContext) -> None:
    first = password_login(sql_app, "master", "admin", ADMIN_PASSWORD)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def use() -> None:
        barrier.wait()
        try:
            ids.token(
                sql_app,
                "master",
                {"grant_type": "refresh_token", "refresh_token": first.refresh_token},
            )
            results.append("ok")
        except AuthError:
            results.append("refused")

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]


def test_revocation_and_introspection(app: AppContext) -> None:
    tokens = password_login(app, "master", "admin", ADMIN_PASSWORD)
    info = ids.introspect(app, "master", tokens.access_token)
    assert info["active"] and info["username"] == "admin" and info["realm"] == "master"
    assert ids.introspect(app, "master", tokens.refresh_token)["token_type"] == "refresh_token"
    ids.create_realm(app, "acme")
    assert ids.introspect(app, "acme", tokens.access_token) == {"active": False}
    assert ids.revoke(app, "master", tokens.access_token)
    with pytest.raises(AuthError):
        ids.authenticate(app, tokens.access_token)
    assert ids.introspect(app, "master", tokens.access_token) == {"active": False}
    assert ids.revoke(app, "master", tokens.refresh_token)
    with pytest.raises(AuthError):
        ids.token(
            app, "master", {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        )
    assert not ids.revoke(app, "master", "not-a-token-at-all-xxxxxxxx")


def test_service_accounts(app: AppContext) -> None:
    ids.create_realm(app, "acme")
    made = ids.create_client(app, "acme", "batch-job", ["encryptor"])
    assert made.secret.startswith("qcs_") and made.secret not in repr(made)
    response = ids.token(
        app,
        "acme",
        {
            "grant_type": "client_credentials",
            "client_id": "batch-job",
            "client_secret": made.secret,
        },
    )
    assert response.refresh_token is None
    principal = ids.authenticate(app, response.access_token)
    assert principal.kind == "client" and principal.allows("crypto:encrypt")
    for client_id, secret in (("batch-job", "qcs_wrong"), ("nobody", made.secret)):
        with pytest.raises(AuthError) as info:
            ids.token(
                app,
                "acme",
                {
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": secret,
                },
            )
        assert info.value.code == "invalid_client"
    # A service account cannot log in with the password grant, nor a user with client creds.
    with pytest.raises(AuthError):
        password_login(app, "acme", "batch-job", made.secret)
    ids.set_user_enabled(app, "acme", "batch-job", False)
    with pytest.raises(AuthError):
        ids.token(
            app,
            "acme",
            {
                "grant_type": "client_credentials",
                "client_id": "batch-job",
                "client_secret": made.secret,
            },
        )


def test_token_endpoint_parameters(app: AppContext) -> None:
    with pytest.raises(ValidationError) as info:
        ids.token(app, "master", {"grant_type": "implicit"})
    assert info.value.code == "unsupported_grant_type"
    with pytest.raises(ValidationError):
        ids.token(app, "master", {"grant_type": "password", "username": "admin"})


def test_identity_on_sql_stores_persists(sql_app: AppContext) -> None:
    ids.create_realm(sql_app, "acme")
    ids.add_user(sql_app, "acme", "alice", "nyvpr-password", ["key-manager"])
    ids.grant_role(sql_app, "acme", "alice", "encryptor", "payroll-*")
    tokens = password_login(sql_app, "acme", "alice", "nyvpr-password")
    principal = ids.authenticate(sql_app, tokens.access_token)
    assert principal.allows("keys:create") and principal.allows("crypto:encrypt", "payroll-1")
    users = {u.username: u for u in ids.list_users(sql_app, "acme")}
    assert users["alice"].grants == (("encryptor", "payroll-*"), ("key-manager", ""))


def test_no_secrets_in_reprs_audit_or_database(sqlite_url: str, root_key_b64: str) -> None:
    app = with_identity(make_app(sqlite_url, root_key_b64))
    password = "very-secret-password-42"
    ids.add_user(app, "master", "gina", password, ["admin"])
    with pytest.raises(AuthError) as failed:
        password_login(app, "master", "gina", password + "x")
    tokens = password_login(app, "master", "gina", password)
    refreshed = ids.token(
        app, "master", {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
    )
    client = ids.create_client(app, "master", "svc", ["encryptor"])
    ids.revoke(app, "master", refreshed.access_token)
    secrets = [
        password,
        tokens.access_token,
        tokens.refresh_token,
        refreshed.refresh_token,
        client.secret,
    ]
    shown = " ".join(
        [
            repr(tokens),
            repr(refreshed),
            repr(client),
            repr(client.user),
            repr(ids.identity(app)),
            str(failed.value),
            repr(ids.list_users(app, "master")),
        ]
        + [repr(r) + str(r.to_dict()) for r in ids.audit_events(app, "master", limit=1000)]
    )
    for secret in secrets:
        assert secret not in shown
    ids.close_identity(app)
    app.close()
    # A dump of the whole database holds neither passwords nor tokens nor client secrets.
    engine = sa.create_engine(sqlite_url)
    dump = []
    with engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                dump.append(repr(tuple(row)))
    engine.dispose()
    text = "\n".join(dump)
    for secret in secrets + [password[:12]]:
        assert secret not in text
    # Signing keys are stored wrapped: no PEM or raw private key material.
    assert "PRIVATE KEY" not in text


def test_closed_identity_is_not_kept_alive() -> None:
    """Each Identity registered its audit flush with atexit and never unregistered it, so
    every closed identity (its database engine and schema: ~0.5 MB) stayed in memory until
    exit; seen as RSS growth in the fuzz harness, which opens a fresh app every 2000 inputs."""
    import gc
    import weakref

    refs = []
    for _ in range(3):
        app = with_identity(make_app("memory://", None))
        refs.append(weakref.ref(ids.identity(app).db))
        ids.close_identity(app)
        app.close()
        del app
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_closing_the_app_writes_buffered_audit_records(sqlite_url: str, root_key_b64: str) -> None:
    """Buffered audit records are flushed by AppContext.close, not left for process exit."""
    app = with_identity(make_app(sqlite_url, root_key_b64))
    ids.audit_key_operation(app, "master", "alice@master", "crypto.encrypt", "k1")
    app.close()  # well within the flusher's first 0.5 s: only close can have written it
    reopened = make_app(sqlite_url, root_key_b64)
    ids.configure(reopened, fast_settings())
    try:
        actions = [(r.actor, r.action) for r in ids.audit_events(reopened, "master")]
    finally:
        reopened.close()
    assert ("alice@master", "crypto.encrypt") in actions
