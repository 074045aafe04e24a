"""How a grant scoped to key-name patterns finds the key names a request touches.

Each finder takes ``(app, realm, body, params)`` (the JSON body, or None, and the URL's
parameters) and returns one name per key the request uses; ``None`` stands for a key whose
name cannot be known (an unparsable item, a key of another realm), which no scoped grant
covers. Finders never raise: a body they cannot read proves no permission.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from qimem import envelope, services
from qimem.app import AppContext
from qimem.errors import QimemError
from qimem.keys import parse_uuid

KeyNames = Callable[[AppContext, str, Any, dict[str, Any]], list[str | None]]


def _entries(body: Any) -> list[Any]:
    items = body.get("items") if isinstance(body, dict) else None
    return items if isinstance(items, list) else [body]


def name_of(app: AppContext, realm: str, ref: Any) -> str | None:
    """The name of the key ``ref`` names in ``realm``; a ref that is no key there counts as
    its own name unless it is a UUID (an id names no pattern-matchable key)."""
    if not isinstance(ref, str):
        return None
    try:
        return services.show_key(app, ref, realm=realm).name
    except QimemError:
        return ref if parse_uuid(ref) is None else None


def envelope_name(app: AppContext, realm: str, entry: Any) -> str | None:
    """The name of the key that sealed ``entry["envelope"]`` (None when unknown)."""
    try:
        blob = base64.b64decode(entry["envelope"], validate=True)
        key_id = envelope.parse(blob).key_id_str
        return app.store.get(realm, key_id).name
    except (QimemError, KeyError, TypeError, ValueError, binascii.Error):
        return None


def ref_names(app: AppContext, realm: str, body: Any, params: dict[str, Any]) -> list[str | None]:
    """The keys named by ``key_id`` or ``key`` of the body or of each batch item."""
    return [
        name_of(app, realm, e.get("key_id") or e.get("key")) if isinstance(e, dict) else None
        for e in _entries(body)
    ]


def envelope_names(
    app: AppContext, realm: str, body: Any, params: dict[str, Any]
) -> list[str | None]:
    """The keys that sealed the ``envelope`` of the body or of each batch item."""
    return [envelope_name(app, realm, e) for e in _entries(body)]


def new_key_name(
    app: AppContext, realm: str, body: Any, params: dict[str, Any]
) -> list[str | None]:
    """The ``name`` a new key is to get."""
    return [body.get("name") if isinstance(body, dict) else None]


def param_key(app: AppContext, realm: str, body: Any, params: dict[str, Any]) -> list[str | None]:
    """The key named in the URL (``{key_id}``)."""
    return [name_of(app, realm, params.get("key_id"))]


def _targeted(body: Any) -> list[dict[str, Any]]:
    return [e for e in _entries(body) if isinstance(e, dict) and e.get("target") is not None]


def target_names(
    app: AppContext, realm: str, body: Any, params: dict[str, Any]
) -> list[str | None]:
    """The ``target`` keys of a rewrap (body or items; none when no item names one)."""
    return [name_of(app, realm, e["target"]) for e in _targeted(body)]


def retargeted_sources(
    app: AppContext, realm: str, body: Any, params: dict[str, Any]
) -> list[str | None]:
    """The keys that sealed the envelopes a rewrap moves to a ``target`` key."""
    return [envelope_name(app, realm, e) for e in _targeted(body)]
