"""OpenID Connect for qimem's realms: the discovery document of a realm (so that an
off-the-shelf OIDC/JWT library verifies qimem's tokens with no qimem code) and the grants
that swap an external JWT for a qimem access token (RFC 7523 ``jwt-bearer`` and RFC 8693
token exchange), answered by the realm's assertion-capable login providers
(:mod:`qimem.identity.assertion_logins`, the built-in ``jwt`` provider).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.identity.assertion_logins import JWT_BEARER, TOKEN_EXCHANGE, assertion_grant
from qimem.services.identity import GRANT_TYPES, identity

#: The token endpoint's grant types that take an external JWT.
ASSERTION_GRANTS = (JWT_BEARER, TOKEN_EXCHANGE)
#: RFC 8693 token types: what ``subject_token_type`` may name, what is issued.
JWT_TOKEN_TYPES = (
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a type name)
#: The longest assertion the token endpoint reads at all (a provider's own limit is lower).
MAX_ASSERTION = 64 * 1024
#: qimem's access tokens (:mod:`qimem.identity.tokens`): Ed25519 signatures.
SIGNING_ALGORITHMS = ["EdDSA"]
_ORIGIN = re.compile(
    r"^https?://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$"
)


def _origin(issuer_base: str, request_origin: str) -> str:
    """Where the realm's endpoints are: the origin of ``identity.issuer_base`` when it is an
    http(s) URL (what the operator published; a forged ``Host`` changes nothing), else the
    request's (its scheme is the trusted proxy's ``X-Forwarded-Proto``)."""
    parts = urllib.parse.urlsplit(issuer_base)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    if not _ORIGIN.match(request_origin):
        raise ValidationError("the request's Host header is not a host name", code="bad_host")
    return request_origin


def discovery(app: AppContext, realm: str, request_origin: str) -> dict[str, Any]:
    """The OpenID Provider metadata of ``realm`` (``/.well-known/openid-configuration``).

    ``issuer`` is exactly the ``iss`` of the realm's tokens. There is no authorization
    endpoint (no browser flows): tokens come from the token endpoint's grants.

    :raises NotFoundError: ``realm`` does not exist (as for its JWKS).
    """
    ident = identity(app)
    ident.require_realm(realm)
    settings = ident.settings
    base = f"{_origin(settings.issuer_base, request_origin)}/v1/auth/realms/"
    base += urllib.parse.quote(realm, safe="")
    return {
        "issuer": settings.issuer(realm),
        "jwks_uri": f"{base}/jwks",
        "token_endpoint": f"{base}/token",
        "revocation_endpoint": f"{base}/revoke",
        "introspection_endpoint": f"{base}/introspect",
        "grant_types_supported": [*GRANT_TYPES, *ASSERTION_GRANTS],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": SIGNING_ALGORITHMS,
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "nbf",
            "jti",
            "realm",
            "roles",
            "scoped_roles",
            "preferred_username",
            "kind",
        ],
    }


def _param(params: dict[str, Any], name: str, grant: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{name} is required for grant_type={grant}", code="invalid_request")
    if len(value) > MAX_ASSERTION:
        raise ValidationError(f"{name} is too long", code="invalid_request")
    return value


def assertion_token(
    app: AppContext, realm: str, params: dict[str, Any], *, source: str | None = None
) -> dict[str, Any]:
    """The token endpoint for an external JWT: ``grant_type`` jwt-bearer (``assertion``)
    or token-exchange (``subject_token`` with ``subject_token_type`` jwt or id_token;
    ``requested_token_type``, if given, access_token; no ``actor_token``). The answer is a
    qimem access token without a refresh token (present a fresh external JWT instead).

    :raises ValidationError: a missing or malformed parameter (400).
    :raises AuthError: the JWT is not acceptable (one uniform 401; the reason is audited).
    :raises ProviderUnavailableError: the issuer could not be reached (503).
    """
    grant = params.get("grant_type")
    if grant == JWT_BEARER:
        assertion = _param(params, "assertion", grant)
    elif grant == TOKEN_EXCHANGE:
        assertion = _param(params, "subject_token", grant)
        kind = params.get("subject_token_type")
        if kind not in JWT_TOKEN_TYPES:
            raise ValidationError(
                "subject_token_type must be " + " or ".join(JWT_TOKEN_TYPES),
                code="invalid_request",
            )
        wanted = params.get("requested_token_type")
        if wanted not in (None, "", ACCESS_TOKEN_TYPE):
            raise ValidationError(
                f"requested_token_type must be {ACCESS_TOKEN_TYPE}", code="invalid_request"
            )
        if params.get("actor_token"):
            raise ValidationError(
                "actor_token (delegation) is not supported", code="invalid_request"
            )
    else:
        raise ValidationError(
            f"grant_type must be one of {', '.join(ASSERTION_GRANTS)}",
            code="unsupported_grant_type",
        )
    name = "jwt-bearer" if grant == JWT_BEARER else "token-exchange"
    issued = assertion_grant(identity(app), realm, assertion, grant=name, source=source)
    body = issued.to_dict()
    if grant == TOKEN_EXCHANGE:
        body["issued_token_type"] = ACCESS_TOKEN_TYPE
    return body


__all__ = ["ASSERTION_GRANTS", "MAX_ASSERTION", "assertion_token", "discovery"]
