"""Forged and broken access tokens for the verification and enforcement tests."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(unb64url(header)), json.loads(unb64url(payload)), signature


def alg_none(token: str) -> str:
    """Same claims, ``alg: none`` and no signature."""
    header, claims, _ = parts(token)
    header["alg"] = "none"
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def tampered(token: str, **changes: Any) -> str:
    """Same header and signature, claims edited (e.g. roles=['admin'])."""
    header, claims, signature = parts(token)
    claims.update(changes)
    head = token.split(".")[0]
    return f"{head}.{b64url(json.dumps(claims).encode())}.{signature}"


def wrong_key(token: str) -> str:
    """Same header (kid) and claims, signed by an unrelated Ed25519 key."""
    header, claims, _ = parts(token)
    return jwt.encode(
        claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": header["kid"]}
    )


def hs256_variants(token: str, jwks: dict[str, Any]) -> list[str]:
    """HS256 tokens keyed with each plausible encoding of the public key."""
    import hashlib
    import hmac

    header, claims, _ = parts(token)

    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    head = {"alg": "HS256", "typ": "JWT", "kid": header["kid"]}
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
    result = []
    for secret in (key["x"].encode(), unb64url(key["x"]), json.dumps(key).encode()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        result.append(f"{signing_input}.{b64url(mac)}")
    return result
