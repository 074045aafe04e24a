"""Integrity of the authorization data: an HMAC-SHA-256 on every row that says who may do
what, under a key derived from the root key.

A database writer without the root key could otherwise grant himself anything (an
``INSERT`` into ``qimem_grants``). Each protected row carries a ``mac`` over its identity
and its protected columns, canonically encoded (length-prefixed UTF-8 fields, a label per
row kind), so a MAC copied onto another row, another user or another realm does not verify:

* ``qimem_users``: realm, user id, username, kind, secret hash (password or client secret),
  enabled, tokens_valid_after (the token cut-off of finding 8);
* ``qimem_roles``: realm, name, permissions, builtin;
* ``qimem_grants``: realm, user id, role, scope, and the user's ``tokens_valid_after`` when
  granted (re-sealed at each cut-off), so a grant revoked since cannot be put back.

A row whose MAC is missing or wrong is ignored (a grant not applied, a user treated as
disabled, a role as having no permissions, a secret as not matching) and reported once per
process and row version: a log warning (no secrets), an ``integrity.violation`` audit record
and the Prometheus counter ``qimem_authz_integrity_failures_total{table=...}``.

Not covered (documented in docs/identity.md): the lockout counters (``failed_logins``,
``locked_until``), which concurrent logins update with atomic SQL counters; rolling a
user's rows back *together* to an earlier authentic state (e.g. restoring a backup).
Signing keys (:meth:`qimem.identity.tokens.TokenService._authentic`) and refresh tokens
(:class:`qimem.identity.refresh.TokenHasher`) are authenticated by their own modules and
report through the same :class:`Reports`.

Migration 0005 adds the columns without the root key. The rows that existed before it are
sealed in the migration's own transaction by the process that ran it, which opened the key
store and so holds the root key (:func:`sealing_after_upgrade`, the hook the store passes to
:func:`qimem.sql.migrate`). Never later: a database writer who sets every ``mac`` back to
NULL gets his rows ignored, not sealed; one who rewinds ``alembic_version`` makes the next
upgrade fail (the columns exist), so nothing is sealed either.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables
from qimem.identity.audit import audit_row
from qimem.rootkey import KeyWrapper

log = logging.getLogger("qimem.identity")

_LABEL = "authz-mac-v1"
_REPORTED_MAX = 10_000
_counter: Any = None
_counter_lock = threading.Lock()


def failures_counter() -> Any:
    """``qimem_authz_integrity_failures_total{table}`` in prometheus_client's default
    registry (created on first use; the server's own registry does not hold it)."""
    global _counter
    with _counter_lock:
        if _counter is None:
            from prometheus_client import Counter

            _counter = Counter(
                "qimem_authz_integrity_failures",
                "Authorization rows (users, roles, grants, signing keys) ignored because "
                "they fail their integrity check.",
                ["table"],
            )
            for table in ("users", "roles", "grants", "signing_keys"):
                _counter.labels(table)
        return _counter


def encode_field(value: object) -> bytes:
    """One field of a MAC'd message: length-prefixed UTF-8 (bools 0/1, floats by repr)."""
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


#: Reports a violation: (table, realm, row identity without secrets).
Reporter = Callable[[str, str, str], None]


class Sealer:
    """Computes and checks row MACs. Its repr shows no key."""

    __slots__ = ("_key", "_report")

    def __init__(self, wrapper: KeyWrapper, report: Reporter | None = None) -> None:
        self._key = wrapper.derive_key(_LABEL)
        self._report = report

    def _mac(self, kind: str, fields: tuple[object, ...]) -> str:
        message = (
            b"qimem authz v1\x00" + encode_field(kind) + b"".join(encode_field(f) for f in fields)
        )
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _check(self, kind: str, fields: tuple[object, ...], mac: str | None, ident: str) -> bool:
        ok = isinstance(mac, str) and hmac.compare_digest(mac, self._mac(kind, fields))
        if not ok and self._report is not None:
            self._report(kind, str(fields[0]), ident + f" mac={mac or '-'}")
        return ok

    # -- users ------------------------------------------------------------------------

    @staticmethod
    def _user_fields(row: Any) -> tuple[object, ...]:
        return (
            row.realm,
            row.user_id,
            row.username,
            row.kind,
            row.secret_hash,
            bool(row.enabled),
            float(row.tokens_valid_after),
        )

    def user_mac(self, row: Any) -> str:
        return self._mac("users", self._user_fields(row))

    def user_ok(self, row: Any) -> bool:
        """``row`` (a users row or :class:`~qimem.identity.users.User`) is authentic."""
        return self._check(
            "users", self._user_fields(row), row.mac, f"user {row.username} ({row.user_id})"
        )

    # -- roles ------------------------------------------------------------------------

    @staticmethod
    def _role_fields(row: Any) -> tuple[object, ...]:
        return (row.realm, row.name, row.permissions, bool(row.builtin))

    def role_mac(self, row: Any) -> str:
        return self._mac("roles", self._role_fields(row))

    def role_ok(self, row: Any) -> bool:
        return self._check("roles", self._role_fields(row), row.mac, f"role {row.name}")

    # -- grants -----------------------------------------------------------------------

    def grant_mac(self, realm: str, user_id: str, role: str, scope: str, epoch: float) -> str:
        return self._mac("grants", (realm, user_id, role, scope, float(epoch)))

    def grant_ok(
        self, realm: str, user_id: str, role: str, scope: str, epoch: float, mac: str | None
    ) -> bool:
        return self._check(
            "grants",
            (realm, user_id, role, scope, float(epoch)),
            mac,
            f"grant of role {role} on {scope or '*'} to user id {user_id}",
        )

    def __repr__(self) -> str:
        return "<Sealer hmac-sha256>"


class Reports:
    """Reports each bad row version once per process: log, audit, counter."""

    def __init__(self, audit: Callable[..., None]) -> None:
        self._audit = audit
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        failures_counter()

    def __call__(self, table: str, realm: str, ident: str) -> None:
        key = (table, realm, ident)
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= _REPORTED_MAX:
                self._seen.clear()
            self._seen.add(key)
        failures_counter().labels(table).inc()
        shown = ident.split(" mac=")[0]
        log.warning(
            "integrity violation: %s row of realm %r fails its MAC and is ignored: %s",
            table,
            realm,
            shown,
        )
        self._audit(realm, table, shown)


def sealing_after_upgrade(wrapper: KeyWrapper) -> Callable[[Connection, str | None], None]:
    """The hook :func:`qimem.sql.migrate` runs in the migration's transaction: when this
    upgrade crossed revision 0005 (which added the MAC columns without the root key), seal
    the rows that existed before it and audit ``integrity.seal`` with the counts. It is the
    only moment rows without a MAC are ever sealed."""

    def after_upgrade(conn: Connection, from_revision: str | None) -> None:
        if from_revision is None or from_revision >= "0005":
            return  # a new database has no rows; a newer one was sealed when it crossed
        sealed = seal_legacy_rows(conn, Sealer(wrapper))
        if sealed:
            row = audit_row("master", "init", "integrity.seal", "-", "success", sealed)
            conn.execute(sa.insert(tables.audit), [row])

    return after_upgrade


def seal_legacy_rows(conn: Connection, sealer: Sealer) -> dict[str, int]:
    """MAC the rows of a database being upgraded across migration 0005 (called by
    :func:`sealing_after_upgrade` only).

    Does nothing if any row of users, roles and grants already has a MAC.
    :returns: rows sealed per table (empty if nothing was done).
    """
    for table in (tables.users, tables.roles, tables.grants):
        if conn.execute(sa.select(table.c.mac).where(table.c.mac.is_not(None)).limit(1)).first():
            return {}
    sealed = {"users": 0, "roles": 0, "grants": 0}
    u, r, g = tables.users, tables.roles, tables.grants
    epochs: dict[str, float] = {}
    for row in conn.execute(sa.select(u)).all():
        epochs[row.user_id] = float(row.tokens_valid_after)
        conn.execute(
            sa.update(u).where(u.c.user_id == row.user_id).values(mac=sealer.user_mac(row))
        )
        sealed["users"] += 1
    for row in conn.execute(sa.select(r)).all():
        conn.execute(
            sa.update(r)
            .where(r.c.realm == row.realm, r.c.name == row.name)
            .values(mac=sealer.role_mac(row))
        )
        sealed["roles"] += 1
    for row in conn.execute(sa.select(g)).all():
        mac = sealer.grant_mac(
            row.realm, row.user_id, row.role, row.scope, epochs.get(row.user_id, 0.0)
        )
        conn.execute(
            sa.update(g)
            .where(
                g.c.realm == row.realm,
                g.c.user_id == row.user_id,
                g.c.role == row.role,
                g.c.scope == row.scope,
            )
            .values(mac=mac)
        )
        sealed["grants"] += 1
    return sealed if any(sealed.values()) else {}
