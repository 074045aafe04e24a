"""The ``password`` provider's code (registered by :mod:`qimem.builtin_plugins.password_auth`).

It checks the password against the stored Argon2id hash of the realm's qimem user, through
qimem's bounded hashing gate (a fair share per client address and per account). An unknown
user, a service account or a user owned by an external provider is verified against a dummy
hash, so every refusal costs the same time. Lockout, the uniform answer and the audit record
are the host's (:mod:`qimem.identity.logins`), as for any provider.
"""

from __future__ import annotations

from qimem.identity.passwords import MIN_PASSWORD_LENGTH
from qimem.identity.providers import Authenticated, LoginAttempt


class PasswordProvider:
    """qimem's own passwords (Argon2id, re-hashed on login when the parameters changed)."""

    local = True

    def authenticate(self, attempt: LoginAttempt) -> Authenticated | None:
        stored = attempt.stored_hash
        if stored is not None and not stored.startswith("$argon2"):
            stored = None  # an external user or a client secret: same work, always refused
        hashing = attempt.hashing
        ok = hashing.verify(
            stored,
            attempt.password,
            source=attempt.source,
            account=f"{attempt.realm}/{attempt.username}"[:200],
        )
        if not ok or stored is None:
            return None
        new_hash = None
        if hashing.needs_rehash(stored) and len(attempt.password) >= MIN_PASSWORD_LENGTH:
            new_hash = hashing.hash(attempt.password)
        return Authenticated(attempt.username, verified_hash=stored, new_hash=new_hash)

    def __repr__(self) -> str:
        return "<PasswordProvider argon2id>"
