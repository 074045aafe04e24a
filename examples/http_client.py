"""A small client of the qimem HTTP API, with ``requests``.

Start a server, then run this script::

    qimem init
    qimem serve --insecure-no-auth &          # local development: no tokens, loopback only
    python examples/http_client.py --url http://127.0.0.1:8080

Against a server that requires tokens, pass ``--token`` (or set ``QIMEM_TOKEN``) with an
access token from ``POST /v1/auth/realms/{realm}/token`` (see docs/identity.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import uuid
from typing import Any

import requests


class QimemError(Exception):
    """An error answer of the API: ``{"error": {"code", "message"}}`` and its status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class QimemClient:
    """The /v1/security API. Binary values go in and come out as ``bytes``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, self.url + path, json=body, timeout=self.timeout)
        data = response.json()
        if response.status_code >= 400:
            error = data["error"]
            raise QimemError(response.status_code, error["code"], error["message"])
        return data

    def create_key(self, name: str | None = None, algorithm: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/v1/security/keys", {"name": name, "algorithm": algorithm})

    def list_keys(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/security/keys")["keys"]

    def show_key(self, ref: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/security/keys/{ref}")

    def rotate(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", "/v1/security/rotate", {"key_id": key_id})

    def encrypt(self, key: str, plaintext: bytes, aad: bytes | None = None) -> bytes:
        body = {"key": key, "plaintext": _b64(plaintext), "aad": _b64(aad) if aad else None}
        return base64.b64decode(self._call("POST", "/v1/security/encrypt", body)["envelope"])

    def decrypt(self, envelope: bytes, aad: bytes | None = None) -> bytes:
        body = {"envelope": _b64(envelope), "aad": _b64(aad) if aad else None}
        return base64.b64decode(self._call("POST", "/v1/security/decrypt", body)["plaintext"])

    def encrypt_many(self, key: str, plaintexts: list[bytes]) -> list[bytes | QimemError]:
        """One request for many values; each item is an envelope or its own error."""
        items = [{"key": key, "plaintext": _b64(p)} for p in plaintexts]
        results = self._call("POST", "/v1/security/encrypt", {"items": items})["items"]
        return [
            QimemError(200, r["error"]["code"], r["error"]["message"])
            if "error" in r
            else base64.b64decode(r["envelope"])
            for r in results
        ]

    def rewrap(self, envelope: bytes, aad: bytes | None = None) -> bytes:
        body = {"envelope": _b64(envelope), "aad": _b64(aad) if aad else None}
        return base64.b64decode(self._call("POST", "/v1/security/rewrap", body)["envelope"])

    def datakey(self, key: str) -> tuple[bytes, bytes]:
        """A fresh data key: ``(plaintext_key, wrapped_key)``; decrypt the wrapped one later."""
        data = self._call("POST", "/v1/security/datakey", {"key": key})
        return base64.b64decode(data["plaintext_key"]), base64.b64decode(data["wrapped_key"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def main(url: str, token: str | None = None) -> None:
    """Create a key, encrypt, rotate, rewrap and decrypt; print what happens."""
    client = QimemClient(url, token)
    name = f"example-{uuid.uuid4().hex[:8]}"
    key = client.create_key(name=name)
    print(f"created {name}: key_id {key['key_id']} (version {key['version']})")

    envelope = client.encrypt(name, b"card 4111-1111", aad=b"customer-7")
    print(f"encrypted into a {len(envelope)}-byte envelope")
    assert client.decrypt(envelope, aad=b"customer-7") == b"card 4111-1111"

    try:
        client.decrypt(envelope, aad=b"customer-8")
    except QimemError as exc:
        print(f"wrong aad refused: {exc.status} {exc.code}")

    rotated = client.rotate(key["key_id"])
    print(f"rotated: version {rotated['version']} is active")
    try:
        client.rotate(key["key_id"])
    except QimemError as exc:
        print(f"rotating the old key_id again: {exc.status} {exc.code}")

    rewrapped = client.rewrap(envelope, aad=b"customer-7")
    assert client.decrypt(rewrapped, aad=b"customer-7") == b"card 4111-1111"
    print("rewrapped the old envelope under the new version")

    results = client.encrypt_many(name, [b"a", b"b", b"c"])
    print(f"batch: {sum(isinstance(r, bytes) for r in results)} of {len(results)} encrypted")

    plain_key, wrapped_key = client.datakey(name)
    assert client.decrypt(wrapped_key) == plain_key
    print(f"data key: {len(plain_key)} bytes, wrapped in {len(wrapped_key)}")

    versions = [v["version"] for v in client.show_key(name)["versions"]]
    print(f"{name} has versions {versions}; {len(client.list_keys())} key(s) in the realm")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default=os.environ.get("QIMEM_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("QIMEM_TOKEN"))
    args = parser.parse_args()
    main(args.url, args.token)
