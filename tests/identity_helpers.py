"""Shared helpers for the identity tests: cheap Argon2 settings and an app with identity."""

from __future__ import annotations

from qimem.app import AppContext
from qimem.identity import IdentitySettings
from qimem.services import identity as ids

#: Argon2 at 1 MiB / t=1 keeps tests fast; production defaults are tested separately.
FAST = dict(argon2_memory_kib=1024, argon2_time_cost=1, argon2_parallelism=1)


def fast_settings(**overrides: object) -> IdentitySettings:
    return IdentitySettings(**{**FAST, **overrides})  # type: ignore[arg-type]


def with_identity(app: AppContext, **overrides: object) -> AppContext:
    """``app`` with fast identity settings, realm master + admin (password 'admin-password')."""
    ids.configure(app, fast_settings(**overrides))
    ids.bootstrap(app, "admin-password")
    return app


def password_login(app: AppContext, realm: str, username: str, password: str):  # type: ignore[no-untyped-def]
    return ids.token(
        app, realm, {"grant_type": "password", "username": username, "password": password}
    )
