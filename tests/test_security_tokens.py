"""Finding 8 (issue 12): disabling a user, changing his password or revoking his role must
stop the access tokens he already holds: the API refuses them and introspection says
inactive, at once on the server that made the change and within
``revocation_refresh_seconds`` on every other server of the same database."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from identity_helpers import (
    ADMIN_PASSWORD,
    STORES,
    add_user,
    close_app,
    identity_app,
    password_login,
    password_of,
    raw_sql,
    serving,
    store_url,
)

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.identity import Identity
from qimem.services import identity as ids

REFRESH = 0.2  # revocation_refresh_seconds of the second server


@pytest.fixture(params=STORES)
def live(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[str, AppContext, str]]:
    url = store_url(request, tmp_path, request.param)
    app = identity_app(url, root_key_b64)
    ids.create_realm(app, "acme")
    add_user(app, "acme", "alice", ["key-manager"])
    with serving(app) as base:
        yield base, app, url
    close_app(app)


@contextlib.contextmanager
def another_server(url: str, root_key_b64: str) -> Iterator[Identity]:
    """The identity of a second server on the same database, re-reading revocations and
    cut-offs every :data:`REFRESH` seconds."""
    other = identity_app(url, root_key_b64, revocation_refresh_seconds=REFRESH)
    try:
        yield ids.identity(other)
    finally:
        close_app(other)


def _after_a_refresh() -> None:
    time.sleep(REFRESH + 0.5)


def _token(app: AppContext, user: str = "alice") -> str:
    return str(password_login(app, "acme", user, password_of(user)).access_token)


def _admin(base: str) -> dict[str, str]:
    body = requests.post(
        f"{base}/v1/auth/realms/master/token",
        data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        timeout=10,
    ).json()
    return {"Authorization": f"Bearer {body['access_token']}"}


def _keys_status(base: str, token: str) -> int:
    return requests.get(
        f"{base}/v1/security/keys",
        headers={"Authorization": f"Bearer {token}"},
        params={"realm": "acme"},
        timeout=10,
    ).status_code


def _active(base: str, admin: dict[str, str], token: str) -> bool:
    answer = requests.post(
        f"{base}/v1/auth/realms/acme/introspect", data={"token": token}, headers=admin, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["active"])


def _users(base: str) -> str:
    return f"{base}/v1/auth/realms/acme/users"


@pytest.mark.parametrize("change", ["disable", "password", "role_revoke"])
def test_finding8_user_change_stops_his_access_tokens(
    live: tuple[str, AppContext, str], change: str
) -> None:
    base, app, _ = live
    admin = _admin(base)
    token = _token(app)
    assert _keys_status(base, token) == 200  # used once: now in the verified-token cache
    assert _active(base, admin, token)
    if change == "disable":
        body: dict[str, object] = {"enabled": False}
        answer = requests.patch(f"{_users(base)}/alice", json=body, headers=admin, timeout=10)
    elif change == "password":
        body = {"password": "tundra-falcon-orbit-2208"}
        answer = requests.patch(f"{_users(base)}/alice", json=body, headers=admin, timeout=10)
    else:
        answer = requests.delete(
            f"{_users(base)}/alice/roles", json={"role": "key-manager"}, headers=admin, timeout=10
        )
    assert answer.status_code == 200, answer.text
    assert _keys_status(base, token) == 401
    assert not _active(base, admin, token)
    if change == "password":  # the new password gives a working token at once
        fresh = password_login(app, "acme", "alice", "tundra-falcon-orbit-2208").access_token
        assert _keys_status(base, fresh) == 200 and _active(base, admin, fresh)
    if change == "role_revoke":  # a new login works, without the role
        fresh = _token(app)
        assert _active(base, admin, fresh)
        assert _keys_status(base, fresh) == 403


def test_finding8_enable_again_does_not_revive_old_tokens(
    live: tuple[str, AppContext, str],
) -> None:
    base, app, _ = live
    token = _token(app)
    ids.set_user_enabled(app, "acme", "alice", False)
    ids.set_user_enabled(app, "acme", "alice", True)
    assert _keys_status(base, token) == 401
    assert _keys_status(base, _token(app)) == 200


def test_finding8_other_server_refuses_within_the_refresh_bound(
    live: tuple[str, AppContext, str], root_key_b64: str
) -> None:
    """A second server (its own identity, caches and connection pool) on the same database
    refuses the token within ``revocation_refresh_seconds`` (0.2 s here)."""
    base, app, url = live
    with another_server(url, root_key_b64) as ident:
        token = _token(app)
        assert ident.authenticate(token).username == "alice"  # cached there now
        assert ident.introspect("acme", token)["active"] is True
        ids.set_user_enabled(app, "acme", "alice", False)  # through the first server
        _after_a_refresh()
        with pytest.raises(AuthError):
            ident.authenticate(token)
        assert ident.introspect("acme", token) == {"active": False}


def test_finding8_a_database_writer_cannot_lift_a_cut_off_a_server_has_seen(
    live: tuple[str, AppContext, str], root_key_b64: str
) -> None:
    """Lowering ``tokens_valid_after`` by SQL does not revive the tokens on a server that
    has seen the cut-off (and the user's row no longer verifies: finding 15)."""
    _, app, url = live
    with another_server(url, root_key_b64) as ident:
        token = _token(app)
        ids.set_user_enabled(app, "acme", "alice", False)
        _after_a_refresh()
        with pytest.raises(AuthError):
            ident.authenticate(token)
        raw_sql(url, "UPDATE qimem_users SET tokens_valid_after = 0 WHERE username = 'alice'")
        _after_a_refresh()
        with pytest.raises(AuthError):
            ident.authenticate(token)
        assert ident.introspect("acme", token) == {"active": False}
