"""The built-in ``ldap`` login provider: users of an LDAP directory (OpenLDAP, Active
Directory ...) log in with their directory password; their groups map to qimem roles.

Registered by reference, like any plugin may: the provider's code and ``ldap3``
(:class:`qimem.builtin_plugins.ldap_provider.LdapProvider`) are imported only when a realm
is configured with it or a login asks it. A realm uses it only if its provider chain names
``ldap`` (``qauth realm set-providers``; docs/identity.md, "Login providers").
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAuthProvider


@hookimpl
def qimem_register_auth_providers(register: RegisterAuthProvider) -> None:
    register("ldap", "qimem.builtin_plugins.ldap_provider:LdapProvider")


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "ldap-auth",
        "version": "1.0.0",
        "description": "Login against an LDAP directory (simple bind, StartTLS/LDAPS, "
        "group → role mapping), with ldap3",
        "provides": {"auth_providers": ["ldap"]},
        "qimem_api": ">=1,<2",
    }
