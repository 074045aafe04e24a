"""Cross-server cache invalidation pushed by PostgreSQL (issue 14, item 2).

Two application contexts on one real PostgreSQL database, each with its own change feed
(``LISTEN qimem_invalidate`` on a connection of its own), stand for two servers: a change
committed through A must be acted on by B within 50 ms, and drop exactly what it affects.
Polling is set far out of reach (``revalidate_seconds`` 30 s, revocation refresh and
identity caches 60 s, key cache TTL 60 s) so only the push can make these pass. The
attacker is another database user who may ``NOTIFY`` on the channel; two real ``qimem
serve`` processes repeat the key changes end to end (tests/test_cache_cross_server.py).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import make_app
from identity_helpers import add_user, password_login, password_of, with_identity

from qimem import invalidation, services
from qimem.app import AppContext
from qimem.errors import AuthError, QimemError
from qimem.invalidation import CHANNEL, Change, parse
from qimem.keys import DEFAULT_REALM
from qimem.services import identity as ids
from qimem.services import key_states, lifecycle

#: The target: another server acts on a change within this many seconds of its commit.
BOUND = 0.050
#: Far beyond every test: only the push can make a change visible in time.
SLOW = dict(cache_ttl=60.0, cache_revalidate=30.0)
SLOW_IDENTITY = dict(revocation_refresh_seconds=60.0, cache_seconds=60.0)


def _libpq(url: str) -> str:
    return (
        sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _pushing(app: AppContext) -> bool:
    return app.cache.pushing


def _feed(app: AppContext) -> Any:
    found = invalidation.subscription(app)
    assert found is not None
    return found.feed


def _open(url: str, root_key_b64: str, *, identity: bool = True, **config: Any) -> AppContext:
    app = make_app(url, root_key_b64, **{**SLOW, **config})
    if identity:
        with_identity(app, **SLOW_IDENTITY)
    return app


@pytest.fixture
def pair(postgres_url: str, root_key_b64: str) -> Iterator[tuple[AppContext, AppContext]]:
    """Servers A and B on one PostgreSQL database, both subscribed and pushing."""
    a = _open(postgres_url, root_key_b64)
    b = _open(postgres_url, root_key_b64)
    try:
        for app in (a, b):
            assert invalidation.subscribe(app) is not None
        _wait(lambda: _pushing(a) and _pushing(b))
        yield a, b
    finally:
        for app in (a, b):
            invalidation.unsubscribe(app)
            ids.close_identity(app)
            app.close()


def _acted_within(
    check: Callable[[], bool], change: Callable[[], object], writer: AppContext, notice: bool = True
) -> float:
    """Seconds from the COMMIT of ``writer``'s transaction that sent a change notice in
    ``change()`` (taken just before the commit is sent, so its round trip counts; with
    ``notice=False``, from just before ``change()``) until ``check()`` holds on the other
    server, polled in a tight loop."""
    engine = writer.store.engine  # type: ignore[attr-defined]
    notifying: set[int] = set()
    commits: list[float] = []

    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_notify" in statement:
            notifying.add(id(conn))

    def committed(conn: Any) -> None:
        if id(conn) in notifying:
            notifying.discard(id(conn))
            commits.append(time.perf_counter())

    sa.event.listen(engine, "before_cursor_execute", executed)
    sa.event.listen(engine, "commit", committed)
    started = time.perf_counter()
    try:
        change()
    finally:
        sa.event.remove(engine, "before_cursor_execute", executed)
        sa.event.remove(engine, "commit", committed)
    assert commits or not notice, "the change sent no notice"
    while not check():
        assert time.perf_counter() - started < 5.0, "the change never reached the other server"
        time.sleep(0.0005)
    done = time.perf_counter()
    if not notice:
        return done - started
    print(f"  (the call took {(commits[0] - started) * 1000:.1f} ms up to its commit)")
    return done - commits[0]


def _dropped(app: AppContext, name: str) -> Callable[[], bool]:
    """Whether ``app`` no longer holds an encryption entry for key ``name``."""
    return lambda: app.cache.for_encrypt(DEFAULT_REALM, name) is None


def _dropped_for(app: AppContext, envelope: bytes) -> Callable[[], bool]:
    """Whether ``app`` no longer holds the decryption entry of ``envelope``'s version."""
    from qimem.envelope import PREFIX_SIZE

    return lambda: app.cache.for_decrypt(DEFAULT_REALM, envelope[:PREFIX_SIZE]) is None


def _version(app: AppContext, name: str) -> int:
    return services.encrypt(app, name, b"x").version


def _refused(action: Callable[[], object]) -> bool:
    try:
        action()
    except QimemError:
        return True
    return False


# -- keys ------------------------------------------------------------------------------


def test_rotation_reaches_the_other_server_within_50ms_and_drops_only_its_lineage(
    pair: tuple[AppContext, AppContext],
) -> None:
    a, b = pair
    services.create_key(a, name="x")
    services.create_key(a, name="y")
    assert _version(b, "x") == 1 and _version(b, "y") == 1  # both cached on B
    sealed_y = services.encrypt(b, "y", b"kept").envelope
    entry_y = b.cache.for_encrypt(DEFAULT_REALM, "y")
    assert entry_y is not None
    dropped = b.cache.dropped

    took = _acted_within(_dropped(b, "x"), lambda: services.rotate_key(a, "x"), a)
    print(f"rotation: B dropped v1 {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert _version(b, "x") == 2

    # Targeted: y's entry is the very same object, still valid; only x's went.
    assert b.cache.for_encrypt(DEFAULT_REALM, "y") is entry_y
    assert services.decrypt(b, sealed_y).plaintext == b"kept"
    assert b.cache.dropped - dropped <= 2  # x's by-ref and by-prefix entries, nothing else


def test_disable_destroy_and_policy_reach_the_other_server_within_50ms(
    pair: tuple[AppContext, AppContext],
) -> None:
    a, b = pair
    services.create_key(a, name="k")
    first = services.encrypt(b, "k", b"one").envelope
    services.rotate_key(a, "k")
    _wait(lambda: _version(b, "k") == 2)
    second = services.encrypt(b, "k", b"two").envelope
    third = services.encrypt(b, "k", b"three").envelope
    assert services.decrypt(b, first).plaintext == b"one"  # v1 cached for decryption on B

    took = _acted_within(
        _dropped_for(b, first), lambda: key_states.disable_version(a, "k", version=1), a
    )
    print(f"disable: B dropped v1 {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert _refused(lambda: services.decrypt(b, first))

    key_states.enable_version(a, "k", version=1)
    _wait(lambda: not _refused(lambda: services.decrypt(b, first)))
    assert services.decrypt(b, first).plaintext == b"one"  # cached again
    took = _acted_within(
        _dropped_for(b, first), lambda: lifecycle.set_policy(a, "k", min_decryption_version=2), a
    )
    print(f"policy: B dropped v1 {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert _refused(lambda: services.decrypt(b, first))

    assert services.decrypt(b, second).plaintext == b"two"
    services.rotate_key(a, "k")
    _wait(lambda: _version(b, "k") == 3)
    assert services.decrypt(b, third).plaintext == b"three"
    took = _acted_within(
        _dropped_for(b, third), lambda: key_states.destroy_version(a, "k", version=2), a
    )
    print(f"destroy: B dropped v2 {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert _refused(lambda: services.decrypt(b, third))


# -- identity --------------------------------------------------------------------------


def _login(app: AppContext, username: str, realm: str = "master") -> Any:
    return password_login(app, realm, username, password_of(username))


def _rejects(app: AppContext, token: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            ids.authenticate(app, token)
        except AuthError:
            return True
        return False

    return check


def test_token_revocation_reaches_the_other_server_within_50ms(
    pair: tuple[AppContext, AppContext],
) -> None:
    a, b = pair
    add_user(a, "master", "rita", ["encryptor"])
    token = _login(a, "rita").access_token
    kept = _login(a, "rita").access_token
    assert ids.authenticate(b, token).username == "rita"  # verified and cached on B

    took = _acted_within(_rejects(b, token), lambda: ids.revoke(a, "master", token), a)
    print(f"revocation: B refuses the token {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert ids.authenticate(b, kept).username == "rita"  # only that token


def test_user_disable_reaches_the_other_server_within_50ms(
    pair: tuple[AppContext, AppContext],
) -> None:
    a, b = pair
    add_user(a, "master", "dora", ["encryptor"])
    add_user(a, "master", "olga", ["encryptor"])
    token = _login(a, "dora").access_token
    other = _login(a, "olga").access_token
    assert ids.authenticate(b, token).username == "dora"
    assert ids.authenticate(b, other).username == "olga"

    took = _acted_within(
        _rejects(b, token), lambda: ids.set_user_enabled(a, "master", "dora", False), a
    )
    print(f"user disable: B refuses his token {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert ids.authenticate(b, other).username == "olga"  # only his tokens


def test_realm_deletion_reaches_the_other_server_within_50ms(
    pair: tuple[AppContext, AppContext],
) -> None:
    a, b = pair
    ids.create_realm(a, "gone")
    ids.create_realm(a, "stays")
    for realm in ("gone", "stays"):
        add_user(a, realm, "vera", ["encryptor"])
    token = _login(a, "vera", "gone").access_token
    other = _login(a, "vera", "stays").access_token
    assert ids.authenticate(b, token).realm == "gone"
    assert ids.authenticate(b, other).realm == "stays"

    took = _acted_within(_rejects(b, token), lambda: ids.delete_realm(a, "gone"), a)
    print(f"realm deletion: B refuses its tokens {took * 1000:.1f} ms after A's commit")
    assert took < BOUND
    assert ids.authenticate(b, other).realm == "stays"


# -- the fallback ----------------------------------------------------------------------


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_killed_listener_falls_back_to_polling_then_push_resumes(
    postgres_url: str, root_key_b64: str
) -> None:
    a = _open(postgres_url, root_key_b64, identity=False)
    b = _open(postgres_url, root_key_b64, identity=False, cache_revalidate=0.2)
    try:
        invalidation.subscribe(b)
        _wait(lambda: _pushing(b))
        feed = _feed(b)
        services.create_key(a, name="k")
        services.create_key(a, name="other")
        assert _version(b, "k") == 1 and _version(b, "other") == 1
        connects = feed.connects

        _terminate(postgres_url, feed.backend_pid)
        _wait(lambda: not _pushing(b) or feed.connects > connects)
        # Whether or not it is back yet, a rotation now is seen within the polling bound.
        took = _acted_within(lambda: _version(b, "k") == 2, lambda: services.rotate_key(a, "k"), a)
        print(f"rotation while the listener reconnects: seen after {took * 1000:.1f} ms")
        assert took < 0.2 + 0.5

        _wait(lambda: _pushing(b) and feed.connects == connects + 1)
        assert _version(b, "k") == 2
        took = _acted_within(_dropped(b, "k"), lambda: services.rotate_key(a, "k"), a)
        print(f"rotation after the reconnect: dropped after {took * 1000:.1f} ms")
        assert took < BOUND
        assert _version(b, "k") == 3
    finally:
        invalidation.unsubscribe(b)
        a.close()
        b.close()


class _Recorder:
    """A change sink that records what a feed reports."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def connected(self, marker: object) -> None:
        self.events.append("connected")

    def disconnected(self) -> None:
        self.events.append("disconnected")

    def received(self, payload: str) -> None:
        self.events.append("received")


def test_a_feed_whose_probe_does_not_come_back_reconnects(
    postgres_url: str, root_key_b64: str
) -> None:
    """Delivery itself is probed: a notice on a channel only the listener hears must come
    back (through a transaction-pooling proxy it would not). Here the probe goes to a
    channel nobody listens on, as it would through such a proxy."""
    from qimem.builtin_plugins.sql.notify import PgChangeFeed
    from qimem.builtin_plugins.sql.store import MARKER_SQL

    make_app(postgres_url, root_key_b64).close()  # the schema, with the marker row
    url = sa.engine.make_url(postgres_url)
    feed = PgChangeFeed(url, MARKER_SQL, heartbeat=0.05, probe_timeout=0.3, poll=0.05)
    sink = _Recorder()
    feed.start(sink)
    try:
        _wait(lambda: sink.events == ["connected"])
        time.sleep(0.6)  # several probes, each answered
        assert sink.events == ["connected"] and feed.connects == 1

        feed._probe_channel = "qimem_invalidate_nobody_listens"  # noqa: SLF001
        _wait(lambda: sink.events[-2:] == ["disconnected", "connected"], timeout=5)
        assert feed.connects == 2  # and on the new connection the probes come back
        time.sleep(0.6)
        assert feed.connects == 2
    finally:
        feed.stop()
    assert sink.events[-1] == "disconnected"


def test_a_change_missed_while_disconnected_drops_everything_on_reconnect() -> None:
    from qimem.keycache import KeyCache

    cache = KeyCache(60.0, revalidate_seconds=30.0)
    cache.revalidate(lambda: "m1")
    polled = cache.invalidations
    cache.push_connected("m1")
    assert cache.pushing and cache.invalidations == polled  # nothing missed: nothing dropped
    cache.push_lost()
    assert not cache.pushing
    before = cache.generation
    cache.push_connected("m2")  # the marker moved while disconnected
    assert cache.generation == before + 1 and cache.invalidations == polled + 1


def test_sqlite_has_no_feed_and_keeps_polling(sqlite_url: str, root_key_b64: str) -> None:
    a = _open(sqlite_url, root_key_b64, identity=False, cache_revalidate=0.1)
    b = _open(sqlite_url, root_key_b64, identity=False, cache_revalidate=0.1)
    try:
        assert not b.backend.has_change_feed and b.backend.change_feed() is None
        assert invalidation.subscribe(b) is None and not b.cache.pushing
        services.create_key(a, name="k")
        assert _version(b, "k") == 1
        took = _acted_within(
            lambda: _version(b, "k") == 2, lambda: services.rotate_key(a, "k"), a, notice=False
        )
        print(f"sqlite: rotation seen by polling after {took * 1000:.1f} ms")
        assert took < 0.1 + 0.5
    finally:
        a.close()
        b.close()


# -- the attacker who can NOTIFY -------------------------------------------------------


@pytest.fixture
def attacker(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection as another database user (no rights on qimem's tables) who may
    ``NOTIFY`` on the database (anyone who can connect can)."""
    role = f"qimem_attacker_{int(time.time() * 1000) % 10**8}"
    admin_url = _libpq(postgres_url)
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
    assert _version(b, "x") == 1
    entry = b.cache.for_encrypt(DEFAULT_REALM, "x")
    add_user(a, "master", "tess", ["encryptor"])
    token = _login(a, "tess").access_token
    principal = ids.authenticate(b, token)
    feed = _feed(b)
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
    _wait(lambda: invalidator.received_count >= received + 13)

    assert feed.backend_pid == pid and feed.connects == connects and b.cache.pushing
    # The safe full revalidation compared the rotation marker: unchanged, nothing dropped.
    assert _version(b, "x") == 1
    assert b.cache.for_encrypt(DEFAULT_REALM, "x") is entry
    assert ids.authenticate(b, token).username == "tess"
    # ... and real changes still arrive at once.
    took = _acted_within(_dropped(b, "x"), lambda: services.rotate_key(a, "x"), a)
    assert took < BOUND
    assert _version(b, "x") == 2


def test_notices_carry_identifiers_only(
    pair: tuple[AppContext, AppContext], postgres_url: str
) -> None:
    a, b = pair
    captured: list[str] = []
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        services.create_key(a, name="secretive")
        sealed = services.encrypt(a, "secretive", b"plaintext-to-spot").envelope
        services.rotate_key(a, "secretive")
        key_states.disable_version(a, "secretive", version=1)
        lifecycle.set_policy(a, "secretive", min_decryption_version=2)
        key_states.destroy_version(a, "secretive", version=1)
        add_user(a, "master", "pia", ["encryptor"])
        login = _login(a, "pia")
        ids.revoke(a, "master", login.access_token)
        ids.set_password(a, "master", "pia", "another-long-passphrase-77")
        ids.set_user_enabled(a, "master", "pia", False)
        ids.create_realm(a, "brief")
        ids.delete_realm(a, "brief")
        deadline = time.monotonic() + 5
        while len(captured) < 8 and time.monotonic() < deadline:
            captured.extend(n.payload for n in listener.notifies(timeout=0.2))

    kinds = [json.loads(p)["k"] for p in captured]
    assert kinds.count("lineage") == 4 and "token" in kinds and "user" in kinds
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
