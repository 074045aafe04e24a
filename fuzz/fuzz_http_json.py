"""Fuzz target: request bodies of every body-taking endpoint, through the real Falcon app.

The app is the unified server (``create_app``, authentication on, short paths too) over the
fuzz key store, called in-process with :class:`falcon.testing.TestClient`. An input is::

    byte 0     bits 0-5: the endpoint (index into ENDPOINTS, modulo its length)
               bit 6:    send the scoped user's token instead of the admin's
               bit 7:    Content-Type form-urlencoded instead of application/json
    bytes 1..  the request body

The scoped user holds ``key-manager``, ``encryptor`` and the signing and MAC permissions
only for keys named ``fuzz-*`` (``fuzz-sign`` is an Ed25519 key, ``fuzz-mac`` an HMAC one), so
the authorization middleware reads the body itself (to find the key names) before the
resource does: both parsers see every body.

Contract checked for every input: the status is below 500; an error answer is exactly
``{"error": {"code": str, "message": str}}``; a success answer is JSON (or empty for 204).

The store is long-lived (requests change it: keys are created, rotated, disabled), so a
crash found late may depend on earlier inputs; :func:`reset` starts over every
:data:`RESET_EVERY` inputs to bound that and the memory the store grows to.
"""

from __future__ import annotations

import json
from typing import Any

from _fuzzlib import REALM, open_app
from falcon import testing

from qimem import services
from qimem.app import AppContext
from qimem.identity import IdentitySettings
from qimem.server.app import create_app
from qimem.services import identity as ids

#: (method, path) of every endpoint that reads a request body. Export is left out: each
#: success costs an Argon2id at 64 MiB (it is covered by the property tests instead).
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/security/keys"),
    ("POST", "/v1/security/encrypt"),
    ("POST", "/v1/security/decrypt"),
    ("POST", "/v1/security/rotate"),
    ("POST", "/v1/security/rewrap"),
    ("POST", "/v1/security/datakey"),
    ("POST", "/v1/security/keys/fuzz-gone/policy"),
    ("POST", "/v1/security/keys/fuzz-gone/disable"),
    ("POST", "/v1/security/keys/fuzz-gone/enable"),
    ("POST", "/v1/security/keys/fuzz-gone/destroy"),
    ("POST", "/v1/security/keys/fuzz-gone/schedule-deletion"),
    ("POST", "/v1/security/keys/fuzz-gone/cancel-deletion"),
    ("POST", "/v1/security/import"),
    ("POST", "/v1/plugins"),
    ("POST", "/v1/auth/realms"),
    ("POST", f"/v1/auth/realms/{REALM}/users"),
    ("PATCH", f"/v1/auth/realms/{REALM}/users/fuzzer"),
    ("POST", f"/v1/auth/realms/{REALM}/users/fuzzer/roles"),
    ("DELETE", f"/v1/auth/realms/{REALM}/users/fuzzer/roles"),
    ("POST", f"/v1/auth/realms/{REALM}/roles"),
    ("POST", f"/v1/auth/realms/{REALM}/clients"),
    ("POST", f"/v1/auth/realms/{REALM}/token"),
    ("POST", f"/v1/auth/realms/{REALM}/revoke"),
    ("POST", f"/v1/auth/realms/{REALM}/introspect"),
    ("POST", "/keys"),
    ("POST", "/encrypt"),
    ("POST", "/decrypt"),
    ("POST", "/rotate"),
    ("POST", "/v1/security/sign"),
    ("POST", "/v1/security/verify"),
    ("POST", "/v1/security/mac"),
    ("POST", "/v1/security/verify-mac"),
    ("POST", "/v1/security/random"),
    ("POST", "/v1/security/hash"),
)
SCOPED = 0x40
FORM = 0x80
RESET_EVERY = 2000
#: Argon2 at 1 MiB / t=1 so that user creation and logins stay cheap; long-lived tokens
#: and a high lockout threshold so that fuzzed logins cannot lock the harness out.
SETTINGS = IdentitySettings(
    argon2_memory_kib=1024,
    argon2_time_cost=1,
    argon2_parallelism=1,
    access_token_ttl=7 * 24 * 3600,
    lockout_threshold=1_000_000,
    audit_key_operations=False,
)


class _Harness:
    def __init__(self) -> None:
        self.app: AppContext = open_app()
        ids.configure(self.app, SETTINGS)
        ids.bootstrap(self.app, "vault-orchid-meadow-71")
        ids.add_user(self.app, REALM, "fuzzer", "harbor-ember-violet-29")
        ids.add_user(self.app, REALM, "scoped", "glacier-pivot-64")
        ids.create_role(
            self.app,
            REALM,
            "fuzz-signer",
            ["keys:sign", "keys:verify", "keys:mac", "keys:verify-mac"],
        )
        for role in ("key-manager", "encryptor", "fuzz-signer"):
            ids.grant_role(self.app, REALM, "scoped", role, "fuzz-*")
        for name, algorithm in (("fuzz-sign", "ed25519"), ("fuzz-mac", "hmac-sha256")):
            services.create_key(self.app, name=name, algorithm=algorithm, realm=REALM)
        self.tokens = {
            False: ids.mint_token(self.app, REALM, "admin").access_token,
            True: ids.mint_token(self.app, REALM, "scoped").access_token,
        }
        self.client = testing.TestClient(create_app(self.app, short_paths=True))
        self.count = 0

    def close(self) -> None:
        ids.close_identity(self.app)
        self.app.close()


_harness: _Harness | None = None


def reset() -> None:
    """Start over with a fresh store, users and tokens."""
    global _harness
    if _harness is not None:
        _harness.close()
    _harness = _Harness()


def request(data: bytes) -> testing.Result:
    """Send one fuzz input to the app (see the module docstring for the layout)."""
    if _harness is None or _harness.count >= RESET_EVERY:
        reset()
    assert _harness is not None
    _harness.count += 1
    selector = data[0] if data else 0
    method, path = ENDPOINTS[(selector & 0x3F) % len(ENDPOINTS)]
    content_type = "application/x-www-form-urlencoded" if selector & FORM else "application/json"
    return _harness.client.simulate_request(
        method,
        path,
        body=data[1:],
        headers={
            "Content-Type": content_type,
            "Authorization": f"Bearer {_harness.tokens[bool(selector & SCOPED)]}",
        },
    )


def check_response(result: testing.Result) -> Any:
    """The HTTP contract of one answer; returns the parsed body."""
    assert result.status_code < 500, f"{result.status_code}: {result.text[:300]}"
    if result.status_code == 204:
        assert result.content == b""
        return None
    assert result.headers.get("content-type", "").startswith("application/json")
    body = json.loads(result.content)
    if result.status_code >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message"}, body
        assert isinstance(error["code"], str) and error["code"]
        assert isinstance(error["message"], str) and error["message"]
    return body


def test_one_input(data: bytes) -> None:
    """One fuzz input: an endpoint selector byte and a request body."""
    check_response(request(data))
