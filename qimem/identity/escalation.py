"""No escalation: an identity administrator can hand out only what he holds himself.

The rule (Keycloak's and AWS IAM's): a caller may grant, assign or put into a role only
permissions he holds (a scoped grant no wider than his own scopes); may not create a user or
service account with more than he holds; and may not change the password, enabled flag or
grants of an account that holds any permission he lacks. Realm administration (listing,
creating, deleting realms) is for administrators of the ``master`` realm.

Every check takes the caller's :class:`~qimem.identity.permissions.Principal`; ``None`` is
the local operator (``qauth`` without ``--server``, ``qimem init``), who holds the root key
and the database and so may do anything. Role permissions and the target's grants are read
from the database at the time of the check, not from a cache. A refusal raises
:class:`EscalationError` (403 ``escalation_denied``, exit code 4), naming the permission the
caller lacks, and is recorded in the audit log as ``denied``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from qimem.errors import ForbiddenError, NotFoundError
from qimem.identity import roles
from qimem.identity.permissions import Principal
from qimem.identity.realms import MASTER
from qimem.identity.users import User

if TYPE_CHECKING:
    from qimem.identity.base import AccountCheck
    from qimem.identity.core import Identity

_LITERAL = re.compile(r"^[A-Za-z0-9._-]*$")  # no fnmatch metacharacter


class EscalationError(ForbiddenError):
    """The caller tried to hand out, or act on someone holding, a permission he lacks."""

    code = "escalation_denied"


def scope_covered(held: Iterable[str], wanted: str) -> bool:
    """True if every key name matching ``wanted`` (``""``: every key) matches one of the
    ``held`` patterns. Conservative: an unprovable inclusion is refused.

    Proven cases: the caller holds every key (``""``); the same pattern; a held
    ``prefix*`` (literal prefix) and a wanted pattern starting with that prefix; a wanted
    single key name (no metacharacters) that a held pattern matches.
    """
    import fnmatch

    held = set(held)
    if "" in held:
        return True
    if wanted == "":
        return False
    if wanted in held:
        return True
    for pattern in held:
        prefix = pattern[:-1]
        if pattern.endswith("*") and _LITERAL.match(prefix) and wanted.startswith(prefix):
            return True
        if _LITERAL.match(wanted) and fnmatch.fnmatchcase(wanted, pattern):
            return True
    return False


def _scopes_text(scopes: Iterable[str]) -> str:
    return ", ".join(sorted(s or "*" for s in scopes))


def missing(
    caller: Mapping[str, frozenset[str]], wanted: Iterable[tuple[str, str]]
) -> tuple[str, str, str] | None:
    """The first ``(permission, scope)`` in ``wanted`` that ``caller`` does not cover, as
    ``(permission, scope, what the caller holds)``; None if all are covered."""
    for perm, scope in wanted:
        held = caller.get(perm, frozenset())
        if not scope_covered(held, scope):
            return perm, scope, _scopes_text(held)
    return None


def _describe(perm: str, scope: str, held: str) -> str:
    if not held:
        return f"{perm}, which you do not hold"
    return f"{perm} on {scope or '*'}, wider than you hold it ({held})"


class Guard:
    """The checks of one identity-admin operation by ``principal`` in ``realm``."""

    def __init__(self, ident: Identity, principal: Principal | None, realm: str) -> None:
        self.ident = ident
        self.principal = principal
        self.realm = realm

    @property
    def actor(self) -> str:
        p = self.principal
        return "local" if p is None else f"{p.username}@{p.realm}"

    def _deny(self, action: str, target: str, message: str, lacking: str) -> EscalationError:
        """The refusal, recorded in the audit log (in its own transaction)."""
        if self.ident.realm_exists(self.realm):
            self.ident.record(
                self.realm, self.actor, action, target, "denied", reason="escalation",
                lacking=lacking,
            )  # fmt: skip
        return EscalationError(f"no escalation: {message}")

    def in_realm(self) -> None:
        """The caller's own realm, or any realm for a ``master`` realm admin.

        :raises NotFoundError: another realm (it does not exist for the caller).
        """
        if self.principal is not None and not self.principal.can_act_in(self.realm):
            raise NotFoundError(f"realm {self.realm!r} does not exist", code="realm_not_found")

    def needs(self, permission: str) -> None:
        """The caller acts in the realm and holds ``permission`` for every key."""
        self.in_realm()
        if self.principal is not None and not self.principal.allows(permission):
            raise ForbiddenError(f"this operation needs the {permission} permission")

    def master_admin(self) -> None:
        """Realm administration: ``realms:admin`` held in the ``master`` realm."""
        p = self.principal
        if p is not None and (p.realm != MASTER or not p.allows("realms:admin")):
            raise ForbiddenError("this operation is reserved to master realm administrators")

    def _role_permissions(self) -> dict[str, tuple[str, ...]]:
        return {r.name: r.permissions for r in self.ident.list_roles(self.realm)}

    def grants(self, action: str, target: str, grants: Iterable[tuple[str, str]]) -> None:
        """The caller may hand out each ``(role, scope)`` (unknown roles: 404)."""
        if self.principal is None:
            return
        by_role = self._role_permissions()
        for role, scope in grants:
            if role not in by_role:
                raise NotFoundError(
                    f"role {role!r} does not exist in realm {self.realm!r}", code="role_not_found"
                )
            gap = missing(self.principal.permissions, ((p, scope) for p in by_role[role]))
            if gap is not None:
                perm, wanted, held = gap
                message = f"granting role {role!r} needs {_describe(perm, wanted, held)}"
                raise self._deny(action, target, message, perm)

    def permissions(self, action: str, target: str, perms: Iterable[str]) -> None:
        """The caller may put ``perms`` into a role: he holds each (for some keys at least;
        every later grant of the role is checked against his scopes)."""
        if self.principal is None:
            return
        for perm in perms:
            if not self.principal.allows_any(perm):
                message = f"a role with {perm} needs {perm}, which you do not hold"
                raise self._deny(action, target, message, perm)

    def _outranked_by(
        self,
        username: str,
        grants: Iterable[tuple[str, str]],
        by_role: Mapping[str, tuple[str, ...]],
    ) -> tuple[str, str] | None:
        """``(message, permission)`` if ``grants`` hold a permission the caller lacks."""
        assert self.principal is not None
        held = [(perm, scope) for role, scope in grants for perm in by_role.get(role, ())]
        gap = missing(self.principal.permissions, held)
        if gap is None:
            return None
        perm, scope, mine = gap
        return f"{username!r} holds {_describe(perm, scope, mine)}", perm

    def account(self, action: str, username: str) -> None:
        """The caller may act on ``username``: it holds nothing the caller lacks.

        An early answer (404 for an unknown user, 403 before anything else is checked);
        the change itself re-checks in its own transaction (:meth:`rechecked`).
        """
        if self.principal is None:
            return
        user = self.ident.get_user(self.realm, username)
        refused = self._outranked_by(username, user.grants, self._role_permissions())
        if refused is not None:
            raise self._deny(action, username, *refused)

    @contextlib.contextmanager
    def rechecked(self, action: str, username: str) -> Iterator[AccountCheck | None]:
        """The :meth:`account` check for the change's own transaction.

        Yields the ``check`` to pass to the :class:`~qimem.identity.core.Identity` method
        (None for the local operator): it runs after the account's row is write-locked and
        reads the role permissions and the account's grants through the same connection, so
        a grant committed by someone else between :meth:`account` and the write is weighed
        (the two are serialized on the row lock). A refusal there rolls the change back
        and is recorded in the audit log afterwards.
        """
        if self.principal is None:
            yield None
            return
        refusals: list[tuple[str, str]] = []

        def check(conn: Connection, user: User) -> None:
            sealer = self.ident.sealer
            grants = roles.grants_of(conn, sealer, self.realm, user.user_id)
            by_role = roles.permissions_by_role(conn, self.realm, sealer)
            refused = self._outranked_by(user.username, grants, by_role)
            if refused is not None:
                refusals.append(refused)
                raise EscalationError(f"no escalation: {refused[0]}")

        try:
            yield check
        except EscalationError:
            if refusals:
                self._deny(action, username, *refusals[0])
            raise


__all__ = ["EscalationError", "Guard", "missing", "scope_covered"]
