"""Red team (issue 15): the client_credentials grant's time must not tell client ids apart.

An unknown client id was refused after one SHA-256 of the secret; a known id with a wrong
secret also write-locked the account's row, re-read it, checked its MAC and read its
previous secrets (a database round trip or three more). The refusal now runs the same
steps for every name (a decoy account for an unknown id, a disabled client or a user's
name): the same SQL statements and the same secret-hash and MAC work.

Time itself is not asserted (performance is never asserted in tests; the numbers are in
the report of this change). The mechanism is: every statement the real database is sent
is recorded (an SQLAlchemy event on the real engine), and the real hash and MAC functions
are wrapped by counters (they still do their work).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from identity_helpers import STORES, add_user, close_app, identity_app, store_url

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.identity import passwords
from qimem.identity.authz_mac import Sealer
from qimem.services import clients as cs
from qimem.services import identity as ids


@pytest.fixture(params=STORES)
def world(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[tuple[AppContext, str]]:
    """An app whose realm has a client ``svc`` (its secret), a disabled client ``off`` and
    a user ``alice``."""
    made = identity_app(store_url(request, tmp_path, request.param), root_key_b64)
    ids.create_realm(made, "acme")
    made_client = ids.create_client(made, "acme", "svc", ["encryptor"])
    ids.create_client(made, "acme", "off", ["encryptor"])
    cs.set_client_enabled(made, "acme", "off", False)
    add_user(made, "acme", "alice", ["encryptor"])
    yield made, made_client.secret
    close_app(made)


class _Work:
    """What one grant made the database and the CPU do."""

    def __init__(self, app: AppContext, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: list[str] = []
        self.hashes = 0
        self.macs = 0
        self._engine = ids.identity(app).db.engine
        real_hash = passwords.hash_client_secret
        real_mac = Sealer._mac

        def counted_hash(secret: str) -> str:
            self.hashes += 1
            return real_hash(secret)

        def counted_mac(sealer: Sealer, kind: str, fields: tuple[object, ...]) -> str:
            self.macs += kind == "users"
            return real_mac(sealer, kind, fields)

        monkeypatch.setattr(passwords, "hash_client_secret", counted_hash)
        monkeypatch.setattr(Sealer, "_mac", counted_mac)
        sa.event.listen(self._engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "qimem_audit" in statement:
            return  # the failure record (the same for every name)
        self.statements.append(re.sub(r"\s+", " ", statement).strip())

    def reset(self) -> None:
        self.statements, self.hashes, self.macs = [], 0, 0

    def close(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._record)


def _refused(app: AppContext, client_id: str, secret: str) -> None:
    params = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    with pytest.raises(AuthError) as caught:
        ids.token(app, "acme", params)
    assert caught.value.code == "invalid_client"


def test_unknown_and_known_client_ids_cost_the_same_work(
    world: tuple[AppContext, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, secret = world
    wrong = "qcs_" + "x" * 43
    _refused(app, "svc", wrong)  # warm-up: signing keys, sealers, caches
    _refused(app, "nobody", wrong)
    work = _Work(app, monkeypatch)
    seen: dict[str, tuple[list[str], int, int]] = {}
    try:
        for name in ("svc", "nobody", "off", "alice"):
            work.reset()
            _refused(app, name, wrong)
            seen[name] = (work.statements, work.hashes, work.macs)
        work.reset()
        ids.token(
            app,
            "acme",
            {"grant_type": "client_credentials", "client_id": "svc", "client_secret": secret},
        )
        granted = (work.statements, work.hashes, work.macs)
    finally:
        work.close()
    known = seen["svc"]
    assert known[1] >= 1 and known[2] >= 1, known
    for name in ("nobody", "off", "alice"):  # unknown, disabled, a user's name
        assert seen[name] == known, (name, seen[name], known)
    # The right secret does the same checks (then reads the grants and signs).
    assert granted[0][: len(known[0])] == known[0] and granted[1:] == known[1:]
