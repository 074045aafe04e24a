"""Shared helpers of the cross-server invalidation tests (tests/test_invalidation*.py): two
application contexts on one PostgreSQL database standing for two servers, and the timing
of a change from its commit on A to B acting on it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from conftest import make_app
from identity_helpers import password_login, password_of, with_identity

from qimem import invalidation, services
from qimem.app import AppContext
from qimem.errors import AuthError, QimemError
from qimem.keys import DEFAULT_REALM
from qimem.services import identity as ids

#: The target: another server acts on a change within this many seconds of its commit.
BOUND = 0.050
#: Far beyond every test: only the push can make a change visible in time.
SLOW = dict(cache_ttl=60.0, cache_revalidate=30.0)
SLOW_IDENTITY = dict(revocation_refresh_seconds=60.0, cache_seconds=60.0)


def libpq(url: str) -> str:
    return (
        sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def pushing(app: AppContext) -> bool:
    return app.cache.pushing


def feed_of(app: AppContext) -> Any:
    found = invalidation.subscription(app)
    assert found is not None
    return found.feed


def open_app(url: str, root_key_b64: str, *, identity: bool = True, **config: Any) -> AppContext:
    app = make_app(url, root_key_b64, **{**SLOW, **config})
    if identity:
        with_identity(app, **SLOW_IDENTITY)
    return app


@contextlib.contextmanager
def pushing_pair(postgres_url: str, root_key_b64: str) -> Iterator[tuple[AppContext, AppContext]]:
    """Servers A and B on one PostgreSQL database, both subscribed and pushing."""
    a = open_app(postgres_url, root_key_b64)
    b = open_app(postgres_url, root_key_b64)
    try:
        for app in (a, b):
            assert invalidation.subscribe(app) is not None
        wait(lambda: pushing(a) and pushing(b))
        yield a, b
    finally:
        for app in (a, b):
            invalidation.unsubscribe(app)
            ids.close_identity(app)
            app.close()


def acted_within(
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


def entry_gone(app: AppContext, name: str) -> Callable[[], bool]:
    """Whether ``app`` no longer holds an encryption entry for key ``name``."""
    return lambda: app.cache.for_encrypt(DEFAULT_REALM, name) is None


def prefix_gone(app: AppContext, envelope: bytes) -> Callable[[], bool]:
    """Whether ``app`` no longer holds the decryption entry of ``envelope``'s version."""
    from qimem.envelope import PREFIX_SIZE

    return lambda: app.cache.for_decrypt(DEFAULT_REALM, envelope[:PREFIX_SIZE]) is None


def key_version(app: AppContext, name: str) -> int:
    return services.encrypt(app, name, b"x").version


def refused(action: Callable[[], object]) -> bool:
    try:
        action()
    except QimemError:
        return True
    return False


def best_of(what: str, attempt: Callable[[], float], tries: int = 3) -> None:
    """Measure ``attempt()`` (a fresh change each time) until one is within the bound, at
    most ``tries`` times: a machine shared with other jobs can stall any one of them."""
    seen: list[float] = []
    while len(seen) < tries and (not seen or min(seen) >= BOUND):
        seen.append(attempt())
    shown = ", ".join(f"{t * 1000:.1f}" for t in seen)
    print(f"{what}: B acted {shown} ms after A's commit")
    assert min(seen) < BOUND


names = iter(range(10**6))


def fresh(prefix: str) -> str:
    return f"{prefix}{next(names)}"


def login_as(app: AppContext, username: str, realm: str = "master") -> Any:
    return password_login(app, realm, username, password_of(username))


def rejects(app: AppContext, token: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            ids.authenticate(app, token)
        except AuthError:
            return True
        return False

    return check
