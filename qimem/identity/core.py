"""The identity facade: realms, users, roles, service accounts, logins and tokens.

One :class:`Identity` per application context; it is thread-safe. Database work runs in
short transactions; Argon2 and signing run outside them, so a slow hash never holds a lock.

Its parts, by concern: :mod:`~qimem.identity.admin` (realms, users, roles, grants, service
accounts, audit trail), :mod:`~qimem.identity.logins` (the OAuth2 grants) and
:mod:`~qimem.identity.verification` (authenticate, revoke, introspect, signing keys), all
on the shared state of :mod:`~qimem.identity.base`.
"""

from __future__ import annotations

from qimem.identity.admin import Administration, NewSecret
from qimem.identity.clients import ClientAdministration
from qimem.identity.logins import Logins, TokenResponse
from qimem.identity.verification import Verification


class Identity(Administration, ClientAdministration, Logins, Verification):
    """Identity and access for one qimem deployment (one database)."""


__all__ = ["Identity", "NewSecret", "TokenResponse"]
