"""Finding 1, concurrency: the no-escalation check of an account change and the change
itself ran in two transactions. A helpdesk (``users:admin`` only) checks that the target
holds nothing he lacks; a stronger admin grants the target ``admin`` and commits; the
helpdesk's change is then written anyway, so he had reset an admin's password (or disabled
him, or changed his grants).

Now the check runs again inside the change's transaction, after the target's row is
write-locked (``SELECT ... FOR UPDATE``, which every grant and account change takes): the
two are serialized, and the change that would act on an admin is refused (and audited).
On a real PostgreSQL database, with the stronger admin's transaction holding the row while
the helpdesk's change waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from identity_helpers import add_user, close_app, identity_app, password_login, password_of

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.identity import Principal, roles, users
from qimem.identity.escalation import EscalationError
from qimem.services import identity as ids

Change = Callable[[AppContext, Principal], object]

CHANGES: dict[str, tuple[str, Change]] = {
    "set_password": (
        "user.password",
        lambda app, who: ids.set_password(
            app, "acme", "target", "fresh-orchid-lantern-93", principal=who
        ),
    ),
    "disable": (
        "user.disable",
        lambda app, who: ids.set_user_enabled(app, "acme", "target", False, principal=who),
    ),
    "grant_role": (
        "role.grant",
        lambda app, who: ids.grant_role(app, "acme", "target", "helpdesk", principal=who),
    ),
    "revoke_role": (
        "role.revoke",
        lambda app, who: ids.revoke_role(app, "acme", "target", "auditor", principal=who),
    ),
}


@pytest.fixture
def app(postgres_url: str, root_key_b64: str) -> Iterator[AppContext]:
    the_app = identity_app(postgres_url, root_key_b64)
    ids.create_realm(the_app, "acme")
    ids.create_role(the_app, "acme", "helpdesk", ["users:admin"])
    add_user(the_app, "acme", "help", ["helpdesk", "auditor"])
    add_user(the_app, "acme", "target", ["auditor"])
    yield the_app
    close_app(the_app)


def _wait_for_lock_waiter(engine: sa.Engine, timeout: float = 20) -> None:
    """Until a session of this database waits for a row lock."""
    deadline = time.monotonic() + timeout
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar():
                return
        time.sleep(0.02)
    raise AssertionError("the helpdesk's change never waited for the target's row lock")


def _helpdesk(app: AppContext) -> Principal:
    login = password_login(app, "acme", "help", password_of("help"))
    return ids.authenticate(app, login.access_token)


@pytest.mark.parametrize("change", list(CHANGES))
def test_finding1_check_and_change_are_one_transaction(app: AppContext, change: str) -> None:
    action, run = CHANGES[change]
    helpdesk = ids.authenticate(
        app, password_login(app, "acme", "help", password_of("help")).access_token
    )
    ident = ids.identity(app)
    outcome: list[BaseException | None] = []

    def helpdesk_change() -> None:
        try:
            run(app, helpdesk)
            outcome.append(None)
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=helpdesk_change)
    # The stronger admin's grant, in progress: his transaction holds the target's row.
    with ident.db.begin() as conn:
        target = users.get(conn, "acme", "target", for_update=True)
        worker.start()
        _wait_for_lock_waiter(ident.db.engine)  # the helpdesk has checked (old code) and waits
        roles.grant(conn, ident.sealer, "acme", target.user_id, "admin", None)
    worker.join(30)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], EscalationError), outcome
    assert "'target' holds" in str(outcome[0])

    # Nothing of the change was written.
    after = ids.identity(app).get_user("acme", "target")
    assert after.enabled
    assert set(after.grants) == {("auditor", ""), ("admin", "")}
    assert password_login(app, "acme", "target", password_of("target")).access_token
    # The refusal is audited as denied.
    denied = ids.audit_events(app, "acme", action=action)
    assert [(e.actor, e.outcome) for e in denied[:1]] == [("help@acme", "denied")]


def test_finding1_change_still_works_when_nothing_was_granted_meanwhile(
    app: AppContext,
) -> None:
    """The re-check passes what the first check passed (no false refusals)."""
    helpdesk = ids.authenticate(
        app, password_login(app, "acme", "help", password_of("help")).access_token
    )
    for _action, run in CHANGES.values():
        run(app, helpdesk)
    with pytest.raises(AuthError):
        password_login(app, "acme", "target", password_of("target"))
    target = ids.identity(app).get_user("acme", "target")
    assert not target.enabled and set(target.grants) == {("helpdesk", "")}
