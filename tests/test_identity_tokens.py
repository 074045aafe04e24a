"""Access tokens: claims, EdDSA only, forgeries refused, JWKS for independent verifiers,
signing-key rotation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import jwt
import pytest
import sqlalchemy as sa
from conftest import make_app
from forge import alg_none, hs256_variants, parts, tampered, wrong_key
from identity_helpers import ADMIN_PASSWORD, password_login, with_identity

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.identity import db as tables
from qimem.services import identity as ids


@pytest.fixture
def app() -> Iterator[AppContext]:
    ctx = with_identity(make_app("memory://", None))
    ids.create_realm(ctx, "acme")
    ids.add_user(ctx, "acme", "alice", "nyvpr-password", ["encryptor"])
    yield ctx
    ids.close_identity(ctx)
    ctx.close()


def _token(app: AppContext) -> str:
    return password_login(app, "acme", "alice", "nyvpr-password").access_token


def test_claims_and_header(app: AppContext) -> None:
    token = _token(app)
    header, claims, _ = parts(token)
    assert header["alg"] == "EdDSA" and header["kid"]
    assert {"iss", "sub", "aud", "exp", "iat", "jti", "roles", "realm"} <= set(claims)
    assert claims["iss"] == "qimem/realms/acme" and claims["aud"] == "qimem"
    assert claims["realm"] == "acme" and claims["roles"] == ["encryptor"]
    assert claims["exp"] - claims["iat"] == 300
    assert header["kid"] in [k["kid"] for k in ids.jwks(app, "acme")["keys"]]


def test_independent_library_verifies_with_jwks_only(app: AppContext) -> None:
    from jwcrypto import jwk, jws

    token = _token(app)
    jwks_json = json.dumps(ids.jwks(app, "acme"))
    keyset = jwk.JWKSet.from_json(jwks_json)
    header, _, _ = parts(token)
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(keyset.get_key(header["kid"]), alg="EdDSA")
    claims = json.loads(verifier.payload)
    assert claims["preferred_username"] == "alice"
    # And the same library rejects a tampered token with that key set.
    broken = jws.JWS()
    broken.deserialize(tampered(token, roles=["admin"]))
    with pytest.raises(jws.InvalidJWSSignature):
        broken.verify(keyset.get_key(header["kid"]), alg="EdDSA")


@pytest.mark.parametrize(
    "forge",
    ["alg_none", "tampered_roles", "tampered_realm", "wrong_key", "hs256", "garbage", "truncated"],
)
def test_forgeries_are_refused(app: AppContext, forge: str) -> None:
    token = _token(app)
    jwks = ids.jwks(app, "acme")
    candidates = {
        "alg_none": [alg_none(token)],
        "tampered_roles": [tampered(token, roles=["admin"])],
        "tampered_realm": [tampered(token, realm="master")],
        "wrong_key": [wrong_key(token)],
        "hs256": hs256_variants(token, jwks),
        "garbage": ["not.a.token", "x" * 40, ""],
        "truncated": [token[:-5], token.rsplit(".", 1)[0]],
    }[forge]
    for candidate in candidates:
        with pytest.raises(AuthError) as info:
            ids.authenticate(app, candidate)
        assert info.value.http_status == 401 and info.value.code == "invalid_token"
    assert ids.authenticate(app, token).username == "alice"  # the real one still works


def test_expired_wrong_audience_and_other_realm_key(app: AppContext) -> None:
    ident = ids.identity(app)
    user = ident.get_user("acme", "alice")
    old = ident.tokens.issue("acme", user.user_id, "alice", ["encryptor"], now=time.time() - 1000)
    with pytest.raises(AuthError):
        ids.authenticate(app, old.token)
    short = ident.tokens.issue("acme", user.user_id, "alice", ["encryptor"], ttl=-1)
    with pytest.raises(AuthError):
        ids.authenticate(app, short.token)
    # Signed with master's key but claiming realm acme: refused.
    forged = ident.tokens.issue("master", user.user_id, "alice", ["admin"])
    header, claims, _ = parts(forged.token)
    kid, private = ident.tokens._signing_key("master")
    for change in (
        {"realm": "acme"},
        {"iss": "qimem/realms/acme", "realm": "acme"},
        {"aud": "other"},
    ):
        bad = jwt.encode({**claims, **change}, private, algorithm="EdDSA", headers={"kid": kid})
        with pytest.raises(AuthError):
            ids.authenticate(app, bad)
    # Missing required claims are refused even when properly signed.
    for missing in ("jti", "exp", "sub"):
        partial = {k: v for k, v in claims.items() if k != missing}
        bad = jwt.encode(partial, private, algorithm="EdDSA", headers={"kid": kid})
        with pytest.raises(AuthError):
            ids.authenticate(app, bad)


def test_revoked_jti_is_refused(app: AppContext) -> None:
    token = _token(app)
    assert ids.revoke(app, "acme", token)
    with pytest.raises(AuthError):
        ids.authenticate(app, token)


def test_signing_key_rotation_keeps_old_keys_until_their_tokens_expire(app: AppContext) -> None:
    before = _token(app)
    old_kid = parts(before)[0]["kid"]
    new_kid = ids.rotate_signing_key(app, "acme")
    after = _token(app)
    assert parts(after)[0]["kid"] == new_kid != old_kid
    kids = [k["kid"] for k in ids.jwks(app, "acme")["keys"]]
    assert kids == [new_kid, old_kid]  # active key first
    assert ids.authenticate(app, before).username == "alice"
    assert ids.authenticate(app, after).username == "alice"
    # Once the old key's retirement time has passed it leaves the JWKS and stops verifying.
    ident = ids.identity(app)
    with ident.db.begin() as conn:
        conn.execute(
            sa.update(tables.signing_keys)
            .where(tables.signing_keys.c.kid == old_kid)
            .values(retire_at=time.time() - 1)
        )
    ident.invalidate_caches()
    assert [k["kid"] for k in ids.jwks(app, "acme")["keys"]] == [new_kid]
    with pytest.raises(AuthError):
        ids.authenticate(app, before)


def test_signing_keys_are_per_realm_and_wrapped(sqlite_url: str, root_key_b64: str) -> None:
    app = with_identity(make_app(sqlite_url, root_key_b64))
    ids.create_realm(app, "acme")
    master_kids = {k["kid"] for k in ids.jwks(app, "master")["keys"]}
    acme_kids = {k["kid"] for k in ids.jwks(app, "acme")["keys"]}
    assert master_kids and acme_kids and not master_kids & acme_kids
    token = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    ids.close_identity(app)
    app.close()
    # A second process with the same root key verifies the first one's tokens.
    again = make_app(sqlite_url, root_key_b64)
    assert ids.authenticate(again, token).username == "admin"
    ids.close_identity(again)
    again.close()
    # With another root key the stored signing keys do not unwrap: they are neither used
    # to sign nor trusted to verify (finding 15: a public key is only believed when it is
    # derived from a private key the root key unwraps).
    from qimem.identity.db import Database
    from qimem.identity.settings import IdentitySettings
    from qimem.identity.tokens import TokenService
    from qimem.rootkey import KeyWrapper, generate_root_key

    engine = sa.create_engine(sqlite_url)
    service = TokenService(Database(engine), KeyWrapper(generate_root_key()), IdentitySettings())
    with pytest.raises(AuthError):
        service.verify(token)
    issued = service.issue("master", "s", "admin", ["admin"])
    assert jwt.get_unverified_header(issued.token)["kid"] not in master_kids
    engine.dispose()
