"""Finding the lineage or version a key reference (key_id, lineage_id or name) names."""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.errors import NotFoundError, ValidationError
from qimem.keys import KeyVersion, parse_uuid

__all__ = ["check_ref", "resolve"]


def check_ref(ref: Any) -> str:
    """``ref`` if it can be a key reference.

    :raises ValidationError: not a non-empty string of at most 128 characters.
    """
    if not isinstance(ref, str) or not ref or len(ref) > 128:
        raise ValidationError("a key reference must be a key_id, lineage_id or name")
    return ref


def resolve(app: AppContext, ref: str, realm: str) -> tuple[str, KeyVersion | None]:
    """``(lineage_id, exact version or None)`` for a key_id, lineage_id or name."""
    check_ref(ref)
    if parse_uuid(ref) is not None:
        try:
            version = app.store.get(realm, ref)
            return version.lineage_id, version
        except NotFoundError:
            pass
    return app.store.find_lineage(realm, ref), None
