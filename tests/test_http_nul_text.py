"""A NUL character (U+0000) in any text a request names — a username, a client id, a realm
or key name in the path or the body — is a clear 4xx on every store, never a 500.
PostgreSQL cannot hold NUL in text at all (psycopg refuses to send it); found by this
session's red team on the token endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from identity_helpers import (
    ADMIN_PASSWORD,
    STORES,
    close_app,
    identity_app,
    serving,
    store_url,
)

from qimem.services import identity as ids

A = "/v1/auth/realms"


@pytest.fixture(params=STORES)
def server(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[str, str]]:
    app = identity_app(store_url(request, tmp_path, request.param), root_key_b64)
    ids.create_realm(app, "acme")
    try:
        with serving(app) as url:
            token = requests.post(
                f"{url}{A}/master/token",
                data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
                timeout=30,
            ).json()["access_token"]
            yield url, token
    finally:
        close_app(app)


def answer(method: str, url: str, token: str | None = None, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, url, headers=headers, timeout=30, **kwargs)


def test_nul_in_login_names_is_the_uniform_refusal(server: tuple[str, str]) -> None:
    url, _ = server
    for form, code in (
        ({"grant_type": "password", "username": "ad\x00min", "password": ADMIN_PASSWORD}, "grant"),
        (
            {"grant_type": "client_credentials", "client_id": "c\x00", "client_secret": "s"},
            "client",
        ),
    ):
        got = answer("POST", f"{url}{A}/master/token", data=form)
        assert got.status_code == 401, got.text
        assert got.json()["error"]["code"] == f"invalid_{code}"
    got = answer("POST", f"{url}{A}/mas%00ter/token", data={"grant_type": "password",
                 "username": "admin", "password": ADMIN_PASSWORD})  # fmt: skip
    assert got.status_code in (400, 401, 404), got.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/security/keys", {"name": "pay\u0000roll"}),
        ("POST", "/v1/security/encrypt", {"key": "pay\u0000roll", "plaintext": "aGk="}),
        ("POST", "/v1/security/rotate", {"key": "k\u0000"}),
        ("GET", "/v1/security/keys/k%00", None),
        ("POST", f"{A}/acme/users", {"username": "u\u0000", "password": "long-enough-pass-1"}),
        ("POST", f"{A}", {"name": "re\u0000alm"}),
        ("GET", f"{A}/ac%00me/users", None),
    ],
)
def test_nul_anywhere_else_is_a_4xx(
    server: tuple[str, str], method: str, path: str, body: Any
) -> None:
    url, token = server
    got = answer(method, f"{url}{path}", token, json=body)
    assert 400 <= got.status_code < 500, (got.status_code, got.text)
    assert got.json()["error"]["code"] != "internal_error"


def test_revoking_a_token_with_nul_is_the_usual_answer(server: tuple[str, str]) -> None:
    """RFC 7009: an unknown token is "revoked" (200), whatever it holds."""
    url, token = server
    got = answer("POST", f"{url}{A}/acme/revoke", token, data={"token": "t\x00"})
    assert got.status_code == 200, got.text
