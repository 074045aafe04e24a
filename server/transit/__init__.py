"""The Vault-Transit-compatible facade (issue 17; docs/transit.md), installed as
``qimem.server.transit``: hvac, Tink and sops code runs against ``/v1/<mount>/``
(default ``/v1/transit``) unchanged. :mod:`.framework` holds the machinery; each other
module declares its endpoints in an ``OPERATIONS`` tuple, listed in :data:`MODULES`."""

from __future__ import annotations

import importlib
from functools import cache

import falcon

from qimem.app import AppContext
from qimem.server.metrics import Metrics
from qimem.server.transit.framework import (
    DEFAULT_MOUNT,
    TOKEN_PREFIX,
    TransitMiddleware,
    TransitOperation,
    add_routes,
    install_error_handlers,
)

#: The modules declaring the facade's endpoints (an ``OPERATIONS`` tuple each).
MODULES = (
    "qimem.server.transit.keys",
    "qimem.server.transit.crypto",
    "qimem.server.transit.token",
    "qimem.server.transit.signing",
    "qimem.server.transit.tools",
    "qimem.server.transit.backup",
)

__all__ = ["DEFAULT_MOUNT", "MODULES", "install", "transit_operations"]


@cache
def transit_operations() -> tuple[TransitOperation, ...]:
    """Every declared Transit endpoint, in :data:`MODULES` order."""
    found: list[TransitOperation] = []
    for name in MODULES:
        found.extend(importlib.import_module(name).OPERATIONS)
    return tuple(found)


def install(
    app: falcon.App,
    app_ctx: AppContext,
    limit: int,
    metrics: Metrics,
    mount: str,
    *,
    token_lookup: bool = True,
) -> None:
    """Serve the facade at ``/v1/<mount>`` on ``app``: its routes, its middleware (``LIST``,
    ``X-Vault-Token``) and Vault-shaped errors; with ``token_lookup``, also
    ``/v1/auth/token/lookup-self`` (not on ``qimem-api``, which serves no /v1/auth)."""
    app.add_middleware(TransitMiddleware(mount))
    install_error_handlers(app, mount)
    operations = [op for op in transit_operations() if token_lookup or op.prefix != TOKEN_PREFIX]
    add_routes(app, app_ctx, limit, metrics, mount, operations)
