"""The external JWT/OIDC login provider, continued (tests/test_jwt_provider.py has the
token checks): ``qauth login --jwt-file``, the worked example of docs/identity.md,
claim paths into nested objects (Kubernetes), concurrent first logins, a frozen issuer;
against the real issuer process of :mod:`oidc_issuer`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from identity_helpers import STORES, close_app, identity_app, serving, store_url
from oidc_issuer import REFUSED, OidcIssuer, exchange, good_claims, last_login, realm_config

from qimem.app import AppContext
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

# The fixtures issuer and world: tests/jwt_fixtures.py (a pytest plugin).


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


# On SQLite too: pysqlite used to commit a transaction's first write (users.create's
# INSERT in a SAVEPOINT) when the savepoint was released, so a concurrent login read the new
# row before its MAC and was refused ("integrity"); qimem.sql.sqlite_explicit_begin.
@pytest.mark.parametrize("store", STORES)
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
