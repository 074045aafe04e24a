"""``GET /v1/auth/token/lookup-self``: what hvac's ``is_authenticated()`` and
``lookup_self()`` call. It describes the qimem access token in Vault's shape, never
echoing the token itself: ``policies`` are the token's permissions, ``ttl`` its remaining
seconds, ``meta`` its user and realm."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from qimem.server.transit.framework import (
    TOKEN_PREFIX,
    TransitOperation,
    TransitRequest,
    VaultError,
)


def _lookup_self(request: TransitRequest) -> dict[str, Any]:
    principal = request.principal
    if principal is None:  # only with --insecure-no-auth: there is no token to describe
        raise VaultError("permission denied: this server runs without tokens", 403)
    expires = principal.expires_at
    ttl = max(0, int(expires - time.time())) if expires is not None else 0
    return {
        "accessor": principal.token_id or "",
        "display_name": f"{principal.realm}-{principal.username}",
        "entity_id": principal.subject,
        "expire_time": (
            datetime.fromtimestamp(expires, UTC).isoformat() if expires is not None else None
        ),
        "explicit_max_ttl": 0,
        "meta": {"realm": principal.realm, "username": principal.username},
        "num_uses": 0,
        "orphan": True,
        "path": f"auth/realms/{principal.realm}/token",
        "policies": sorted(principal.permissions),
        "renewable": False,
        "ttl": ttl,
        "type": principal.kind,
    }


OPERATIONS = (
    TransitOperation(
        "transitLookupSelf",
        "GET",
        "/lookup-self",
        _lookup_self,
        key_names=None,
        prefix=TOKEN_PREFIX,
    ),
)
