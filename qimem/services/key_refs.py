"""Finding the lineage or version a key reference (key_id, lineage_id or name) names."""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.errors import NotFoundError, ValidationError
from qimem.keys import KeyVersion, LineagePolicy, parse_uuid

__all__ = ["check_ref", "exact_version", "resolve", "resolve_with_policy"]


def check_ref(ref: Any) -> str:
    """``ref`` if it can be a key reference.

    :raises ValidationError: not a non-empty string of at most 128 characters.
    """
    if not isinstance(ref, str) or not ref or len(ref) > 128:
        raise ValidationError("a key reference must be a key_id, lineage_id or name")
    return ref


def resolve(app: AppContext, ref: str, realm: str) -> tuple[str, KeyVersion | None]:
    """``(lineage_id, exact version or None)`` for a key_id, lineage_id or name."""
    version = exact_version(app, ref, realm)
    if version is not None:
        return version.lineage_id, version
    return app.store.find_lineage(realm, ref), None


def exact_version(app: AppContext, ref: str, realm: str) -> KeyVersion | None:
    """The version ``ref`` names if it is a key_id (None: it is a lineage id or a name).

    :raises ValidationError: ``ref`` cannot be a key reference.
    """
    check_ref(ref)
    if parse_uuid(ref) is None:
        return None
    try:
        return app.store.get(realm, ref)
    except NotFoundError:
        return None


def resolve_with_policy(
    app: AppContext, ref: str, realm: str
) -> tuple[KeyVersion, LineagePolicy, bool]:
    """``(version, its lineage's policy, exact)`` for a key_id (that version, ``exact``) or
    a lineage_id or name (its active version): what :func:`resolve`, ``active_version``
    and ``policy`` give together, in the store's one-read ``decryption_state`` /
    ``encryption_state`` (a rotation's reads: one query instead of three on SQL stores).

    :raises ValidationError: ``ref`` cannot be a key reference.
    :raises NotFoundError: no such key.
    :raises KeyNotActiveError: a lineage_id or name whose lineage has no active version.
    """
    check_ref(ref)
    if parse_uuid(ref) is not None:
        try:
            version, policy, _ = app.store.decryption_state(realm, ref)
            return version, policy, True
        except NotFoundError:
            pass  # a lineage id, or nothing
    version, policy, _ = app.store.encryption_state(realm, ref)
    return version, policy, False
