"""The key cache across servers (issue 7, item 7; issue 14, item 2): two real ``qimem
serve`` processes on one store.

Polling (both stores): a rotation, a disable or a policy change made through one server is
seen by the other at its next rotation-marker check, at most ``cache.revalidate_seconds``
later, long before the cache TTL (set to 60 s here so the TTL cannot be what makes it work).

Push (PostgreSQL): with ``revalidate_seconds`` at 30 s, only ``LISTEN/NOTIFY`` can make a
change visible on the other server in time; the measured delay is printed. A killed
listener connection reconnects, and a change committed meanwhile is caught on reconnect.
The precise 50 ms checks and the targeted drops are in tests/test_invalidation.py.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serve_process import ServeProcess

REVALIDATE = 0.2
#: How long the test waits after a change: the bound plus generous slack for a loaded
#: machine (one marker query, scheduling). Still far below the 60 s TTL.
WAIT = REVALIDATE + 1.0


def _start_two(
    tmp_path: Path, url: str, root_key_b64: str, revalidate: float
) -> list[ServeProcess]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[store]\nurl = "{url}"\n\n'
        f"[cache]\nttl_seconds = 60.0\nrevalidate_seconds = {revalidate}\n",
        "utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_HOME=str(home), QIMEM_ROOT_KEY=root_key_b64)
    return [ServeProcess(tmp_path, env, name=f"serve-{i}") for i in range(2)]


@pytest.fixture(params=["sqlite", "postgres"])
def two_servers(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    servers = _start_two(tmp_path, url, root_key_b64, REVALIDATE)
    try:
        yield servers[0].wait_ready(), servers[1].wait_ready()
    finally:
        for server in servers:
            server.kill()


def _post(server: ServeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.url}{path}", json=body, timeout=20)
    assert response.status_code < 300, response.text
    return response.json()  # type: ignore[no-any-return]


def _encrypt(server: ServeProcess, key: str) -> dict[str, Any]:
    plaintext = base64.b64encode(b"hello").decode()
    return _post(server, "/v1/security/encrypt", {"key": key, "plaintext": plaintext})


def test_rotation_through_one_server_reaches_the_other(
    two_servers: tuple[ServeProcess, ServeProcess],
) -> None:
    a, b = two_servers
    _post(a, "/v1/security/keys", {"name": "shared"})
    sealed = _encrypt(b, "shared")
    assert sealed["version"] == 1
    for _ in range(3):  # B now serves version 1 from its cache
        assert _encrypt(b, "shared")["version"] == 1

    _post(a, "/v1/security/rotate", {"key": "shared"})
    time.sleep(WAIT)
    assert _encrypt(b, "shared")["version"] == 2

    # State changes travel the same way: disable version 1 through A ...
    opened = _post(b, "/v1/security/decrypt", {"envelope": sealed["envelope"]})
    assert base64.b64decode(str(opened["plaintext"])) == b"hello"
    _post(a, "/v1/security/keys/shared/disable", {"version": 1})
    time.sleep(WAIT)
    refused = requests.post(
        f"{b.url}/v1/security/decrypt", json={"envelope": sealed["envelope"]}, timeout=20
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "key_disabled"

    # ... and a second rotation too (the marker changes on every commit).
    _post(a, "/v1/security/rotate", {"key": "shared"})
    time.sleep(WAIT)
    assert _encrypt(b, "shared")["version"] == 3


# -- push: PostgreSQL LISTEN/NOTIFY ----------------------------------------------------

#: Polling this slow cannot explain anything below; only the push can.
NO_POLLING = 30.0
#: The two-process bound: the 50 ms target plus HTTP round trips and a loaded machine (the
#: precise 50 ms check is in-process, in tests/test_invalidation.py).
LOOSE = 0.5


def _listeners(url: str) -> list[int]:
    """Backend pids of the change-feed listeners connected to ``url``'s database."""
    import psycopg
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    libpq = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'qimem-invalidation'"
            " AND datname = %s",
            (parsed.database,),
        ).fetchall()
    return sorted(row[0] for row in rows)


def _terminate(url: str, pids: list[int]) -> None:
    import psycopg
    import sqlalchemy as sa

    libpq = (
        sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    with psycopg.connect(libpq, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` holds (polled as fast as the server answers); also
    prints when the request that first saw it was sent (the change was acted on between
    that and the returned figure)."""
    started = time.perf_counter()
    while True:
        sent = time.perf_counter()
        if condition():
            break
        assert sent - started < timeout, "timed out"
        time.sleep(0.002)
    print(f"  (the request that saw it was sent after {(sent - started) * 1000:.1f} ms)")
    return time.perf_counter() - started


@pytest.fixture
def pushing_servers(
    postgres_url: str, tmp_path: Path
) -> Iterator[tuple[ServeProcess, ServeProcess, str]]:
    from qimem.rootkey import encode_root_key, generate_root_key

    servers = _start_two(tmp_path, postgres_url, encode_root_key(generate_root_key()), NO_POLLING)
    try:
        a, b = servers[0].wait_ready(), servers[1].wait_ready()
        for server in (a, b):  # the first request starts each server's listener
            assert requests.get(f"{server.url}/v1/security/keys", timeout=20).status_code == 200
        _until(lambda: len(_listeners(postgres_url)) == 2)
        yield a, b, postgres_url
    finally:
        for server in servers:
            server.kill()


def test_push_reaches_the_other_server_without_polling(
    pushing_servers: tuple[ServeProcess, ServeProcess, str],
) -> None:
    a, b, _url = pushing_servers
    _post(a, "/v1/security/keys", {"name": "shared"})
    sealed = _encrypt(b, "shared")
    assert _encrypt(b, "shared")["version"] == 1  # cached on B

    _post(a, "/v1/security/rotate", {"key": "shared"})  # answered after the commit
    took = _until(lambda: _encrypt(b, "shared")["version"] == 2)
    print(f"two servers: B encrypts with v2 {took * 1000:.1f} ms after A answered the rotate")
    assert took < LOOSE

    _post(a, "/v1/security/keys/shared/disable", {"version": 1})

    def refused() -> bool:
        answer = requests.post(
            f"{b.url}/v1/security/decrypt", json={"envelope": sealed["envelope"]}, timeout=20
        )
        return answer.status_code == 422

    took = _until(refused)
    print(f"two servers: B refuses v1 {took * 1000:.1f} ms after A answered the disable")
    assert took < LOOSE


def test_killed_listeners_reconnect_and_catch_what_they_missed(
    pushing_servers: tuple[ServeProcess, ServeProcess, str],
) -> None:
    a, b, url = pushing_servers
    _post(a, "/v1/security/keys", {"name": "shared"})
    assert _encrypt(b, "shared")["version"] == 1
    before = _listeners(url)

    _terminate(url, before)
    _post(a, "/v1/security/rotate", {"key": "shared"})  # maybe while B is not listening
    took = _until(lambda: _encrypt(b, "shared")["version"] == 2)
    print(f"two servers, listeners killed: B encrypts with v2 after {took * 1000:.1f} ms")
    assert took < NO_POLLING / 10  # the reconnect's marker check, not the 30 s poll

    _until(lambda: len(after := _listeners(url)) == 2 and not set(after) & set(before))
    _post(a, "/v1/security/rotate", {"key": "shared"})
    took = _until(lambda: _encrypt(b, "shared")["version"] == 3)
    print(f"two servers, after the reconnect: B encrypts with v3 after {took * 1000:.1f} ms")
    assert took < LOOSE
    assert "Traceback" not in a.log() + b.log()


def test_each_worker_of_a_prefork_server_listens_for_itself(
    postgres_url: str, tmp_path: Path, root_key_b64: str
) -> None:
    """``qimem serve --workers 2``: the listener starts in each worker on its first request
    (after the fork), none in the master; a rotation through one worker reaches the other."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[store]\nurl = "{postgres_url}"\n\n'
        f"[cache]\nttl_seconds = 60.0\nrevalidate_seconds = {NO_POLLING}\n",
        "utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_HOME=str(home), QIMEM_ROOT_KEY=root_key_b64)
    server = ServeProcess(tmp_path, env, "--workers", "2", name="prefork").wait_ready()
    try:
        _post(server, "/v1/security/keys", {"name": "shared"})

        def both_listen() -> bool:  # new connections land on either worker
            with requests.Session() as fresh:
                fresh.get(f"{server.url}/v1/security/keys", timeout=20)
            return len(_listeners(postgres_url)) == 2

        _until(both_listen, timeout=30)
        # Both workers cache version 1 (each answers some of these, on new connections) ...
        for _ in range(20):
            assert _encrypt(server, "shared")["version"] == 1
        _post(server, "/v1/security/rotate", {"key": "shared"})
        # ... and neither serves it after the rotation, whichever did it (polling: 30 s).
        time.sleep(LOOSE)
        assert {int(_encrypt(server, "shared")["version"]) for _ in range(20)} == {2}
        assert len(_listeners(postgres_url)) == 2  # one per worker, none in the master
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def _auth_servers(
    tmp_path: Path, url: str, processes: list[ServeProcess]
) -> tuple[ServeProcess, ServeProcess]:
    """Two authenticating servers on ``url`` (``qimem init`` first), every identity cache
    and the revocation refresh at 60 s and more: only the push can explain what follows."""
    import subprocess
    import sys
    import tomllib

    import tomli_w
    from identity_helpers import ADMIN_PASSWORD
    from serve_process import home_env

    home = tmp_path / "home"
    env = home_env(home, QIMEM_STORE=url)
    init = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "init",
         "--admin-password-stdin"],
        input=ADMIN_PASSWORD + "\n", env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    config = home / "config.toml"
    doc = tomllib.loads(config.read_text())
    doc["identity"] = {
        "argon2_memory_kib": 1024,
        "argon2_time_cost": 1,
        "cache_seconds": 600.0,
        "revocation_refresh_seconds": 60.0,
    }
    doc["cache"] = {"ttl_seconds": 60.0, "revalidate_seconds": NO_POLLING}
    config.write_text(tomli_w.dumps(doc))
    config.chmod(0o600)
    for i in range(2):
        processes.append(ServeProcess(tmp_path, env, name=f"auth-{i}", insecure=False))
    return processes[-2].wait_ready(), processes[-1].wait_ready()


def test_revocation_disable_and_realm_deletion_reach_the_other_server_by_push(
    postgres_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    from identity_helpers import ADMIN_PASSWORD, password_of

    a, b = _auth_servers(tmp_path, postgres_url, processes)
    auth = "/v1/auth/realms"

    def login(server: ServeProcess, realm: str, user: str, password: str) -> str:
        answer = requests.post(
            f"{server.url}{auth}/{realm}/token",
            data={"grant_type": "password", "username": user, "password": password},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def call(server: ServeProcess, method: str, path: str, token: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        return requests.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kw)

    admin = login(a, "master", "admin", ADMIN_PASSWORD)
    assert call(a, "POST", auth, admin, json={"name": "gone"}).status_code == 201
    for realm, user in (("master", "rita"), ("master", "dora"), ("gone", "vera")):
        body = {"username": user, "password": password_of(user), "roles": ["encryptor"]}
        assert call(a, "POST", f"{auth}/{realm}/users", admin, json=body).status_code == 201
    tokens = {u: login(a, r, u, password_of(u)) for r, u in
              (("master", "rita"), ("master", "dora"), ("gone", "vera"))}  # fmt: skip
    for server in (a, b):  # the first request starts each listener
        for token in tokens.values():
            assert call(server, "GET", "/v1/security/keys", token).status_code == 200
    _until(lambda: len(_listeners(postgres_url)) == 2)

    def refused(token: str) -> Callable[[], bool]:
        return lambda: call(b, "GET", "/v1/security/keys", token).status_code == 401

    revoke = requests.post(
        f"{a.url}{auth}/master/revoke", data={"token": tokens["rita"]}, timeout=30
    )
    assert revoke.status_code == 200
    took = _until(refused(tokens["rita"]))
    print(f"two servers: B refuses a revoked token {took * 1000:.1f} ms after A answered")
    assert took < LOOSE

    patch = call(a, "PATCH", f"{auth}/master/users/dora", admin, json={"enabled": False})
    assert patch.status_code == 200, patch.text
    took = _until(refused(tokens["dora"]))
    print(f"two servers: B refuses a disabled user's token {took * 1000:.1f} ms after A answered")
    assert took < LOOSE

    assert call(a, "DELETE", f"{auth}/gone", admin).status_code == 204
    took = _until(refused(tokens["vera"]))
    print(f"two servers: B refuses a deleted realm's token {took * 1000:.1f} ms after A answered")
    assert took < LOOSE
    assert call(b, "GET", "/v1/security/keys", admin).status_code == 200  # the rest still works
