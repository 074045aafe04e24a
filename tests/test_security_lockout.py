"""Finding 9 (issue 12): the lockout race. The lock used to be read before the Argon2 hash
and not checked again, so a right password that was hashing while concurrent wrong guesses
locked the user still logged in. Now the outcome is decided atomically with the lock state:
against a real SQLite file and a real PostgreSQL database, 30 concurrent wrong guesses and
right guesses racing them, no login succeeds after the failure that locked the user, and
every attempt is counted (audited) exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from identity_helpers import (
    STORES,
    add_user,
    close_app,
    identity_app,
    password_login,
    password_of,
    store_url,
)

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.services import identity as ids

WRONG = 30
RIGHT = 8
THRESHOLD = 5


@pytest.fixture(params=STORES)
def app(request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str) -> Iterator[AppContext]:
    url = store_url(request, tmp_path, request.param)
    # A hash that takes a while (8 MiB), and a slot for every thread: all hash at once.
    the_app = identity_app(
        url,
        root_key_b64,
        argon2_memory_kib=8192,
        lockout_threshold=THRESHOLD,
        max_concurrent_hashes=WRONG + RIGHT,
        max_waiting_hashes=WRONG + RIGHT,
    )
    ids.create_realm(the_app, "acme")
    add_user(the_app, "acme", "victim", ["encryptor"])
    yield the_app
    close_app(the_app)


def _storm(app: AppContext) -> dict[str, int]:
    """30 wrong and 8 right guesses released at once; outcome counts."""
    start = threading.Barrier(WRONG + RIGHT)
    outcome = {"granted": 0, "refused_right": 0, "refused_wrong": 0, "granted_wrong": 0}
    lock = threading.Lock()

    def guess(i: int) -> None:
        right = i < RIGHT
        password = password_of("victim") if right else f"guess-{i:04d}-wrong"
        start.wait()
        try:
            password_login(app, "acme", "victim", password)
            key = "granted" if right else "granted_wrong"
        except AuthError:
            key = "refused_right" if right else "refused_wrong"
        with lock:
            outcome[key] += 1

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(WRONG + RIGHT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcome


def test_finding9_no_login_succeeds_after_the_lock(app: AppContext) -> None:
    outcome = _storm(app)
    assert outcome["granted_wrong"] == 0 and outcome["refused_wrong"] == WRONG
    logins = [
        e
        for e in ids.identity(app).audit_events("acme", action="login", limit=1000)
        if e.actor == "victim"
    ]
    logins.sort(key=lambda e: e.id)
    # Every attempt is counted exactly once: one audit record each.
    assert len(logins) == WRONG + RIGHT
    assert sum(e.outcome == "failure" for e in logins) == WRONG + outcome["refused_right"]
    assert sum(e.outcome == "success" for e in logins) == outcome["granted"]
    locking = [e.id for e in logins if e.detail.get("locked")]
    assert locking, "30 wrong guesses against a threshold of 5 must lock the user"
    late = [e for e in logins if e.outcome == "success" and e.id > locking[0]]
    assert late == [], f"{len(late)} logins succeeded after the lock: {outcome}"
    # And the user is locked now: the right password is refused.
    with pytest.raises(AuthError):
        password_login(app, "acme", "victim", password_of("victim"))
