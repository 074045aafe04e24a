"""The Transit facade in the OpenAPI document, derived from its declarations: one path per
declared endpoint (at the default mount; ``OpenApiResource`` renames it to the configured
one), Vault's response envelope and ``{"errors": [...]}`` bodies. The fields themselves are
Vault's (docs/transit.md), so bodies are documented as open objects."""

from __future__ import annotations

import re
from typing import Any

from qimem.server.transit import transit_operations
from qimem.server.transit.framework import DEFAULT_MOUNT, TransitOperation

TAG = "transit (Vault-compatible)"
_ERRORS = {
    400: "Vault's user error: bad input, a crypto failure, an unknown key on a write.",
    403: "permission denied: no, a bad or an insufficient token.",
    404: "unsupported path, or no such key on a read.",
    405: "a GET of keys without list=true (use LIST).",
    413: "request body over the server's limit.",
    503: "the key store is unavailable.",
}
_PARAM = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
}
SCHEMAS: dict[str, Any] = {
    "VaultResponse": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "request_id": {"type": "string"},
            "lease_id": {"type": "string"},
            "renewable": {"type": "boolean"},
            "lease_duration": {"type": "integer"},
            "data": {"type": ["object", "null"]},
            "wrap_info": {"type": "null"},
            "warnings": {"type": ["array", "null"], "items": {"type": "string"}},
            "auth": {"type": "null"},
        },
    },
    "VaultErrors": {
        "type": "object",
        "required": ["errors"],
        "properties": {"errors": {"type": "array", "items": {"type": "string"}}},
    },
    "VaultRequest": {
        "type": ["object", "null"],
        "description": "Vault's fields (docs/transit.md); null counts as {}.",
    },
}


def _fragment(op: TransitOperation) -> dict[str, Any]:
    params = re.findall(r"{(\w+)}", op.path)
    errors = [400, 403, 413, 503, 404]
    if op.path == "/keys":
        errors.append(405)
    entry: dict[str, Any] = {
        "operationId": op.name,
        "tags": [TAG],
        "summary": f"Vault Transit {op.method} {op.path}"
        + (f" (as /v1/security {op.binds})" if op.binds else ""),
        "responses": {
            "200": {
                "description": "Vault's response envelope.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/VaultResponse"}}
                },
            },
            **{str(s): {"$ref": f"#/components/responses/EVault{s}"} for s in errors},
        },
    }
    if op.method in ("POST", "DELETE"):
        entry["responses"]["204"] = {"description": "Done (no body)."}
    parameters = [{"name": p, "in": "path", "required": True, "schema": _PARAM} for p in params]
    if op.path == "/keys":
        parameters.append(
            {
                "name": "list",
                "in": "query",
                "required": False,
                "schema": {"enum": ["true", "false", "1", "0", "t", "f"]},
            }
        )
    if parameters:
        entry["parameters"] = parameters
    if op.method == "POST":
        entry["requestBody"] = {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/VaultRequest"}}
            },
        }
    return entry


def add_to_openapi(doc: dict[str, Any]) -> None:
    """Add the facade's paths (at the default mount), schemas and error responses."""
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(SCHEMAS)
    responses = components.setdefault("responses", {})
    for status, description in _ERRORS.items():
        responses[f"EVault{status}"] = {
            "description": description,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/VaultErrors"}}
            },
        }
    paths = doc.setdefault("paths", {})
    for op in transit_operations():
        paths.setdefault(op.full_path(DEFAULT_MOUNT), {})[op.method.lower()] = _fragment(op)


def mounted(path: str, mount: str) -> str:
    """``path`` of the document as served with the facade at ``/v1/<mount>``."""
    prefix = f"/v1/{DEFAULT_MOUNT}/"
    if mount != DEFAULT_MOUNT and path.startswith(prefix):
        return f"/v1/{mount}/" + path[len(prefix) :]
    return path
