"""The built-in ``jwt`` login provider: workloads and people with a JWT from an issuer the
realm trusts (Vault's identity tokens, Kubernetes service-account tokens, CI OIDC tokens,
any OpenID Connect provider) swap it for a qimem access token at the token endpoint
(``urn:ietf:params:oauth:grant-type:jwt-bearer`` or token exchange).

Registered by reference, like any plugin may: the provider's code
(:class:`qimem.builtin_plugins.jwt_provider.JwtProvider`, on PyJWT) is imported only when a
realm is configured with it or a login asks it. A realm uses it only if its provider chain
names ``jwt`` (docs/identity.md, "External JWT / OIDC identities").
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAuthProvider


@hookimpl
def qimem_register_auth_providers(register: RegisterAuthProvider) -> None:
    register("jwt", "qimem.builtin_plugins.jwt_provider:JwtProvider")


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "jwt-auth",
        "version": "1.0.0",
        "description": "Login with a JWT from a trusted issuer (OIDC discovery, JWKS or a "
        "public key; bound audiences and claims, claim → role mapping), with PyJWT",
        "provides": {"auth_providers": ["jwt"]},
        "qimem_api": ">=1,<2",
    }
