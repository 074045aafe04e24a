"""The external JWT/OIDC login provider (issue 15, item 3), against a real issuer process
(:mod:`oidc_issuer`: discovery, JWKS, its own RSA keys, rotation) on a free loopback port.

An external JWT is swapped for a qimem access token at the token endpoint (jwt-bearer or
token exchange); every refusal is the same 401 with its reason in the audit log; the
issuer being down is 503; keys are cached, refreshed on an unknown ``kid`` at most once per
interval; the algorithm allow-list refuses ``none`` and HS256 keyed with the public key.
More (the CLI, the docs' example, nested claims, races, a frozen issuer):
tests/test_jwt_provider_ops.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from identity_helpers import add_user, close_app, identity_app, serving
from oidc_issuer import (
    JWT_BEARER,
    REFUSED,
    TOKEN_EXCHANGE,
    OidcIssuer,
    b64url,
    exchange,
    good_claims,
    handmade,
    last_login,
    realm_config,
)

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

# The fixtures issuer and world: tests/jwt_fixtures.py (a pytest plugin).


def test_valid_jwt_logs_in_with_mapped_roles(world: tuple[AppContext, OidcIssuer, str]) -> None:
    app, issuer, url = world
    answer = exchange(url, issuer.sign(**good_claims()))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "refresh_token" not in body and body["token_type"] == "Bearer"
    assert answer.headers["Cache-Control"] == "no-store"
    principal = ids.authenticate(app, body["access_token"])
    assert principal.username == "deploy-bot" and principal.realm == "ci"
    assert set(principal.roles) == {"auditor", "key-manager", "encryptor"}
    keys = requests.get(
        f"{url}/v1/security/keys",
        headers={"Authorization": f"Bearer {body['access_token']}"},
        timeout=10,
    )
    assert keys.status_code == 200
    record = last_login(app)
    assert record["outcome"] == "success"
    assert record["detail"]["provider"] == "jwt" and record["detail"]["issuer"] == issuer.url
    assert record["detail"]["grant"] == "jwt-bearer"

    # Token exchange (RFC 8693): the same identity, the issued token's type named; the
    # roles follow the claims of each login (environment dev: no key-manager any more).
    swapped = exchange(url, issuer.sign(**good_claims(environment="dev")), grant=TOKEN_EXCHANGE)
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    again = ids.authenticate(app, swapped.json()["access_token"])
    assert set(again.roles) == {"auditor", "encryptor"}
    with pytest.raises(Exception, match="invalid|expired|revoked"):
        ids.authenticate(app, body["access_token"])  # its key-manager role was taken away

    # Replay: the same JWT is accepted again until it expires (documented, as Vault does).
    token = issuer.sign(**good_claims())
    assert exchange(url, token).status_code == 200
    assert exchange(url, token).status_code == 200


def test_every_refusal_is_the_same_401_with_its_reason_audited(
    world: tuple[AppContext, OidcIssuer, str],
) -> None:
    app, issuer, url = world
    now = int(time.time())
    kid = jwt.get_unverified_header(issuer.sign(**good_claims()))["kid"]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    genuine = issuer.sign(**good_claims())
    head, payload, signature = genuine.split(".")
    tampered_claims = {**jwt.decode(genuine, options={"verify_signature": False}), "sub": "admin"}
    tampered = f"{head}.{b64url(json.dumps(tampered_claims).encode())}.{signature}"
    public_pem = issuer.public_pem().encode()
    base = {**good_claims(), "iss": issuer.url, "iat": now, "exp": now + 300}
    cases = {
        "expired": issuer.sign(**good_claims(iat=now - 400, exp=now - 100)),
        "not_yet_valid": issuer.sign(**good_claims(nbf=now + 600)),
        "audience": issuer.sign(**good_claims(aud="someone-else")),
        "unknown_issuer": issuer.sign(**good_claims(iss=issuer.url + "/")),  # exact match only
        "bound_claim": issuer.sign(**good_claims(repository_owner="evil")),
        "lifetime": issuer.sign(**good_claims(iat=now, exp=now + 7200)),
        "bad_username": issuer.sign(**good_claims(sub="repo:acme/app:ref:main")),
        "algorithm": handmade({"alg": "none", "kid": kid}, base, None),
        "signature": tampered,
        "unknown_kid": jwt.encode(base, stranger, algorithm="RS256", headers={"kid": "stranger"}),
        "malformed": "not.a.jwt",
        "oversized": issuer.sign(**good_claims(padding="x" * 9000)),
    }
    # HS256 keyed with the issuer's public key (algorithm confusion): refused by the
    # allow-list before any key is used.
    confusion = handmade({"alg": "HS256", "kid": kid, "typ": "JWT"}, base, public_pem)
    missing_exp = issuer.sign(**good_claims(exp=None))
    issued_later = issuer.sign(**good_claims(iat=now + 600, exp=now + 900))
    extra = [("algorithm", confusion), ("invalid", missing_exp), ("not_yet_valid", issued_later)]
    for reason, token in [*cases.items(), *extra]:
        answer = exchange(url, token)
        assert answer.status_code == 401, (reason, answer.text)
        assert answer.json()["error"] == {"code": "invalid_grant", "message": REFUSED}, reason
        record = last_login(app)
        assert record["outcome"] == "failure" and record["detail"]["provider"] == "jwt"
        assert record["detail"]["reason"] in (reason, "missing_claim"), (reason, record)
        assert token not in json.dumps(record)  # the assertion itself is never recorded
    assert ids.list_users(app, "ci") == []  # nobody was created on the way


def test_key_rotation_at_the_issuer(world: tuple[AppContext, OidcIssuer, str]) -> None:
    app, issuer, url = world
    first_kid = jwt.get_unverified_header(issuer.sign())["kid"]
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200
    fetched = issuer.stats()["jwks"]
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200
    assert issuer.stats()["jwks"] == fetched  # cached
    time.sleep(0.6)  # past jwks_refresh_min_seconds
    issuer.rotate()  # a new kid; the old one still published
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200  # refetched
    assert issuer.stats()["jwks"] == fetched + 1
    old = issuer.sign(kid=first_kid, **good_claims())
    assert exchange(url, old).status_code == 200
    time.sleep(0.6)
    issuer.rotate(drop_old=True)  # only the newest key is published now
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200
    refused = exchange(url, issuer.sign(kid=first_kid, **good_claims()))
    assert refused.status_code == 401 and last_login(app)["detail"]["reason"] == "unknown_kid"


def test_random_kids_cannot_make_qimem_hammer_the_issuer(
    world: tuple[AppContext, OidcIssuer, str],
) -> None:
    app, issuer, url = world
    aps.set_realm_providers(app, "ci", realm_config(issuer, jwks_refresh_min_seconds=30))
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200
    before = issuer.stats()["jwks"]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    base = {**good_claims(), "iss": issuer.url, "iat": now, "exp": now + 300}
    for i in range(25):
        forged = jwt.encode(base, stranger, algorithm="RS256", headers={"kid": f"spray-{i}"})
        assert exchange(url, forged).status_code == 401
    assert issuer.stats()["jwks"] - before <= 1


def test_issuer_outage_is_503_and_cached_keys_keep_working(
    world: tuple[AppContext, OidcIssuer, str], tmp_path: Path
) -> None:
    app, issuer, url = world
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200
    signed_before = issuer.sign(**good_claims())
    new_kid_token = issuer.sign(kid=issuer.rotate(), **good_claims())
    issuer.stop()
    assert exchange(url, signed_before).status_code == 200  # its key is cached
    time.sleep(0.6)
    down = exchange(url, new_kid_token)  # unknown kid, the issuer cannot be asked
    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "provider_unavailable"
    assert down.headers["Retry-After"] == "10"
    assert last_login(app)["detail"]["reason"] == "provider_unavailable"
    # A realm whose issuer was never reached: its discovery cannot be fetched either.
    ids.create_realm(app, "ci2")
    aps.set_realm_providers(app, "ci2", realm_config(issuer, jwks_cache_seconds=60))
    assert exchange(url, signed_before, realm="ci2").status_code == 503


def test_static_public_key(tmp_path: Path, root_key_b64: str, issuer: OidcIssuer) -> None:
    app = identity_app(f"sqlite:///{tmp_path / 'qimem.db'}", root_key_b64)
    try:
        ids.create_realm(app, "ci")
        config = realm_config(issuer)
        options = config["jwt"]["issuers"][0]
        del options["discovery_url"]
        options["public_key_pem"] = issuer.public_pem()
        aps.set_realm_providers(app, "ci", config)
        with serving(app) as url:
            assert exchange(url, issuer.sign(**good_claims())).status_code == 200
            issuer.rotate(drop_old=True)
            assert exchange(url, issuer.sign(**good_claims())).status_code == 401
        assert issuer.stats() == {"discovery": 0, "jwks": 0}
    finally:
        close_app(app)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithms": ["HS256"]}, "never none or HS"),
        ({"algorithms": ["none"]}, "never none or HS"),
        ({"allow_http_loopback": False}, "https://"),
        ({"discovery_url": "http://example.org/.well-known/openid-configuration"}, "https://"),
        ({"discovery_url": "file:///etc/passwd"}, "https://"),
        ({"jwks_url": "https://issuer.example/jwks"}, "exactly one of"),
        ({"audiences": []}, "audiences"),
        ({"public_key_pem": None, "discovery_url": None}, "exactly one of"),
        ({"surprise": 1}, "unknown option"),
        ({"leeway": 3600}, "leeway"),
    ],
)
def test_bad_configurations_are_refused(
    tmp_path: Path, root_key_b64: str, change: dict[str, Any], message: str
) -> None:
    app = identity_app(f"sqlite:///{tmp_path / 'qimem.db'}", root_key_b64)
    fake = OidcIssuer.__new__(OidcIssuer)
    fake.url, fake.discovery_url = "http://127.0.0.1:9", "http://127.0.0.1:9/.well-known/x"
    try:
        with pytest.raises(ValidationError, match=message):
            aps.set_realm_providers(app, "master", realm_config(fake, **change))
    finally:
        close_app(app)


def test_accounts_and_realms(world: tuple[AppContext, OidcIssuer, str]) -> None:
    """A JWT never logs in as a local password user; jit off needs provisioning; a realm
    without the provider refuses the grant; the password grant never takes a JWT."""
    app, issuer, url = world
    add_user(app, "ci", "local-lou", ["admin"])
    assert exchange(url, issuer.sign(**good_claims(sub="local-lou"))).status_code == 401
    assert last_login(app)["detail"]["reason"] == "local_account_conflict"

    aps.set_realm_providers(app, "ci", realm_config(issuer, jit=False))
    assert exchange(url, issuer.sign(**good_claims(sub="newcomer"))).status_code == 401
    assert last_login(app)["detail"]["reason"] == "not_provisioned"
    aps.add_external_user(app, "ci", "newcomer", "jwt")
    assert exchange(url, issuer.sign(**good_claims(sub="newcomer"))).status_code == 200
    ids.set_user_enabled(app, "ci", "newcomer", False)
    assert exchange(url, issuer.sign(**good_claims(sub="newcomer"))).status_code == 401
    assert last_login(app)["detail"]["reason"] == "disabled"
    ids.set_user_enabled(app, "ci", "newcomer", True)

    password = requests.post(
        f"{url}/v1/auth/realms/ci/token",
        data={"grant_type": "password", "username": "newcomer",
              "password": issuer.sign(**good_claims(sub="newcomer"))},
        timeout=10,
    )  # fmt: skip
    assert password.status_code == 401

    assert exchange(url, issuer.sign(**good_claims()), realm="master").status_code == 401
    assert last_login(app, "master")["detail"]["reason"] == "no_assertion_provider"
    assert exchange(url, issuer.sign(**good_claims()), realm="nope").status_code == 401

    bad_type = requests.post(
        f"{url}/v1/auth/realms/ci/token",
        data={"grant_type": TOKEN_EXCHANGE, "subject_token": "x", "subject_token_type": "saml"},
        timeout=10,
    )
    assert bad_type.status_code == 400
    no_assertion = requests.post(
        f"{url}/v1/auth/realms/ci/token", data={"grant_type": JWT_BEARER}, timeout=10
    )
    assert no_assertion.status_code == 400


def test_an_active_second_factor_is_never_skipped_by_an_assertion(
    world: tuple[AppContext, OidcIssuer, str],
) -> None:
    """Red team: a JWT user with a confirmed TOTP logged in by jwt-bearer without a code.
    An assertion cannot carry one, so such an account is refused (fail closed, audited)."""
    import pyotp

    from qimem.services import otp

    app, issuer, url = world
    assert exchange(url, issuer.sign(**good_claims())).status_code == 200  # JIT user made
    enrolled = otp.otp_enroll(app, "ci", "deploy-bot")
    otp.otp_confirm(app, "ci", "deploy-bot", pyotp.TOTP(enrolled.secret).now())
    refused = exchange(url, issuer.sign(**good_claims()))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_grant"
    swapped = exchange(url, issuer.sign(**good_claims()), grant=TOKEN_EXCHANGE)
    assert swapped.status_code == 401
    record = last_login(app)
    assert record["outcome"] == "failure"
    assert record["detail"]["reason"] == "second_factor_required"
