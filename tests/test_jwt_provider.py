"""The external JWT/OIDC login provider (issue 15, item 3), against a real issuer process
(:mod:`oidc_issuer`: discovery, JWKS, its own RSA keys, rotation) on a free loopback port.

An external JWT is swapped for a qimem access token at the token endpoint (jwt-bearer or
token exchange); every refusal is the same 401 with its reason in the audit log; the
issuer being down is 503; keys are cached, refreshed on an unknown ``kid`` at most once per
interval; the algorithm allow-list refuses ``none`` and HS256 keyed with the public key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from identity_helpers import STORES, add_user, close_app, identity_app, serving, store_url
from oidc_issuer import OidcIssuer

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
REFUSED = "invalid or unacceptable assertion"


def issuer_options(issuer: OidcIssuer, **overrides: Any) -> dict[str, Any]:
    return {
        "issuer": issuer.url,
        "discovery_url": issuer.discovery_url,
        "allow_http_loopback": True,  # test only: the issuer is plain http on loopback
        "audiences": ["qimem-ci"],
        "bound_claims": {"repository_owner": "acme"},
        "groups_claim": "groups",
        "jwks_refresh_min_seconds": 0.5,
        "max_lifetime": 3600,
        "leeway": 5,
        **overrides,
    }


def realm_config(issuer: OidcIssuer, jit: bool = True, **overrides: Any) -> dict[str, Any]:
    return {
        "providers": ["jwt"],
        "jwt": {"issuers": [issuer_options(issuer, **overrides)]},
        "mapping": {
            "claims": {"environment": {"prod": "key-manager"}},
            "groups": {"crypto": "encryptor"},
            "default_roles": ["auditor"],
            "jit_users": jit,
        },
    }


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    started = OidcIssuer()
    yield started
    started.stop()


@pytest.fixture
def world(
    tmp_path: Path, root_key_b64: str, issuer: OidcIssuer
) -> Iterator[tuple[AppContext, OidcIssuer, str]]:
    app = identity_app(f"sqlite:///{tmp_path / 'qimem.db'}", root_key_b64)
    ids.create_realm(app, "ci")
    aps.set_realm_providers(app, "ci", realm_config(issuer))
    with serving(app) as url:
        yield app, issuer, url
    close_app(app)


def good_claims(**overrides: Any) -> dict[str, Any]:
    return {
        "sub": "deploy-bot",
        "aud": "qimem-ci",
        "repository_owner": "acme",
        "environment": "prod",
        "groups": ["crypto"],
        **overrides,
    }


def exchange(url: str, token: str, realm: str = "ci", grant: str = JWT_BEARER) -> Any:
    if grant == JWT_BEARER:
        data = {"grant_type": grant, "assertion": token}
    else:
        data = {"grant_type": grant, "subject_token": token, "subject_token_type": JWT_TYPE}
    return requests.post(f"{url}/v1/auth/realms/{realm}/token", data=data, timeout=30)


def last_login(app: AppContext, realm: str = "ci") -> dict[str, Any]:
    return ids.audit_events(app, realm, limit=1, action="login")[0].to_dict()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """An attacker's token: unsigned (``secret`` None) or HS256 with ``secret``."""
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    mac = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + _b64(mac)


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
    tampered = f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{signature}"
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
    for reason, token in [*cases.items(), ("algorithm", confusion), ("invalid", missing_exp)]:
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


def test_qauth_login_with_a_jwt_file(
    world: tuple[AppContext, OidcIssuer, str], tmp_path: Path
) -> None:
    """``qauth login --jwt-file FILE`` (never the JWT on the command line), against a
    server and on the local store; the options are exclusive."""
    from click.testing import CliRunner

    from qimem.cli.qauth import qauth
    from qimem.cli.qauth_backends import LocalBackend
    from qimem.cli.qauth_providers import jwt_login

    app, issuer, url = world
    token_file = tmp_path / "ci.jwt"
    token_file.write_text(issuer.sign(**good_claims()) + "\n")
    runner = CliRunner()
    done = runner.invoke(
        qauth, ["--server", url, "login", "--realm", "ci", "--jwt-file", str(token_file)]
    )
    assert done.exit_code == 0, done.output
    assert ids.authenticate(app, done.output.strip()).username == "deploy-bot"
    from_stdin = runner.invoke(
        qauth,
        ["--server", url, "login", "--realm", "ci", "--jwt-file", "-", "--json"],
        input=issuer.sign(**good_claims()),
    )
    assert from_stdin.exit_code == 0 and "access_token" in json.loads(from_stdin.output)
    refused = runner.invoke(
        qauth, ["--server", url, "login", "--realm", "ci", "--jwt-file", "-"],
        input=issuer.sign(**good_claims(aud="other")),
    )  # fmt: skip
    assert refused.exit_code == 4 and REFUSED in refused.output
    both = runner.invoke(
        qauth, ["--server", url, "login", "--user", "x", "--jwt-file", str(token_file)]
    )
    assert both.exit_code == 2
    assert runner.invoke(qauth, ["--server", url, "login", "--user", "x"]).exit_code == 2
    local = jwt_login(LocalBackend(app), "ci", str(token_file))
    assert ids.authenticate(app, local["access_token"]).username == "deploy-bot"


def test_kubernetes_style_nested_claims(world: tuple[AppContext, OidcIssuer, str]) -> None:
    """Claim paths into nested objects: a service-account token's namespace bound, its
    name the username, the namespace mapped to a role."""
    app, issuer, url = world
    config = realm_config(
        issuer,
        user_claim="kubernetes.io/serviceaccount/name",
        username_prefix="k8s-payments-",
        bound_claims={"kubernetes.io/namespace": "payments"},
    )
    config["mapping"]["claims"] = {"kubernetes.io/namespace": {"payments": "encryptor"}}
    config["mapping"]["default_roles"] = []
    aps.set_realm_providers(app, "ci", config)

    def sa_token(namespace: str, name: str) -> str:
        return issuer.sign(
            sub=f"system:serviceaccount:{namespace}:{name}",
            aud="qimem-ci",
            **{"kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name}}},
        )

    answer = exchange(url, sa_token("payments", "batch"))
    assert answer.status_code == 200, answer.text
    principal = ids.authenticate(app, answer.json()["access_token"])
    assert principal.username == "k8s-payments-batch" and set(principal.roles) == {"encryptor"}
    assert exchange(url, sa_token("other", "batch")).status_code == 401
    assert last_login(app)["detail"]["reason"] == "bound_claim"


def test_docs_jwt_example_runs_against_an_issuer(
    world: tuple[AppContext, OidcIssuer, str], tmp_path: Path
) -> None:
    """docs/identity.md's worked OIDC example, as written (its issuer URLs pointed at the
    test issuer, plus the test-only allow_http_loopback), through qauth and HTTP."""
    import re

    from click.testing import CliRunner

    from qimem.cli.qauth import qauth

    app, issuer, url = world
    text = (Path(__file__).resolve().parent.parent / "docs" / "identity.md").read_text()
    pattern = r"<!-- jwt-example -->\n<!-- illustrative[^\n]*\n```json\n(.*?)```"
    block = re.search(pattern, text, re.S)
    assert block, "docs/identity.md lost its worked OIDC example"
    document = json.loads(block.group(1).replace("https://ci.example.org", issuer.url))
    document["jwt"]["issuers"][0]["allow_http_loopback"] = True
    ids.create_realm(app, "acme")
    aps.set_realm_providers(app, "acme", document)
    claims = {
        "aud": "qimem-acme",
        "repository_owner": "acme",
        "ref": "refs/heads/main",
        "repository_id": "4711",
        "environment": "production",
        "sub": "repo:acme/app",
    }
    token_file = tmp_path / "ci.jwt"
    token_file.write_text(issuer.sign(**claims))
    login = CliRunner().invoke(
        qauth, ["--server", url, "login", "--realm", "acme", "--jwt-file", str(token_file)]
    )
    assert login.exit_code == 0, login.output
    principal = ids.authenticate(app, login.output.strip())
    assert principal.username == "ci-4711" and set(principal.roles) == {"encryptor"}
    for change in ({"ref": "refs/heads/feature"}, {"repository_owner": "evil"}):
        refused = exchange(url, issuer.sign(**{**claims, **change}), realm="acme")
        assert refused.status_code == 401


# PostgreSQL only: on SQLite the store's first write of a transaction inside a SAVEPOINT
# (users.create) is committed when the savepoint is released (pysqlite starts no
# transaction for SAVEPOINT), so a concurrent login can read the new row before its MAC is
# written and is refused ("integrity"): a store issue, reported, not the provider's.
@pytest.mark.parametrize("store", [s for s in STORES if s != "sqlite"])
def test_concurrent_first_logins_make_one_user(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    root_key_b64: str,
    issuer: OidcIssuer,
    store: str,
) -> None:
    """Eight simultaneous first logins of one identity all get a token and make one
    just-in-time user (the losers of the insert race find it)."""
    from concurrent.futures import ThreadPoolExecutor

    app = identity_app(store_url(request, tmp_path, store), root_key_b64)
    try:
        ids.create_realm(app, "ci")
        aps.set_realm_providers(app, "ci", realm_config(issuer))
        tokens = [issuer.sign(**good_claims(sub="racer")) for _ in range(8)]
        with serving(app) as url, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: exchange(url, t), tokens))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert [u.username for u in ids.list_users(app, "ci")] == ["racer"]
        logins = ids.audit_events(app, "ci", limit=20, action="login")
        assert len([e for e in logins if e.outcome == "success"]) == 8
    finally:
        close_app(app)


def test_a_frozen_issuer_costs_one_timeout_not_one_per_login(
    world: tuple[AppContext, OidcIssuer, str],
) -> None:
    """An issuer that accepts connections and never answers: the first login waits for
    the timeout and gets 503; the logins right after get 503 at once (no thread held per
    login), until the back-off passes."""
    import socket

    app, issuer, url = world
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)
    try:
        base = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        config = realm_config(issuer, timeout=1.0)
        config["jwt"]["issuers"][0].update(
            issuer=base, discovery_url=base + "/.well-known/openid-configuration"
        )
        aps.set_realm_providers(app, "ci", config)
        now = int(time.time())
        claims = {**good_claims(), "iss": base, "iat": now, "exp": now + 300}
        token = jwt.encode(
            claims, rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256", headers={"kid": "k"},
        )  # fmt: skip
        started = time.monotonic()
        assert exchange(url, token).status_code == 503
        assert time.monotonic() - started >= 0.9  # it did wait for the issuer
        started = time.monotonic()
        assert [exchange(url, token).status_code for _ in range(10)] == [503] * 10
        assert time.monotonic() - started < 1.0
    finally:
        frozen.close()
