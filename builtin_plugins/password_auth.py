"""The built-in ``password`` login provider: qimem's own users, Argon2id hashes.

Registered through ``qimem_register_auth_providers`` exactly as a third-party provider is,
by reference: :class:`qimem.builtin_plugins.password_provider.PasswordProvider` is imported
when a login first needs it.
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAuthProvider


@hookimpl
def qimem_register_auth_providers(register: RegisterAuthProvider) -> None:
    register("password", "qimem.builtin_plugins.password_provider:PasswordProvider")


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "password-auth",
        "version": "1.0.0",
        "description": "Login with qimem's own users and Argon2id password hashes",
        "provides": {"auth_providers": ["password"]},
        "qimem_api": ">=1,<2",
    }
