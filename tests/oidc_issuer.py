"""A real OpenID Connect issuer for the tests, in its own process: a stdlib HTTP server on a
free loopback port serving ``/.well-known/openid-configuration`` and its JWKS, signing
tokens with its own RSA keys (PyJWT), which it rotates on request.

Run as a script it serves (``python tests/oidc_issuer.py``; prints ``listening on PORT``);
:class:`OidcIssuer` starts it, drives it and stops it. Control endpoints (test only):
``POST /_sign {"claims": {...}, "kid"?: ...}`` → a token signed by the current (or named)
key; ``POST /_rotate {"drop_old": bool}`` → a new current key; ``GET /_stats`` → how often
the discovery document and the JWKS were fetched; ``GET /_public.pem`` → the current
public key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests


class _State:
    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.rsa = rsa
        self.lock = threading.Lock()
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.current = ""
        self.hits = {"discovery": 0, "jwks": 0}
        self.counter = 0
        self.rotate(drop_old=False)

    def rotate(self, drop_old: bool) -> str:
        with self.lock:
            self.counter += 1
            kid = f"key-{self.counter}"
            self.keys[kid] = self.rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.published = [kid] if drop_old else [*self.published, kid]
            self.current = kid
            return kid

    def jwks(self) -> dict[str, Any]:
        import jwt

        with self.lock:
            keys = []
            for kid in self.published:
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
                keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            return {"keys": keys}


def _handler(state: _State, issuer: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def _send(self, body: Any, status: int = 200, kind: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/.well-known/openid-configuration":
                state.hits["discovery"] += 1
                self._send({"issuer": issuer[0], "jwks_uri": issuer[0] + "/jwks"})
            elif self.path == "/jwks":
                state.hits["jwks"] += 1
                self._send(state.jwks())
            elif self.path == "/_stats":
                self._send(dict(state.hits))
            elif self.path == "/_public.pem":
                from cryptography.hazmat.primitives import serialization

                key = state.keys[state.current].public_key()
                pem = key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                self._send(pem, kind="application/x-pem-file")
            else:
                self._send({"error": "not found"}, 404)

        def do_POST(self) -> None:  # noqa: N802
            import jwt

            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/_sign":
                kid = body.get("kid") or state.current
                token = jwt.encode(
                    body["claims"], state.keys[kid], algorithm="RS256", headers={"kid": kid}
                )
                self._send({"token": token})
            elif self.path == "/_rotate":
                self._send({"kid": state.rotate(bool(body.get("drop_old")))})
            else:
                self._send({"error": "not found"}, 404)

    return Handler


def main() -> None:
    issuer: list[str] = [""]
    state = _State()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, issuer))
    issuer[0] = f"http://127.0.0.1:{server.server_address[1]}"
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


class OidcIssuer:
    """The issuer process: ``url`` is its issuer (and base URL); stop it with :meth:`stop`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the test issuer did not start: {line!r}")
        self.port = int(line.split()[-1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.discovery_url = self.url + "/.well-known/openid-configuration"

    def sign(self, kid: str | None = None, **claims: Any) -> str:
        """A token with ``claims`` (``exp``/``iat`` default to now + 300 / now; a claim
        given as None is left out)."""
        now = int(time.time())
        body = {"iat": now, "exp": now + 300, "iss": self.url, **claims}
        body = {k: v for k, v in body.items() if v is not None}  # None: leave the claim out
        answer = requests.post(f"{self.url}/_sign", json={"claims": body, "kid": kid}, timeout=10)
        answer.raise_for_status()
        return str(answer.json()["token"])

    def rotate(self, *, drop_old: bool = False) -> str:
        answer = requests.post(f"{self.url}/_rotate", json={"drop_old": drop_old}, timeout=30)
        return str(answer.json()["kid"])

    def stats(self) -> dict[str, int]:
        return dict(requests.get(f"{self.url}/_stats", timeout=10).json())

    def public_pem(self) -> str:
        return requests.get(f"{self.url}/_public.pem", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---- the test side: a realm trusting this issuer, tokens, the grant -------------------

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


def last_login(app: Any, realm: str = "ci") -> dict[str, Any]:
    """The newest ``login`` audit record of ``realm``."""
    from qimem.services import identity as ids

    return ids.audit_events(app, realm, limit=1, action="login")[0].to_dict()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """An attacker's token: unsigned (``secret`` None) or HS256 with ``secret``."""
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    mac = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(mac)


if __name__ == "__main__":
    main()
