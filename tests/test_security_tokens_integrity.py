"""Finding 15 (issue 12), continued after the red-team review (RT-1, RT-2), and finding 8's
cut-off raced by the refresh and client-credentials grants (RT-3).

* RT-1: ``qimem_signing_keys.public_key`` was trusted as stored: a database writer INSERTed
  his own Ed25519 key and signed ``roles: [admin]`` tokens. Each key's public key is now
  derived from its root-wrapped private key (which unwraps only for its realm and kid).
* RT-2: ``qimem_refresh_tokens`` rows were plain SHA-256 of the token: a writer INSERTed a
  row for the admin's user id, or set ``revoked`` back to 0. Rows are now a keyed hash
  bound to the realm, user, family, times and token, and a token issued at or before the
  user's token cut-off is refused.
* RT-3: the two grants checked the account in one transaction and signed later with a
  fresh ``iat``: a disable or role revoke committed in between left the token valid.

Every database attack is plain SQL from a separate connection, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from identity_helpers import (
    STORES,
    add_user,
    close_app,
    during_signing,
    identity_app,
    insert_signing_key,
    integrity_failures,
    password_login,
    password_of,
    raw_sql,
    store_url,
)

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.services import identity as ids


@dataclass
class World:
    app: AppContext
    url: str  # the database URL (for the attacker's raw SQL)

    def user_id(self, username: str) -> str:
        return ids.identity(self.app).get_user("acme", username).user_id

    def login(self, username: str):  # type: ignore[no-untyped-def]
        return password_login(self.app, "acme", username, password_of(username))

    def refresh(self, token: str):  # type: ignore[no-untyped-def]
        grant = {"grant_type": "refresh_token", "refresh_token": token}
        return ids.token(self.app, "acme", grant)

    def valid(self, access_token: str) -> bool:
        try:
            ids.authenticate(self.app, access_token)
        except AuthError:
            return False
        return True


@pytest.fixture(params=STORES)
def world(request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str) -> Iterator[World]:
    url = store_url(request, tmp_path, request.param)
    app = identity_app(url, root_key_b64)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "eve", ["auditor"])  # the attacker's own account
    add_user(app, "acme", "boss", ["admin"])
    yield World(app, url)
    close_app(app)


def _forge(world: World, private: object, kid: str) -> str:
    """An admin token for boss signed by ``private`` (issuer and audience are public)."""
    genuine = jwt.decode(world.login("eve").access_token, options={"verify_signature": False})
    now = int(time.time())
    claims = {
        **genuine,
        "sub": world.user_id("boss"),
        "exp": now + 300,
        "iat": now,
        "iat_ms": now * 1000 + 999,
        "nbf": now,
        "jti": str(uuid.uuid4()),
        "roles": ["admin"],
        "preferred_username": "boss",
    }
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": kid})  # type: ignore[arg-type]


# -- RT-1: signing keys -----------------------------------------------------------------


def test_finding15_inserted_signing_key_forges_no_token(world: World) -> None:
    before = integrity_failures("signing_keys")
    kid, private = insert_signing_key(world.url, "acme")
    with pytest.raises(AuthError):
        ids.authenticate(world.app, _forge(world, private, kid))
    published = [k["kid"] for k in ids.identity(world.app).jwks("acme")["keys"]]
    assert kid not in published and published
    assert integrity_failures("signing_keys") > before


def test_finding15_replaced_public_key_of_the_real_key_forges_no_token(world: World) -> None:
    genuine_kid = jwt.get_unverified_header(world.login("eve").access_token)["kid"]
    attacker_kid, private = insert_signing_key(world.url, "acme")
    raw_sql(
        world.url,
        "UPDATE qimem_signing_keys SET public_key = (SELECT public_key FROM qimem_signing_keys "
        "WHERE kid = :a) WHERE kid = :g",
        a=attacker_kid,
        g=genuine_kid,
    )
    ids.identity(world.app).invalidate_caches()
    with pytest.raises(AuthError):
        ids.authenticate(world.app, _forge(world, private, genuine_kid))
    assert genuine_kid not in [k["kid"] for k in ids.identity(world.app).jwks("acme")["keys"]]
    # Logins go on with a new key (the tampered active one is passed over).
    assert world.valid(world.login("eve").access_token)


def test_finding15_copied_signing_key_row_does_not_verify(world: World) -> None:
    """The wrapped private key is bound to its realm and kid: a genuine row copied under
    another kid (or realm) is not a key."""
    genuine_kid = jwt.get_unverified_header(world.login("eve").access_token)["kid"]
    raw_sql(
        world.url,
        "INSERT INTO qimem_signing_keys (kid, realm, public_key, private_wrapped, active, "
        "created_at, retire_at) SELECT :copy, realm, public_key, private_wrapped, false, 0, "
        "NULL FROM qimem_signing_keys WHERE kid = :g",
        g=genuine_kid,
        copy=f"copied-{uuid.uuid4().hex[:8]}",
    )
    before = integrity_failures("signing_keys")
    ids.identity(world.app).invalidate_caches()
    published = [k["kid"] for k in ids.identity(world.app).jwks("acme")["keys"]]
    assert published == [genuine_kid]
    assert integrity_failures("signing_keys") > before


def test_finding15_active_forged_key_is_passed_over_and_reported(world: World) -> None:
    before = integrity_failures("signing_keys")
    kid, _ = insert_signing_key(world.url, "acme", active=True)
    ids.identity(world.app).invalidate_caches()
    token = world.login("eve").access_token
    assert jwt.get_unverified_header(token)["kid"] != kid
    assert world.valid(token)
    assert integrity_failures("signing_keys") > before
    events = ids.identity(world.app).audit_events("acme", action="integrity.violation")
    assert any(e.detail.get("table") == "signing_keys" for e in events), events


# -- RT-2: refresh tokens ---------------------------------------------------------------


@pytest.mark.parametrize("modern_format", [False, True])
def test_finding15_inserted_refresh_token_row_gives_nothing(
    world: World, modern_format: bool
) -> None:
    family = uuid.uuid4()
    token = f"qrt_{family.hex}.{'A' * 43}" if modern_format else "qrt_" + "A" * 43
    now = time.time()
    raw_sql(
        world.url,
        "INSERT INTO qimem_refresh_tokens (token_hash, family_id, realm, user_id, issued_at, "
        "expires_at, family_expires_at, used, revoked) "
        "VALUES (:h, :f, 'acme', :u, :now, :exp, :exp, false, false)",
        h=hashlib.sha256(token.encode()).hexdigest(),
        f=str(family),
        u=world.user_id("boss"),
        now=now,
        exp=now + 3600,
    )
    with pytest.raises(AuthError):
        world.refresh(token)
    assert ids.identity(world.app).introspect("acme", token) == {"active": False}


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE qimem_refresh_tokens SET user_id = :boss",
        "UPDATE qimem_refresh_tokens SET expires_at = expires_at + 86400, "
        "family_expires_at = family_expires_at + 86400",
        "UPDATE qimem_refresh_tokens SET issued_at = issued_at + 86400",
    ],
    ids=["moved_to_admin", "extended", "reissued"],
)
def test_finding15_changed_refresh_token_row_gives_nothing(world: World, tamper: str) -> None:
    stolen = world.login("eve").refresh_token
    raw_sql(world.url, tamper, **({"boss": world.user_id("boss")} if ":boss" in tamper else {}))
    with pytest.raises(AuthError):
        world.refresh(stolen)


def _disable_enable(app: AppContext) -> None:
    ids.set_user_enabled(app, "acme", "boss", False)
    ids.set_user_enabled(app, "acme", "boss", True)


CUT_OFFS: dict[str, Callable[[AppContext], None]] = {
    "password": lambda app: ids.set_password(app, "acme", "boss", "a-brand-new-passphrase-77"),
    "disable_enable": _disable_enable,
    "role_revoke": lambda app: ids.revoke_role(app, "acme", "boss", "admin"),
}


@pytest.mark.parametrize("change", sorted(CUT_OFFS))
def test_finding8_unrevoking_a_refresh_token_after_a_cut_off_gives_nothing(
    world: World, change: str
) -> None:
    stolen = world.login("boss").refresh_token
    CUT_OFFS[change](world.app)
    raw_sql(world.url, "UPDATE qimem_refresh_tokens SET revoked = false, used = false")
    with pytest.raises(AuthError):
        world.refresh(stolen)
    assert ids.identity(world.app).introspect("acme", stolen) == {"active": False}


def test_finding15_refresh_rotation_still_works(world: World) -> None:
    first = world.login("eve")
    second = world.refresh(first.refresh_token)
    third = world.refresh(second.refresh_token)
    assert world.valid(third.access_token)
    assert ids.identity(world.app).introspect("acme", third.refresh_token)["active"] is True
    with pytest.raises(AuthError):  # reuse still revokes the family
        world.refresh(first.refresh_token)
    with pytest.raises(AuthError):
        world.refresh(third.refresh_token)


# -- RT-3: the cut-off raced by the grants ------------------------------------------------


def test_finding8_password_grant_racing_a_disable_is_cut_off(world: World) -> None:
    during_signing(world.app, lambda: ids.set_user_enabled(world.app, "acme", "eve", False))
    assert not world.valid(world.login("eve").access_token)


def test_finding8_refresh_grant_racing_a_disable_is_cut_off(world: World) -> None:
    refresh_token = world.login("eve").refresh_token
    during_signing(world.app, lambda: ids.set_user_enabled(world.app, "acme", "eve", False))
    answer = world.refresh(refresh_token)
    assert not world.valid(answer.access_token)
    with pytest.raises(AuthError):
        world.refresh(answer.refresh_token)


def test_finding8_refresh_grant_racing_a_role_revoke_is_cut_off(world: World) -> None:
    ids.grant_role(world.app, "acme", "eve", "encryptor")
    refresh_token = world.login("eve").refresh_token
    during_signing(world.app, lambda: ids.revoke_role(world.app, "acme", "eve", "encryptor"))
    answer = world.refresh(refresh_token)
    assert not world.valid(answer.access_token)


def test_finding8_client_credentials_racing_a_disable_is_cut_off(world: World) -> None:
    made = ids.create_client(world.app, "acme", "svc", ["encryptor"])
    during_signing(world.app, lambda: ids.set_user_enabled(world.app, "acme", "svc", False))
    grant = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": made.secret}
    answer = ids.token(world.app, "acme", grant)
    assert not world.valid(answer.access_token)


def test_finding8_client_credentials_after_a_disable_is_refused(world: World) -> None:
    made = ids.create_client(world.app, "acme", "svc", ["encryptor"])
    grant = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": made.secret}
    assert world.valid(ids.token(world.app, "acme", grant).access_token)
    ids.set_user_enabled(world.app, "acme", "svc", False)
    with pytest.raises(AuthError):
        ids.token(world.app, "acme", grant)
