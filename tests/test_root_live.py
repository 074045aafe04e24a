"""Root rotation under load (issue 18 part 4): two real ``qimem serve`` processes on one
PostgreSQL store keep encrypting, decrypting and creating keys while ``qimem root rotate``
runs from the CLI. No request fails, every envelope made before or during the rotation
decrypts on both servers afterwards, and both servers wrap under the new root version
without a restart (no row is left on the old version once the rotation has finished, and
keys they create afterwards are under the new one)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import root_helpers as rh
from serve_process import ServeProcess, home_env

from qimem.rootkey import encode_root_key, generate_root_key

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = requests.post(f"{base}{path}", json=body, timeout=30)
    if answer.status_code not in (200, 201):
        raise AssertionError(f"{path}: {answer.status_code} {answer.text[:300]}")
    return answer.json()  # type: ignore[no-any-return]


def _encrypt(base: str, key: str, plaintext: bytes) -> str:
    body = {"key": key, "plaintext": base64.b64encode(plaintext).decode()}
    return str(_post(base, "/v1/security/encrypt", body)["envelope"])


def _decrypt(base: str, envelope: str) -> bytes:
    return base64.b64decode(
        _post(base, "/v1/security/decrypt", {"envelope": envelope})["plaintext"]
    )


@pytest.fixture
def servers(postgres_url: str, tmp_path: Path) -> Iterator[tuple[str, str, list[str], Any]]:
    """Two servers on one populated PostgreSQL store: their URLs, the key, and a context."""
    key = encode_root_key(generate_root_key())
    mp = pytest.MonkeyPatch()
    app = rh.env_app(postgres_url, key, mp)
    try:
        world = rh.populate(app)
    finally:
        rh.close(app)
    env = home_env(tmp_path / "home", QIMEM_ROOT_KEY=key, QIMEM_STORE=postgres_url)
    (tmp_path / "home").mkdir()
    started = [ServeProcess(tmp_path, env, name=f"serve-{i}") for i in range(2)]
    try:
        for server in started:
            server.wait_ready()
        yield postgres_url, key, [s.url for s in started], world
    finally:
        for server in started:
            server.stop()
        mp.undo()


def test_rotation_while_two_servers_serve(
    servers: tuple[str, str, list[str], Any], tmp_path: Path
) -> None:
    url, key, bases, world = servers
    for base in bases:  # both serve before the rotation
        assert _decrypt(base, _encrypt(base, "enc", b"warm")) == b"warm"
    sealed: list[tuple[bytes, str]] = []
    errors: list[str] = []
    created: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            here, there = bases[worker % 2], bases[(worker + 1) % 2]
            try:
                plaintext = f"w{worker} {i}".encode()
                if i % 5 == 0:  # new wrapped rows, from either server
                    name = f"live-{worker}-{i}"
                    _post(here, "/v1/security/keys", {"name": name})
                    with lock:
                        created.append(name)
                    envelope = _encrypt(here, name, plaintext)
                else:
                    envelope = _encrypt(here, "enc", plaintext)
                assert _decrypt(there, envelope) == plaintext  # the other server opens it
                with lock:
                    sealed.append((plaintext, envelope))
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        config = rh.write_config(tmp_path, url)
        done = rh.qimem_cli(config, "root", "rotate", "--json", QIMEM_ROOT_KEY=key)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["active"] == 2 and report["retired"] == [1]
    assert not errors, errors[:5]
    assert len(created) >= 4 and len(sealed) >= 20, (len(created), len(sealed))
    # Every envelope made before or during the rotation opens on both servers.
    for plaintext, envelope in sealed:
        for base in bases:
            assert _decrypt(base, envelope) == plaintext
    # Both servers now wrap under version 2 (no restart): keys made now are under it, and
    # each decrypts the other's.
    for n, base in enumerate(bases):
        _post(base, "/v1/security/keys", {"name": f"after-{n}"})
    for n, base in enumerate(bases):
        other = bases[1 - n]
        assert _decrypt(other, _encrypt(base, f"after-{n}", b"after")) == b"after"
    counts = rh.rows_by_version(url)
    assert all(set(c) <= {2} for c in counts.values()), counts
    # Once more over HTTP (the runner in a real server process; loopback, no auth): the
    # other server follows too.
    answer = requests.post(f"{bases[0]}/v1/root/rotate", timeout=30)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 60
    while (status := requests.get(f"{bases[0]}/v1/root/status", timeout=30).json())["rotation"][
        "state"
    ] == "running":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["rotation"]["state"] == "succeeded", status["rotation"]
    assert status["root"]["active"] == 3
    time.sleep(1.2)  # REFRESH_SECONDS: the other server has read the keyring since
    _post(bases[1], "/v1/security/keys", {"name": "after-http"})
    assert _decrypt(bases[0], _encrypt(bases[1], "after-http", b"3")) == b"3"
    counts = rh.rows_by_version(url)
    assert all(set(c) <= {3} for c in counts.values()), counts
    app = rh.env_app(url, key)  # QIMEM_ROOT_KEY is the fixture's (monkeypatched)
    try:
        state = rh.versions_state(app)
        assert state[1] == state[2] == ("retired", 0) and state[3][0] == "active"
        world.check(app)
    finally:
        rh.close(app)
