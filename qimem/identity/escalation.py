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

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from qimem.errors import ForbiddenError, NotFoundError
from qimem.identity.permissions import Principal
from qimem.identity.realms import MASTER

if TYPE_CHECKING:
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

    def account(self, action: str, username: str) -> None:
        """The caller may act on ``username``: it holds nothing the caller lacks."""
        if self.principal is None:
            return
        user = self.ident.get_user(self.realm, username)
        by_role = self._role_permissions()
        held = [(perm, scope) for role, scope in user.grants for perm in by_role.get(role, ())]
        gap = missing(self.principal.permissions, held)
        if gap is not None:
            perm, scope, mine = gap
            message = f"{username!r} holds {_describe(perm, scope, mine)}"
            raise self._deny(action, username, message, perm)


__all__ = ["EscalationError", "Guard", "missing", "scope_covered"]
