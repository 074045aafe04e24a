"""The attacker who can ``NOTIFY``: anyone who may connect to the database can send on
``qimem_invalidate``. Forged, garbage or oversized notices must neither crash a server's
listener nor make it drop more than a safe revalidation would (which here drops nothing),
nor admit anything; and the notices qimem sends carry identifiers only, never key
material, token strings or passwords (captured by a test ``LISTEN`` connection)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from identity_helpers import add_user, password_of
from invalidation_helpers import (
    BOUND,
    acted_within,
    entry_gone,
    feed_of,
    key_version,
    libpq,
    login_as,
    pushing_pair,
    wait,
)

from qimem import invalidation, services
from qimem.app import AppContext
from qimem.invalidation import CHANNEL, Change, parse
from qimem.keys import DEFAULT_REALM
from qimem.services import identity as ids
from qimem.services import key_states, lifecycle


@pytest.fixture
def pair(postgres_url: str, root_key_b64: str) -> Iterator[tuple[AppContext, AppContext]]:
    with pushing_pair(postgres_url, root_key_b64) as apps:
        yield apps


# -- the attacker who can NOTIFY -------------------------------------------------------


@pytest.fixture
def attacker(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection as another database user (no rights on qimem's tables) who may
    ``NOTIFY`` on the database (anyone who can connect can)."""
    role = f"qimem_attacker_{int(time.time() * 1000) % 10**8}"
    admin_url = libpq(postgres_url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    url = sa.engine.make_url(admin_url).set(username=role).render_as_string(hide_password=False)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


FORGED = [
    "",
    "not json",
    "{",
    "[" * 5000 + "]" * 5000,  # deep nesting
    "x" * 7999,  # PostgreSQL's limit is 8000 bytes
    json.dumps({"v": 1, "k": "lineage", "r": "default", "i": "z" * 600}),
    json.dumps({"v": 2, "k": "lineage", "r": "default", "i": "x"}),
    json.dumps({"v": 1, "k": "drop_everything", "r": "default"}),
    json.dumps({"v": 1, "k": "token", "r": 5, "i": ["a"]}),
    json.dumps({"v": 1, "k": "realm"}),
    "\u0000\ufffd",
    json.dumps([1, 2, 3]),
    '{"v": 1e999999}',
]


def test_forged_notices_neither_crash_the_listener_nor_drop_unrelated_entries(
    pair: tuple[AppContext, AppContext], attacker: psycopg.Connection[Any]
) -> None:
    a, b = pair
    services.create_key(a, name="x")
    assert key_version(b, "x") == 1
    entry = b.cache.for_encrypt(DEFAULT_REALM, "x")
    add_user(a, "master", "tess", ["encryptor"])
    token = login_as(a, "tess").access_token
    principal = ids.authenticate(b, token)
    feed = feed_of(b)
    pid, connects = feed.backend_pid, feed.connects
    received = invalidation.subscription(b).invalidator.received_count  # type: ignore[union-attr]

    for payload in FORGED:
        try:
            attacker.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        except psycopg.Error:  # PostgreSQL itself refused it (e.g. a NUL byte)
            pass
    # Forged notices that parse: a hint only. A token/user notice makes B re-read the row
    # it names, which says the token is not revoked and the user not cut off.
    for forged in (
        Change("token", "master", principal.token_id or ""),
        Change("user", "", principal.subject),
        Change("realm", "nosuchrealm"),
    ):
        attacker.execute("SELECT pg_notify(%s, %s)", (CHANNEL, forged.encode()))
    invalidator = invalidation.subscription(b).invalidator  # type: ignore[union-attr]
    wait(lambda: invalidator.handled_count >= received + 13)

    assert feed.backend_pid == pid and feed.connects == connects and b.cache.pushing
    # The safe full revalidation compared the rotation marker: unchanged, nothing dropped.
    assert key_version(b, "x") == 1
    assert b.cache.for_encrypt(DEFAULT_REALM, "x") is entry
    assert ids.authenticate(b, token).username == "tess"
    # ... and real changes still arrive at once.
    took = acted_within(entry_gone(b, "x"), lambda: services.rotate_key(a, "x"), a)
    assert took < BOUND
    assert key_version(b, "x") == 2


def test_notices_carry_identifiers_only(
    pair: tuple[AppContext, AppContext], postgres_url: str
) -> None:
    a, b = pair
    captured: list[str] = []
    with psycopg.connect(libpq(postgres_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        services.create_key(a, name="secretive")
        sealed = services.encrypt(a, "secretive", b"plaintext-to-spot").envelope
        services.rotate_key(a, "secretive")
        key_states.disable_version(a, "secretive", version=1)
        lifecycle.set_policy(a, "secretive", min_decryption_version=2)
        key_states.destroy_version(a, "secretive", version=1)
        add_user(a, "master", "pia", ["encryptor"])
        login = login_as(a, "pia")
        ids.revoke(a, "master", login.access_token)
        ids.set_password(a, "master", "pia", "another-long-passphrase-77")
        ids.set_user_enabled(a, "master", "pia", False)
        ids.create_realm(a, "brief")
        ids.delete_realm(a, "brief")
        deadline = time.monotonic() + 5
        while len(captured) < 8 and time.monotonic() < deadline:
            captured.extend(n.payload for n in listener.notifies(timeout=0.2))

    kinds = [json.loads(p)["k"] for p in captured]
    assert kinds.count("lineage") == 3 and kinds.count("rotation") == 1
    assert "token" in kinds and "user" in kinds
    assert "realm" in kinds
    secrets = [
        login.access_token,
        login.refresh_token or "",
        password_of("pia"),
        "another-long-passphrase-77",
        base64.b64encode(sealed).decode()[:24],
        "plaintext-to-spot",
    ]
    for payload in captured:
        change = parse(payload)
        assert change is not None and len(payload) < 200, payload
        assert set(json.loads(payload)) <= {"v", "k", "r", "i", "m"}
        for secret in secrets:
            assert secret not in payload
    del b
