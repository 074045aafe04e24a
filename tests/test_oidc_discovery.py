"""OIDC discovery for qimem's realms (issue 15, item 4): an off-the-shelf client (PyJWT's
``PyJWKClient`` fed from ``/.well-known/openid-configuration``) verifies qimem's access
tokens with no qimem code, against a live ``qimem serve``; the document names the ``iss``
the tokens carry; it is public, 404 for an unknown realm (as the JWKS), and its URLs follow
the trusted proxy's forwarded scheme, never a forged ``Host`` or an untrusted peer's
``X-Forwarded-Proto``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import jwt
import pytest
import requests
import tomli_w
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, close_app, serving, with_identity
from serve_process import ServeProcess, home_env

from qimem.server.exposure import parse_trusted_proxies

WELL_KNOWN = "/.well-known/openid-configuration"


def _served_home(tmp_path: Path) -> dict[str, str]:
    """``qimem init`` of a SQLite home with cheap Argon2; the serve environment."""
    home = tmp_path / "home"
    env = home_env(home, QIMEM_STORE=f"sqlite:///{tmp_path / 'qimem.db'}")
    init = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "init",
         "--admin-password-stdin"],
        input=ADMIN_PASSWORD + "\n", env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    config = home / "config.toml"
    doc = tomllib.loads(config.read_text())
    doc["identity"] = {"argon2_memory_kib": 1024, "argon2_time_cost": 1}
    config.write_text(tomli_w.dumps(doc))
    config.chmod(0o600)
    return env


def test_pyjwt_verifies_qimem_tokens_from_discovery_alone(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = _served_home(tmp_path)
    server = ServeProcess(tmp_path, env, "--trusted-proxy", "127.0.0.1", insecure=False)
    processes.append(server)
    server.wait_ready()
    realm_url = f"{server.url}/v1/auth/realms/master"

    meta = requests.get(realm_url + WELL_KNOWN, timeout=10)  # no token: public
    assert meta.status_code == 200, meta.text
    config = meta.json()
    assert config["jwks_uri"] == realm_url + "/jwks"
    assert config["token_endpoint"] == realm_url + "/token"
    assert "urn:ietf:params:oauth:grant-type:jwt-bearer" in config["grant_types_supported"]

    login = requests.post(
        config["token_endpoint"],
        data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        timeout=30,
    )
    assert login.status_code == 200, login.text
    token = login.json()["access_token"]

    # Only PyJWT and the discovery document from here on.
    keys = jwt.PyJWKClient(config["jwks_uri"])
    claims = jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token).key,
        algorithms=config["id_token_signing_alg_values_supported"],
        audience="qimem",
        issuer=config["issuer"],
    )
    assert claims["iss"] == config["issuer"] == "qimem/realms/master"
    assert claims["aud"] == "qimem" and claims["preferred_username"] == "admin"
    # A token of another issuer's key does not verify with these keys.
    forged = jwt.encode(
        {**claims, "roles": ["admin"]}, "x" * 32, algorithm="HS256",
        headers={"kid": jwt.get_unverified_header(token)["kid"]},
    )  # fmt: skip
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(
            forged,
            keys.get_signing_key_from_jwt(forged).key,
            algorithms=config["id_token_signing_alg_values_supported"],
            audience="qimem",
            issuer=config["issuer"],
        )

    # Unknown realm: 404, exactly as its JWKS (nothing more is revealed).
    for path in ("/v1/auth/realms/nope" + WELL_KNOWN, "/v1/auth/realms/nope/jwks"):
        gone = requests.get(server.url + path, timeout=10)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "realm_not_found"

    # Behind the trusted proxy (the peer 127.0.0.1 is one): the forwarded https origin.
    proxied = requests.get(
        realm_url + WELL_KNOWN,
        headers={"X-Forwarded-Proto": "https", "Host": "keys.example.org:8443"},
        timeout=10,
    ).json()
    base = "https://keys.example.org:8443/v1/auth/realms/master"
    assert proxied["jwks_uri"] == base + "/jwks" and proxied["token_endpoint"] == base + "/token"
    assert proxied["issuer"] == config["issuer"]


def test_untrusted_forwarding_and_forged_hosts(tmp_path: Path, root_key_b64: str) -> None:
    app = with_identity(make_app(f"sqlite:///{tmp_path / 'q.db'}", root_key_b64))
    try:
        ids_realm = "/v1/auth/realms/master" + WELL_KNOWN
        with serving(app) as url:  # no trusted proxy: X-Forwarded-Proto means nothing
            doc = requests.get(url + ids_realm, headers={"X-Forwarded-Proto": "https"}, timeout=10)
            assert doc.json()["jwks_uri"].startswith(url + "/")
            for host in ('evil.example/x"', "a b", "evil.example:80/path"):
                bad = requests.get(url + ids_realm, headers={"Host": host}, timeout=10)
                assert bad.status_code == 400, (host, bad.text)
        proxies = parse_trusted_proxies(["10.9.9.9"])
        with serving(app, trusted_proxies=proxies, require_tls_proxy=False) as url:
            doc = requests.get(url + ids_realm, headers={"X-Forwarded-Proto": "https"}, timeout=10)
            assert doc.json()["jwks_uri"].startswith("http://127.0.0.1:")  # 127.0.0.1 not trusted
    finally:
        close_app(app)


def test_issuer_base_url_fixes_the_origin(tmp_path: Path, root_key_b64: str) -> None:
    """With ``issuer_base = https://keys.example.org/v1/auth`` the issuer is exactly the
    document's base URL (as OIDC expects) and the Host header changes nothing."""
    app = with_identity(
        make_app(f"sqlite:///{tmp_path / 'q.db'}", root_key_b64),
        issuer_base="https://keys.example.org/v1/auth",
    )
    try:
        with serving(app) as url:
            doc = requests.get(
                url + "/v1/auth/realms/master" + WELL_KNOWN,
                headers={"Host": "attacker.example"},
                timeout=10,
            ).json()
        assert doc["issuer"] == "https://keys.example.org/v1/auth/realms/master"
        assert doc["jwks_uri"] == doc["issuer"] + "/jwks"
        assert doc["token_endpoint"] == doc["issuer"] + "/token"
    finally:
        close_app(app)
