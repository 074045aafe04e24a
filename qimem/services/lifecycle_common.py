"""What the lifecycle services share: auditing an operation and finding the lineage or
version a reference names."""

from __future__ import annotations

import logging
from typing import Any

from qimem.app import AppContext
from qimem.errors import NotFoundError, ValidationError
from qimem.keys import KeyVersion, validate_realm
from qimem.services.keys import resolve

log = logging.getLogger("qimem.services.lifecycle")


# -- audit -------------------------------------------------------------------------------


def audit(
    app: AppContext, realm: str, actor: str | None, action: str, target: str, **detail: Any
) -> None:
    """Record a lifecycle operation when the caller names an actor (the CLI and HTTP do)."""
    if actor is None:
        return
    from qimem.services.identity import audit_key_operation

    try:
        audit_key_operation(app, realm, actor, action, target, buffered=False, **detail)
    except Exception:  # auditing never turns a committed change into an error
        log.warning("could not record the audit event %s", action, exc_info=True)


# -- lookups -----------------------------------------------------------------------------


def lineage_of(app: AppContext, ref: str, realm: str) -> str:
    """The lineage_id ``ref`` (a key_id, lineage_id or name) names in ``realm``."""
    validate_realm(realm)
    lineage_id, _ = resolve(app, ref, realm)
    return lineage_id


def version_of(app: AppContext, ref: str, version: int | None, realm: str) -> KeyVersion:
    """The version a ``(ref, version)`` pair names: a key_id alone, or any ref and a number."""
    validate_realm(realm)
    lineage_id, exact = resolve(app, ref, realm)
    if version is None:
        if exact is None:
            raise ValidationError("name a version: give a key_id, or a key and --version N")
        return exact
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValidationError("version must be a positive integer")
    if exact is not None and exact.version != version:
        raise ValidationError(f"key {exact.key_id} is version {exact.version}, not {version}")
    for candidate in app.store.versions(realm, lineage_id):
        if candidate.version == version:
            return candidate
    raise NotFoundError(f"key {ref!r} has no version {version}")
