"""The state every part of the :class:`~qimem.identity.core.Identity` facade shares.

:class:`IdentityBase` opens the services (password hashing, token signing, the audit log,
the integrity sealer) and holds the caches; the facade's parts
(:mod:`~qimem.identity.admin`, :mod:`~qimem.identity.logins`,
:mod:`~qimem.identity.verification`) build on it and never import each other.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from qimem.errors import ConflictError
from qimem.identity import realms, refresh, roles, users
from qimem.identity.audit import AuditLog
from qimem.identity.authz_mac import Reports, Sealer
from qimem.identity.db import Database
from qimem.identity.passwords import PasswordHashing
from qimem.identity.permissions import Principal
from qimem.identity.settings import IdentitySettings
from qimem.identity.tokens import TokenService
from qimem.identity.users import User
from qimem.rootkey import KeyWrapper

#: A check run inside an account change's transaction, after the account's row is
#: write-locked and verified: it reads through ``conn`` and raises to refuse (nothing is
#: written). The no-escalation rule uses it (:meth:`qimem.identity.escalation.Guard.rechecked`).
AccountCheck = Callable[[Connection, User], None]


class IdentityBase:
    """Services, caches and the helpers shared by the facade's parts."""

    def __init__(
        self, database: Database, wrapper: KeyWrapper, settings: IdentitySettings | None = None
    ) -> None:
        self.settings = settings or IdentitySettings()
        self.db = database
        self._wrapper = wrapper
        self.hashing = PasswordHashing(self.settings)
        self.audit = AuditLog(database, spill=self.settings.spill_settings())
        reports = Reports(self._integrity_violation)
        self.tokens = TokenService(database, wrapper, self.settings, reports)
        self.sealer = Sealer(wrapper, reports)
        self.refresh_hasher = refresh.TokenHasher(wrapper)
        self._role_cache: dict[str, tuple[float, dict[str, tuple[str, ...]]]] = {}
        self._verified: dict[str, tuple[Principal, float, int]] = {}
        atexit.register(self.audit.close)

    def _integrity_violation(self, realm: str, table: str, what: str) -> None:
        self.audit.record(
            realm[:64],
            "integrity",
            "integrity.violation",
            what[:200],
            "failure",
            buffered=True,
            table=table,
        )

    def _intact(self, user: User) -> User:
        """:raises ConflictError: the user's row fails its MAC (nothing is changed)."""
        if not self.sealer.user_ok(user):
            raise ConflictError(
                f"the stored record of {user.username!r} fails its integrity check (written "
                "without the root key?); it is ignored, see the audit log",
                code="integrity_violation",
            )
        return user

    def _load_user(self, conn: Connection, realm: str, username: str) -> User:
        """``username`` of ``realm`` with his grants (404 if either is unknown).

        A disabled user keeps his grants (shown, and weighed by the no-escalation rule
        before anyone re-enables him); a row failing its MAC has none.
        """
        realms.require(conn, realm)
        stored = users.get(conn, realm, username)
        user = users.intact(self.sealer, stored)
        authentic = self.sealer.user_ok(stored)
        grants = roles.grants_of(conn, self.sealer, realm, user.user_id) if authentic else []
        return User(**{**user.__dict__, "grants": tuple(grants)})

    def _cut_off(self, conn: Connection, user: User, keep: list[tuple[str, str]] | None) -> None:
        """Cut off the user's tokens (finding 8) and re-seal his row and his grants that
        were authentic (``keep``, else all that verify now) under the new cut-off."""
        valid = (
            keep
            if keep is not None
            else roles.grants_of(conn, self.sealer, user.realm, user.user_id)
        )
        self.tokens.cut_off(conn, user.user_id)
        users.reseal(conn, self.sealer, user.user_id)
        roles.reseal_grants(conn, self.sealer, user.realm, user.user_id, valid)

    def role_permissions(self, realm: str) -> dict[str, tuple[str, ...]]:
        """The permissions of each role of ``realm`` (cached ``cache_seconds``)."""
        cached = self._role_cache.get(realm)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.settings.cache_seconds:
            return cached[1]
        with self.db.begin() as conn:
            perms = roles.permissions_by_role(conn, realm, self.sealer)
        self._role_cache[realm] = (now, perms)
        return perms

    def invalidate_caches(self) -> None:
        """Forget cached signing keys, roles and verified tokens (re-read on next use)."""
        self.tokens.invalidate()
        self._verified.clear()
        self._role_cache.clear()

    def record(
        self,
        realm: str,
        actor: str,
        action: str,
        target: str = "-",
        outcome: str = "success",
        *,
        buffered: bool = False,
        **detail: Any,
    ) -> None:
        """Record an audit event (key operations from the service or HTTP layer)."""
        self.audit.record(realm, actor, action, target, outcome, buffered=buffered, **detail)

    def close(self) -> None:
        """Flush the audit log and release the database (if this identity owns it)."""
        atexit.unregister(self.audit.close)  # the registration kept a closed identity alive
        self.audit.close()
        self.hashing.close()
        self.db.close()

    def __repr__(self) -> str:
        return f"<Identity {self.db.engine.dialect.name}>"
