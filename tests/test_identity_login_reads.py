"""A login reads what it needs in few statements (issue 14: login throughput): the realm,
the user and the realm's login configuration in one read; the OTP row and the realm's
OTP policy in one; the claim of the lock state returns the user's row; the grants come
with the user's epoch. Attacked here on SQLite and PostgreSQL: another realm's user of the
same name, a forged OTP policy, a user changed while his password was hashing, a forged grant, and
a name too long to look up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from identity_helpers import (
    STORES,
    close_app,
    identity_app,
    password_login,
    password_of,
    raw_sql,
    store_url,
)

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.identity import lockout
from qimem.services import identity as ids
from qimem.services import otp as otps


@pytest.fixture(params=STORES)
def world(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[AppContext, str]]:
    url = store_url(request, tmp_path, request.param)
    app = identity_app(url, root_key_b64)
    for realm in ("acme", "beta"):
        ids.create_realm(app, realm)
    try:
        yield app, url
    finally:
        close_app(app)


def refused(app: AppContext, realm: str, username: str, password: str) -> str:
    with pytest.raises(AuthError) as err:
        password_login(app, realm, username, password)
    return str(err.value.code)


def test_a_name_in_two_realms_logs_in_only_with_its_own_realms_password(
    world: tuple[AppContext, str],
) -> None:
    app, _ = world
    ids.add_user(app, "acme", "sam", password_of("sam"), ["encryptor"])
    ids.add_user(app, "beta", "sam", "another-long-passphrase-42", [])
    assert password_login(app, "acme", "sam", password_of("sam")).realm == "acme"
    assert refused(app, "beta", "sam", password_of("sam")) == "invalid_grant"
    beta = password_login(app, "beta", "sam", "another-long-passphrase-42")
    assert ids.identity(app).authenticate(beta.access_token).roles == ()  # not acme's


def test_an_unknown_realm_or_an_overlong_name_is_the_uniform_refusal(
    world: tuple[AppContext, str],
) -> None:
    app, _ = world
    ids.add_user(app, "acme", "sam", password_of("sam"), [])
    assert refused(app, "nowhere", "sam", password_of("sam")) == "invalid_grant"
    assert refused(app, "acme", "s" * 129, password_of("sam")) == "invalid_grant"
    with pytest.raises(AuthError):
        ids.token(
            app,
            "acme",
            {"grant_type": "client_credentials", "client_id": "c" * 129, "client_secret": "x"},
        )


def test_a_forged_otp_policy_counts_as_required(world: tuple[AppContext, str]) -> None:
    """A writer without the root key cannot switch the second factor off (or on) for a
    realm: a policy row failing its MAC reads as required."""
    app, url = world
    ids.add_user(app, "acme", "kim", password_of("kim"), [])
    otps.set_otp_required(app, "acme", False)
    assert password_login(app, "acme", "kim", password_of("kim")).access_token
    raw_sql(url, "UPDATE qimem_realm_policy SET mac = 'forged' WHERE realm = 'acme'")
    assert refused(app, "acme", "kim", password_of("kim")) == "otp_enrollment_required"


def test_a_policy_row_with_a_null_value_counts_as_required(
    postgres_url: str, root_key_b64: str
) -> None:
    """A writer allowed to change the schema NULLs the flag of a 'required' policy: the
    row is there and fails its MAC, so it reads as required (red team, this session: the
    one-read version took a NULL for "no row"). PostgreSQL: SQLite cannot drop a NOT NULL
    constraint in place."""
    app = identity_app(postgres_url, root_key_b64)
    try:
        ids.create_realm(app, "acme")
        ids.add_user(app, "acme", "kim", password_of("kim"), [])
        otps.set_otp_required(app, "acme", True)
        url = postgres_url
        raw_sql(url, "ALTER TABLE qimem_realm_policy ALTER COLUMN otp_required DROP NOT NULL")
        raw_sql(url, "UPDATE qimem_realm_policy SET otp_required = NULL WHERE realm = 'acme'")
        assert refused(app, "acme", "kim", password_of("kim")) == "otp_enrollment_required"
        assert ids.identity(app).otp_required("acme") is True
        events = ids.identity(app).audit_events("acme", action="integrity.violation")
        assert [e.detail.get("table") for e in events] == ["realm_policy", "realm_policy"]
    finally:
        close_app(app)


def test_one_realms_otp_policy_does_not_reach_another(world: tuple[AppContext, str]) -> None:
    app, _ = world
    ids.add_user(app, "acme", "kim", password_of("kim"), [])
    ids.add_user(app, "beta", "kim", password_of("kim"), [])
    otps.set_otp_required(app, "acme", True)
    assert refused(app, "acme", "kim", password_of("kim")) == "otp_enrollment_required"
    assert password_login(app, "beta", "kim", password_of("kim")).access_token


def test_the_claim_returns_the_row_as_it_is_under_its_lock(
    world: tuple[AppContext, str],
) -> None:
    app, _ = world
    ids.add_user(app, "acme", "lee", password_of("lee"), [])
    db = ids.identity(app).db
    with db.begin() as conn:
        row = conn.execute(
            sa.text("SELECT user_id, secret_hash FROM qimem_users WHERE username = 'lee'")
        ).one()
    with db.begin() as conn:
        three = sa.text("UPDATE qimem_users SET failed_logins = 3 WHERE user_id = :u")
        conn.execute(three, {"u": row.user_id})
        reason, user = lockout.claim(conn, row.user_id, row.secret_hash)
    assert reason is None and user is not None
    assert user.user_id == row.user_id and user.failed_logins == 0  # the claim's own write
    with db.begin() as conn:  # the hash changed while the password was hashing
        assert lockout.claim(conn, row.user_id, "argon2-of-an-older-password") == ("changed", None)
        disable = sa.text("UPDATE qimem_users SET enabled = false WHERE user_id = :u")
        conn.execute(disable, {"u": row.user_id})
        assert lockout.claim(conn, row.user_id, row.secret_hash) == ("disabled", None)
        assert lockout.claim(conn, "no-such-user", row.secret_hash) == ("unknown_user", None)


def test_a_login_sees_a_disable_made_while_its_password_was_hashing(
    world: tuple[AppContext, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read found the user enabled; the claim, after the hash, must not."""
    app, url = world
    ids.add_user(app, "acme", "max", password_of("max"), [])
    hashing = ids.identity(app).hashing
    verify = hashing.verify

    def disabled_meanwhile(*args: object, **kwargs: object) -> bool:
        raw_sql(url, "UPDATE qimem_users SET enabled = false WHERE username = 'max'")
        return verify(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hashing, "verify", disabled_meanwhile)
    assert refused(app, "acme", "max", password_of("max")) == "invalid_grant"


def test_grants_read_with_the_epoch_still_drop_forged_rows(
    world: tuple[AppContext, str],
) -> None:
    """The grants and the user's epoch come in one read: a grant row a writer without the
    root key added (no valid MAC) gives nothing."""
    app, url = world
    ids.add_user(app, "acme", "ivy", password_of("ivy"), ["encryptor"])
    with ids.identity(app).db.begin() as conn:
        user_id = conn.execute(
            sa.text("SELECT user_id FROM qimem_users WHERE realm = 'acme' AND username = 'ivy'")
        ).scalar_one()
    raw_sql(
        url,
        "INSERT INTO qimem_grants (realm, user_id, role, scope, mac) "
        "VALUES ('acme', :u, 'admin', '', 'forged')",
        u=user_id,
    )
    token = password_login(app, "acme", "ivy", password_of("ivy")).access_token
    assert ids.identity(app).authenticate(token).roles == ("encryptor",)
