"""The audit log: who did what, in which realm, when, and how it ended. Never secrets.

Records are rows of ``qimem_audit``. Management events are written in the caller's
transaction or at once; high-volume events (one per encrypt request) can be ``buffered``:
they are written in batches by a background thread at most ``flush_interval`` later, and
on :meth:`AuditLog.flush` / close.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables
from qimem.identity.db import Database

log = logging.getLogger("qimem.audit")

OUTCOMES = ("success", "failure", "denied", "error")
# Detail keys that could carry a secret are dropped, whatever the caller passes.
_SECRET_KEY = re.compile(r"pass|secret|token|plaintext|material|credential|authorization", re.I)
_MAX_BUFFER = 10_000


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry."""

    id: int
    at: float
    realm: str
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        from datetime import UTC, datetime

        return {
            "id": self.id,
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(),
            "realm": self.realm,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
        }


def clean_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """Detail with secret-looking keys removed and values reduced to short scalars."""
    result: dict[str, Any] = {}
    for key, value in detail.items():
        if value is None or _SECRET_KEY.search(key):
            continue
        if isinstance(value, bool | int | float):
            result[key] = value
        elif isinstance(value, list | tuple):
            result[key] = [str(v)[:64] for v in value][:20]
        else:
            result[key] = str(value)[:128]
    return result


def audit_row(realm: str, actor: str, action: str, target: str, outcome: str, detail: dict) -> dict:
    """One ``qimem_audit`` row (detail cleaned of secrets), for writers that hold a
    connection but no :class:`AuditLog` (the migration hook)."""
    text = json.dumps(clean_detail(detail), sort_keys=True) if detail else "{}"
    if len(text) > 1024:
        text = "{}"
    return {
        "at": time.time(),
        "realm": realm[:64],
        "actor": (actor or "-")[:160],
        "action": action[:64],
        "target": (target or "-")[:200],
        "outcome": outcome[:32],
        "detail": text,
    }


class AuditLog:
    """Writes and reads audit records."""

    def __init__(self, database: Database, *, flush_interval: float = 0.5) -> None:
        self._db = database
        self._buffer: list[dict[str, Any]] = []
        self.dropped = 0  # records lost because the buffer was full (store unreachable)
        self._lock = threading.Lock()
        # One flush at a time: a query's flush waits for a batch the flusher thread has taken
        # from the buffer but not committed yet, so the query does not miss it.
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._interval = flush_interval
        self._thread: threading.Thread | None = None
        self._closed = False

    def record(
        self,
        realm: str,
        actor: str,
        action: str,
        target: str = "-",
        outcome: str = "success",
        *,
        conn: Connection | None = None,
        buffered: bool = False,
        **detail: Any,
    ) -> None:
        """Record one event. ``conn`` writes in that transaction; ``buffered`` batches it."""
        row = audit_row(realm, actor, action, target, outcome, detail)
        if conn is not None:
            conn.execute(sa.insert(tables.audit), [row])
            return
        if buffered and not self._closed:
            with self._lock:
                if len(self._buffer) < _MAX_BUFFER:
                    self._buffer.append(row)
                else:
                    self.dropped += 1
                self._ensure_thread()
            return
        with self._db.begin() as c:
            c.execute(sa.insert(tables.audit), [row])

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="qimem-audit-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a database outage must not kill the flusher
                log.warning("audit flush failed; will retry", exc_info=False)

    def flush(self) -> None:
        """Write buffered records now (after any flush already in progress)."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            rows, self._buffer = self._buffer, []
            dropped, self.dropped = self.dropped, 0
        if dropped:
            log.warning("audit buffer was full: %d audit records were dropped", dropped)
        if rows:
            try:
                with self._db.begin() as c:
                    c.execute(sa.insert(tables.audit), rows)
            except Exception:
                with self._lock:
                    keep = max(0, _MAX_BUFFER - len(self._buffer))
                    self._buffer[:0] = rows[:keep]
                    self.dropped += len(rows) - min(len(rows), keep)
                raise

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        try:
            self.flush()
        except Exception:
            log.warning("audit records could not be written at close")

    def query(
        self,
        realm: str,
        *,
        limit: int = 100,
        action: str | None = None,
        actor: str | None = None,
        since_id: int = 0,
    ) -> list[AuditRecord]:
        """Newest-first records of ``realm`` (buffered ones are flushed first)."""
        self.flush()
        stmt = sa.select(tables.audit).where(tables.audit.c.realm == realm)
        if action:
            stmt = stmt.where(tables.audit.c.action == action)
        if actor:
            stmt = stmt.where(tables.audit.c.actor == actor)
        if since_id:
            stmt = stmt.where(tables.audit.c.id > since_id)
        # By time, not id: a buffered record gets its id at the flush, after newer ones
        # written at once (index ix_audit_realm_at serves this order).
        order = (tables.audit.c.at.desc(), tables.audit.c.id.desc())
        stmt = stmt.order_by(*order).limit(max(1, min(limit, 1000)))
        with self._db.begin() as conn:
            rows = conn.execute(stmt).all()
        return [
            AuditRecord(
                r.id, r.at, r.realm, r.actor, r.action, r.target, r.outcome, json.loads(r.detail)
            )
            for r in rows
        ]

    def __repr__(self) -> str:
        return "<AuditLog>"
