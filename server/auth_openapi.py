"""The OpenAPI description of ``/v1/auth`` and of bearer authentication, merged into the
server's document by :func:`qimem.server.ops.openapi_document`."""

from __future__ import annotations

import copy
from typing import Any

from qimem.identity.permissions import PERMISSIONS

_REALM = {
    "name": "realm",
    "in": "path",
    "required": True,
    "description": "Realm name.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z][a-z0-9_-]{0,62}$",
    },
}
_USERNAME = {
    "name": "username",
    "in": "path",
    "required": True,
    "description": "User or service account name.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$",
    },
}
_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+*?-]{0,127}$",
}
_SECRET = {"type": "string", "minLength": 1, "maxLength": 1024}


def _obj(properties: dict[str, Any], required: list[str], *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    "Realm": _obj(
        {"name": {"type": "string"}, "created_at": {"type": "string"}}, ["name"], closed=False
    ),
    "RealmList": _obj({"realms": {"type": "array", "items": _ref("Realm")}}, ["realms"]),
    "CreateRealmRequest": _obj({"name": _NAME}, ["name"]),
    "User": _obj(
        {
            "user_id": {"type": "string"},
            "username": {"type": "string"},
            "realm": {"type": "string"},
            "kind": {"type": "string", "enum": ["user", "client"]},
            "enabled": {"type": "boolean"},
            "locked": {"type": "boolean"},
            "roles": {"type": "array", "items": {"type": "string"}},
        },
        ["user_id", "username", "realm", "kind", "enabled", "roles"],
        closed=False,
    ),
    "UserList": _obj({"users": {"type": "array", "items": _ref("User")}}, ["users"]),
    "CreateUserRequest": _obj(
        {
            "username": _NAME,
            "password": _SECRET,
            "roles": {"type": "array", "maxItems": 64, "items": _NAME},
        },
        ["username", "password"],
    ),
    "UpdateUserRequest": {
        **_obj({"enabled": {"type": "boolean"}, "password": _SECRET}, []),
        "minProperties": 1,
    },
    "GrantRequest": _obj({"role": _NAME, "scope": {**_NAME, "type": ["string", "null"]}}, ["role"]),
    "GrantResult": _obj(
        {"username": {"type": "string"}, "role": {"type": "string"}},
        ["username", "role"],
        closed=False,
    ),
    "Role": _obj(
        {
            "name": {"type": "string"},
            "realm": {"type": "string"},
            "permissions": {"type": "array", "items": {"type": "string"}},
            "builtin": {"type": "boolean"},
            "description": {"type": "string"},
        },
        ["name", "permissions", "builtin"],
        closed=False,
    ),
    "RoleList": _obj({"roles": {"type": "array", "items": _ref("Role")}}, ["roles"]),
    "CreateRoleRequest": _obj(
        {
            "name": _NAME,
            "permissions": {
                "type": "array",
                "minItems": 1,
                "maxItems": 64,
                "items": {"type": "string", "enum": list(PERMISSIONS)},
            },
            "description": {"type": "string", "maxLength": 256},
        },
        ["name", "permissions"],
    ),
    "CreateClientRequest": _obj(
        {"client_id": _NAME, "roles": {"type": "array", "maxItems": 64, "items": _NAME}},
        ["client_id"],
    ),
    "NewClient": _obj(
        {"client_id": {"type": "string"}, "client_secret": {"type": "string"}},
        ["client_id", "client_secret"],
        closed=False,
    ),
    "TokenRequest": _obj(
        {
            "grant_type": {
                "type": "string",
                "enum": ["password", "refresh_token", "client_credentials"],
            },
            "username": {"type": "string"},
            "password": {"type": "string"},
            "refresh_token": {"type": "string"},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string"},
        },
        ["grant_type"],
        closed=False,
    ),
    "TokenResponse": _obj(
        {
            "access_token": {"type": "string"},
            "token_type": {"type": "string", "enum": ["Bearer"]},
            "expires_in": {"type": "integer"},
            "refresh_token": {"type": "string"},
            "refresh_expires_in": {"type": "integer"},
        },
        ["access_token", "token_type", "expires_in"],
    ),
    "TokenParam": _obj({"token": {"type": "string", "minLength": 1}}, ["token"], closed=False),
    "Revoked": _obj({"revoked": {"type": "boolean"}}, ["revoked"]),
    "Introspection": _obj({"active": {"type": "boolean"}}, ["active"], closed=False),
    "Jwks": _obj(
        {
            "keys": {
                "type": "array",
                "items": _obj(
                    {
                        "kty": {"type": "string", "enum": ["OKP"]},
                        "crv": {"type": "string", "enum": ["Ed25519"]},
                        "x": {"type": "string"},
                        "kid": {"type": "string"},
                        "use": {"type": "string"},
                        "alg": {"type": "string", "enum": ["EdDSA"]},
                    },
                    ["kty", "crv", "x", "kid"],
                ),
            }
        },
        ["keys"],
    ),
    "AuditList": _obj(
        {
            "events": {
                "type": "array",
                "items": _obj(
                    {
                        "id": {"type": "integer"},
                        "at": {"type": "string"},
                        "realm": {"type": "string"},
                        "actor": {"type": "string"},
                        "action": {"type": "string"},
                        "target": {"type": "string"},
                        "outcome": {"type": "string"},
                        "detail": {"type": "object"},
                    },
                    ["id", "at", "realm", "actor", "action", "outcome"],
                    closed=False,
                ),
            }
        },
        ["events"],
    ),
    "SigningKey": _obj({"realm": {"type": "string"}, "kid": {"type": "string"}}, ["realm", "kid"]),
    # Login providers (docs/identity.md, "Login providers"); provider options are open.
    "RealmProviders": _obj(
        {
            "providers": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "mapping": {"type": "object"},  # the older realm-wide form
            "mappings": {"type": "object"},  # per provider (and per trusted issuer)
        },
        ["providers"],
        closed=False,
    ),
    "ExternalUserRequest": _obj(
        {"username": {"type": "string"}, "provider": {"type": "string"}},
        ["username", "provider"],
    ),
}

E401 = {
    "description": "Missing, malformed, expired, revoked or forged credentials "
    "(WWW-Authenticate: Bearer).",
    "content": {"application/json": {"schema": _ref("Error")}},
}


def _json_body(schema: str, *, form: bool = False) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref(schema)}}
    if form:
        content["application/x-www-form-urlencoded"] = {"schema": _ref(schema)}
    return {"required": True, "content": content}


def _op(
    op_id: str,
    summary: str,
    ok: str,
    schema: str | None,
    errors: list[int],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if schema is None:
        responses[ok] = {"description": "Done."}
    else:
        responses[ok] = {
            "description": "Success.",
            "content": {"application/json": {"schema": _ref(schema)}},
        }
    for status in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": ["auth"],
        "summary": summary,
        "responses": responses,
    }
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


_READ = [401, 403, 404, 503]
_WRITE = [400, 401, 403, 404, 409, 413, 415, 503]

PATHS: dict[str, Any] = {
    "/v1/auth/realms": {
        "get": _op(
            "listRealms", "List realms (master realm admins).", "200", "RealmList", [401, 403, 503]
        ),
        "post": _op(
            "createRealm",
            "Create a realm with the built-in roles and its own signing key.",
            "201",
            "Realm",
            _WRITE,
            body=_json_body("CreateRealmRequest"),
        ),
    },
    "/v1/auth/realms/{realm}": {
        "delete": _op(
            "deleteRealm",
            "Delete a realm (refused for master and while it holds keys).",
            "204",
            None,
            [400, 401, 403, 404, 409, 503],
            params=[_REALM],
        )
    },
    "/v1/auth/realms/{realm}/users": {
        "get": _op(
            "listUsers",
            "Users and service accounts of the realm.",
            "200",
            "UserList",
            _READ,
            params=[_REALM],
        ),
        "post": _op(
            "createUser",
            "Add a user.",
            "201",
            "User",
            _WRITE,
            params=[_REALM],
            body=_json_body("CreateUserRequest"),
        ),
    },
    "/v1/auth/realms/{realm}/users/{username}": {
        "patch": _op(
            "updateUser",
            "Enable/disable a user or set their password.",
            "200",
            "User",
            [400, 401, 403, 404, 413, 415, 503],
            params=[_REALM, _USERNAME],
            body=_json_body("UpdateUserRequest"),
        )
    },
    "/v1/auth/realms/{realm}/users/{username}/roles": {
        "post": _op(
            "grantRole",
            "Grant a role, optionally scoped to key names matching a pattern.",
            "200",
            "GrantResult",
            _WRITE,
            params=[_REALM, _USERNAME],
            body=_json_body("GrantRequest"),
        ),
        "delete": _op(
            "revokeRole",
            "Revoke a role (every scope unless one is given).",
            "200",
            "GrantResult",
            _WRITE,
            params=[_REALM, _USERNAME],
            body=_json_body("GrantRequest"),
        ),
    },
    "/v1/auth/realms/{realm}/roles": {
        "get": _op("listRoles", "Roles of the realm.", "200", "RoleList", _READ, params=[_REALM]),
        "post": _op(
            "createRole",
            "Create a custom role.",
            "201",
            "Role",
            _WRITE,
            params=[_REALM],
            body=_json_body("CreateRoleRequest"),
        ),
    },
    "/v1/auth/realms/{realm}/clients": {
        "post": _op(
            "createClient",
            "Create a service account; its secret is in this response only.",
            "201",
            "NewClient",
            _WRITE,
            params=[_REALM],
            body=_json_body("CreateClientRequest"),
        )
    },
    "/v1/auth/realms/{realm}/token": {
        "post": _op(
            "token",
            "OAuth2 token endpoint: grant_type password, refresh_token or client_credentials "
            "(form-encoded or JSON). Public.",
            "200",
            "TokenResponse",
            [400, 401, 413, 415, 503],
            params=[_REALM],
            body=_json_body("TokenRequest", form=True),
        )
    },
    "/v1/auth/realms/{realm}/revoke": {
        "post": _op(
            "revoke",
            "RFC 7009 revocation of an access token or a refresh token's family. Public.",
            "200",
            "Revoked",
            [400, 404, 413, 415, 503],
            params=[_REALM],
            body=_json_body("TokenParam", form=True),
        )
    },
    "/v1/auth/realms/{realm}/introspect": {
        "post": _op(
            "introspect",
            "RFC 7662 introspection (needs a bearer token of the realm).",
            "200",
            "Introspection",
            [400, 401, 404, 413, 415, 503],
            params=[_REALM],
            body=_json_body("TokenParam", form=True),
        )
    },
    "/v1/auth/realms/{realm}/jwks": {
        "get": _op(
            "jwks",
            "The realm's public signing keys (JWK Set). Public.",
            "200",
            "Jwks",
            [404, 503],
            params=[_REALM],
        )
    },
    "/v1/auth/realms/{realm}/audit": {
        "get": _op(
            "audit",
            "Newest-first audit records (needs audit:read).",
            "200",
            "AuditList",
            [400, 401, 403, 404, 503],
            params=[
                _REALM,
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                {
                    "name": "action",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 64},
                },
                {
                    "name": "actor",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 160},
                },
            ],
        )
    },
    "/v1/auth/realms/{realm}/signing-key/rotate": {
        "post": _op(
            "rotateSigningKey",
            "Sign with a new key; old keys stay in the JWKS until their tokens expire.",
            "200",
            "SigningKey",
            [401, 403, 404, 503],
            params=[_REALM],
        )
    },
}

_PROVIDERS_ERRORS = [400, 401, 403, 404, 503]
PATHS["/v1/auth/realms/{realm}/providers"] = {
    "get": _op(
        "getRealmProviders",
        "The realm's login providers and role mapping (master realm admins).",
        "200",
        "RealmProviders",
        _PROVIDERS_ERRORS,
        params=[_REALM],
    ),
    "put": _op(
        "setRealmProviders",
        "Replace the realm's login providers and role mapping (master realm admins).",
        "200",
        "RealmProviders",
        _PROVIDERS_ERRORS,
        params=[_REALM],
        body=_json_body("RealmProviders"),
    ),
    "delete": _op(
        "resetRealmProviders",
        "Back to the password provider alone (master realm admins).",
        "200",
        "RealmProviders",
        _PROVIDERS_ERRORS,
        params=[_REALM],
    ),
}
PATHS["/v1/auth/realms/{realm}/providers/users"] = {
    "post": _op(
        "addExternalUser",
        "Provision a user for an external login provider (master realm admins).",
        "201",
        "User",
        [*_PROVIDERS_ERRORS, 409],
        params=[_REALM],
        body=_json_body("ExternalUserRequest"),
    )
}

# External JWT / OIDC identities and OIDC discovery (docs/identity.md).
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a grant type URN, not a password
SCHEMAS["TokenRequest"]["properties"]["grant_type"]["enum"] += [_JWT_BEARER, _TOKEN_EXCHANGE]
SCHEMAS["TokenRequest"]["properties"].update(
    {
        "assertion": {"type": "string", "description": "jwt-bearer: the external JWT."},
        "subject_token": {"type": "string", "description": "token-exchange: the external JWT."},
        "subject_token_type": {
            "type": "string",
            "enum": [
                "urn:ietf:params:oauth:token-type:jwt",
                "urn:ietf:params:oauth:token-type:id_token",
            ],
        },
        "requested_token_type": {
            "type": "string",
            "enum": ["urn:ietf:params:oauth:token-type:access_token"],
        },
    }
)
SCHEMAS["TokenResponse"]["properties"]["issued_token_type"] = {
    "type": "string",
    "description": "token-exchange only: urn:ietf:params:oauth:token-type:access_token.",
}
SCHEMAS["OpenIdConfiguration"] = _obj(
    {
        "issuer": {"type": "string"},
        "jwks_uri": {"type": "string"},
        "token_endpoint": {"type": "string"},
        "grant_types_supported": {"type": "array", "items": {"type": "string"}},
        "id_token_signing_alg_values_supported": {"type": "array", "items": {"type": "string"}},
    },
    ["issuer", "jwks_uri", "token_endpoint", "grant_types_supported"],
    closed=False,
)
PATHS["/v1/auth/realms/{realm}/token"]["post"]["summary"] = (
    "OAuth2 token endpoint: grant_type password, refresh_token, client_credentials, or an "
    "external JWT with urn:ietf:params:oauth:grant-type:jwt-bearer (assertion) or "
    "urn:ietf:params:oauth:grant-type:token-exchange (subject_token) for a realm whose login "
    "providers include jwt (form-encoded or JSON). Public."
)
PATHS["/v1/auth/realms/{realm}/.well-known/openid-configuration"] = {
    "get": _op(
        "openidConfiguration",
        "OpenID Connect discovery: the realm's issuer (the iss of its tokens), JWKS and token "
        "endpoint, grants and signing algorithms. Public.",
        "200",
        "OpenIdConfiguration",
        [400, 404, 503],
        params=[_REALM],
    )
}

# Service accounts' lifecycle (issue 15 item 5): qimem.server.clients_api.
from qimem.server import clients_api as _clients  # noqa: E402

SCHEMAS.update(_clients.OPENAPI_SCHEMAS)
PATHS["/v1/auth/realms/{realm}/clients"]["get"] = _clients.list_operation(_op, _REALM)
PATHS.update(_clients.openapi_paths(_op, _REALM, _json_body))
# The second factor of password users (issue 15 item 6): qimem.server.otp_api.
from qimem.server import otp_api as _otp  # noqa: E402

SCHEMAS.update(_otp.OPENAPI_SCHEMAS)
PATHS.update(_otp.openapi_paths(_op, _REALM, _USERNAME))
SCHEMAS["TokenRequest"]["properties"]["otp"] = {"type": "string", "maxLength": 64}

_PUBLIC = {"/healthz", "/readyz", "/metrics"}
AUTH_NOTE = (
    " Authentication: every endpoint except /healthz, /readyz, /metrics, the JWKS, OIDC "
    "discovery, token and revocation endpoints needs 'Authorization: Bearer <access token>' from "
    "POST /v1/auth/realms/{realm}/token (401 without a valid token, 403 without the "
    "permission, 404 for another realm's keys); servers started with --insecure-no-auth "
    "serve loopback clients without tokens."
)


def add_auth(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the ``/v1/auth`` paths, their schemas, and 401 responses to ``doc`` (in place)."""
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(copy.deepcopy(SCHEMAS))
    components.setdefault("responses", {})["E401"] = copy.deepcopy(E401)
    for path, ops in doc.get("paths", {}).items():
        if path in _PUBLIC or path.startswith("/v1/auth/"):
            continue
        for op in ops.values():
            op.setdefault("responses", {}).setdefault(
                "401", {"$ref": "#/components/responses/E401"}
            )
    doc.setdefault("paths", {}).update(copy.deepcopy(PATHS))
    info = doc.setdefault("info", {})
    if AUTH_NOTE not in info.get("description", ""):
        info["description"] = (
            info.get("description", "").replace(
                " Authentication is not available yet: servers run with --insecure-no-auth, "
                "bound to loopback only.",
                "",
            )
            + AUTH_NOTE
        )
    return doc
