"""QAuth identity: realms, users, roles and permissions, signed tokens (DESIGN.md §7).

:class:`Identity` is the facade (:mod:`~qimem.identity.core`, built from
:mod:`~qimem.identity.admin`, :mod:`~qimem.identity.logins` and
:mod:`~qimem.identity.verification` on :mod:`~qimem.identity.base`);
:mod:`qimem.services.identity` opens one per application context, and checks the caller
(:mod:`~qimem.identity.escalation`). Modules: :mod:`~qimem.identity.realms`,
:mod:`~qimem.identity.users`, :mod:`~qimem.identity.passwords`,
:mod:`~qimem.identity.password_policy`, :mod:`~qimem.identity.roles` and
:mod:`~qimem.identity.permissions`, :mod:`~qimem.identity.tokens`,
:mod:`~qimem.identity.refresh`, :mod:`~qimem.identity.lockout`,
:mod:`~qimem.identity.authz_mac`, :mod:`~qimem.identity.audit`.
"""

from qimem.identity.core import Identity, NewSecret, TokenResponse
from qimem.identity.permissions import BUILTIN_ROLES, PERMISSIONS, Principal
from qimem.identity.settings import IdentitySettings

__all__ = [
    "BUILTIN_ROLES",
    "PERMISSIONS",
    "Identity",
    "IdentitySettings",
    "NewSecret",
    "Principal",
    "TokenResponse",
]
