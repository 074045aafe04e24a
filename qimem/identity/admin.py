"""Administration: realms, users, roles and grants, service accounts, the audit trail.

Every change runs in one transaction with its audit record; an account's row is
write-locked and verified (:mod:`~qimem.identity.authz_mac`) before it is changed, and a
caller's ``check`` (the no-escalation rule) runs in that transaction after the lock.
Argon2 runs before the transaction, so a slow hash never holds a lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from qimem.errors import NotFoundError, ValidationError
from qimem.identity import lockout, realms, refresh, roles, users
from qimem.identity.audit import AuditRecord
from qimem.identity.base import AccountCheck, IdentityBase
from qimem.identity.passwords import (
    generate_password,
    hash_client_secret,
    new_client_secret,
    validate_password,
)
from qimem.identity.realms import MASTER, Realm
from qimem.identity.roles import Role
from qimem.identity.tokens import create_signing_key
from qimem.identity.users import User
from qimem.invalidation import REALM, Change, notify


@dataclass(frozen=True)
class NewSecret:
    """A just-created account and its one-time secret (shown once, never stored)."""

    user: User
    secret: str = field(repr=False)


class Administration(IdentityBase):
    """Realms, users, roles, grants and service accounts of one deployment."""

    # -- realms -----------------------------------------------------------------------

    def create_realm(self, name: str, *, actor: str = "local") -> Realm:
        with self.db.begin() as conn:
            realm = realms.create(conn, name)
            roles.seal_builtin(conn, self.sealer, name)
            create_signing_key(conn, self._wrapper, name)
            self.audit.record(MASTER, actor, "realm.create", name, conn=conn)
        return realm

    def list_realms(self) -> list[Realm]:
        with self.db.begin() as conn:
            return realms.list_all(conn)

    def realm_exists(self, name: str) -> bool:
        with self.db.begin() as conn:
            return realms.exists(conn, name)

    def require_realm(self, name: str) -> None:
        with self.db.begin() as conn:
            realms.require(conn, name)

    def delete_realm(self, name: str, *, actor: str = "local") -> None:
        with self.db.begin() as conn:
            realms.delete(conn, name)
            notify(conn, Change(REALM, name))  # other servers drop its tokens (on PostgreSQL)
            self.audit.record(MASTER, actor, "realm.delete", name, conn=conn)
        self.tokens.invalidate()
        self._verified.clear()
        self._role_cache.pop(name, None)

    def ensure_master(self, admin_password: str | None) -> str | None:
        """Create realm ``master`` with user ``admin`` unless they exist.

        :returns: the generated admin password if one was made (to show once), else None.
        """
        generated = None
        with self.db.begin() as conn:
            if not realms.exists(conn, MASTER):
                realms.create(conn, MASTER)
                roles.seal_builtin(conn, self.sealer, MASTER)
                create_signing_key(conn, self._wrapper, MASTER)
                self.audit.record(MASTER, "init", "realm.create", MASTER, conn=conn)
            has_admin = users.find(conn, MASTER, "admin") is not None
        if has_admin:
            return None
        if admin_password is None:
            admin_password = generated = generate_password()
        self.add_user(MASTER, "admin", admin_password, ["admin"], actor="init")
        return generated

    # -- users ------------------------------------------------------------------------

    def add_user(
        self,
        realm: str,
        username: str,
        password: str,
        role_names: Iterable[str] = (),
        *,
        actor: str = "local",
    ) -> User:
        validate_password(password)
        users.validate_username(username)
        hashed = self.hashing.hash(password)
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = users.create(conn, self.sealer, realm, username, hashed, "user")
            for role in dict.fromkeys(role_names):
                roles.grant(conn, self.sealer, realm, user.user_id, role, None)
            self.audit.record(
                realm, actor, "user.create", username, conn=conn, roles=list(role_names)
            )
        return self.get_user(realm, username)

    def list_users(self, realm: str, kind: str | None = None) -> list[User]:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            return users.list_all(conn, self.sealer, realm, kind)

    def get_user(self, realm: str, username: str) -> User:
        with self.db.begin() as conn:
            return self._load_user(conn, realm, username)

    @contextlib.contextmanager
    def _changing(
        self, realm: str, username: str, check: AccountCheck | None
    ) -> Iterator[tuple[Connection, User]]:
        """A transaction changing ``username``: his row write-locked (PostgreSQL) until it
        ends, verified, and passed by ``check`` (which reads through the same connection,
        so no change to his grants committed by anyone else comes between the check and
        this transaction's writes)."""
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = self._intact(users.get(conn, realm, username, for_update=True))
            if check is not None:
                check(conn, user)
            yield conn, user

    def set_password(
        self,
        realm: str,
        username: str,
        password: str,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> None:
        validate_password(password)
        hashed = self.hashing.hash(password)
        with self._changing(realm, username, check) as (conn, user):
            if user.kind != "user":
                raise ValidationError(f"{username!r} is a service account; it has no password")
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_secret_hash(conn, user.user_id, hashed)
            lockout.unlock(conn, user.user_id)
            refresh.revoke_user(conn, user.user_id)
            self._cut_off(conn, user, keep)
            self.audit.record(realm, actor, "user.password", username, conn=conn)

    def set_enabled(
        self,
        realm: str,
        username: str,
        enabled: bool,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> None:
        with self._changing(realm, username, check) as (conn, user):
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_enabled(conn, user.user_id, enabled)
            if not enabled:
                refresh.revoke_user(conn, user.user_id)
                self._cut_off(conn, user, keep)
            else:
                users.reseal(conn, self.sealer, user.user_id)
            self.audit.record(
                realm, actor, "user.enable" if enabled else "user.disable", username, conn=conn
            )

    # -- roles ------------------------------------------------------------------------

    def create_role(
        self,
        realm: str,
        name: str,
        permissions: Iterable[str],
        description: str = "",
        *,
        actor: str = "local",
    ) -> Role:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            role = roles.create(conn, self.sealer, realm, name, permissions, description)
            self.audit.record(
                realm, actor, "role.create", name, conn=conn, permissions=list(role.permissions)
            )
        self._role_cache.pop(realm, None)
        return role

    def list_roles(self, realm: str) -> list[Role]:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            return roles.list_all(conn, realm, self.sealer)

    def grant(
        self,
        realm: str,
        username: str,
        role: str,
        scope: str | None = None,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> bool:
        with self._changing(realm, username, check) as (conn, user):
            added = roles.grant(conn, self.sealer, realm, user.user_id, role, scope)
            self.audit.record(
                realm, actor, "role.grant", username, conn=conn, role=role, scope=scope or "*"
            )
            return added

    def revoke_role(
        self,
        realm: str,
        username: str,
        role: str,
        scope: str | None = None,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> bool:
        with self._changing(realm, username, check) as (conn, user):
            held = roles.grants_of(conn, self.sealer, realm, user.user_id)
            removed = roles.revoke(conn, realm, user.user_id, role, scope)
            if not removed:
                raise NotFoundError(
                    f"{username!r} does not hold role {role!r}", code="grant_not_found"
                )
            # Tokens name their roles; the ones naming this grant must stop working. So do
            # his refresh tokens (issued before the cut-off): he logs in again.
            left = roles.grants_of_rows(conn, realm, user.user_id)
            self._cut_off(conn, user, [g for g in held if g in left])
            self.audit.record(
                realm, actor, "role.revoke", username, conn=conn, role=role, scope=scope or "*"
            )
            return removed

    # -- service accounts -------------------------------------------------------------

    def create_client(
        self, realm: str, client_id: str, role_names: Iterable[str] = (), *, actor: str = "local"
    ) -> NewSecret:
        secret = new_client_secret()
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = users.create(
                conn, self.sealer, realm, client_id, hash_client_secret(secret), "client"
            )
            for role in dict.fromkeys(role_names):
                roles.grant(conn, self.sealer, realm, user.user_id, role, None)
            self.audit.record(
                realm, actor, "client.create", client_id, conn=conn, roles=list(role_names)
            )
        return NewSecret(self.get_user(realm, client_id), secret)

    # -- audit ------------------------------------------------------------------------

    def audit_events(self, realm: str, **filters: Any) -> list[AuditRecord]:
        # Records older than the realm belong to a deleted realm of the same name (another
        # tenant's): they stay in the log, but this realm does not see them.
        with self.db.begin() as conn:
            created_at = realms.created_at(conn, realm)
        return self.audit.query(realm, since_at=created_at, **filters)
