"""What the key and lifecycle services share: auditing an operation, finding the lineage or
version a reference names, a key's purpose, and the pending-deletion check (with the
deletion it triggers once due). Imports neither :mod:`qimem.services.keys` nor
:mod:`qimem.services.lifecycle`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from qimem.app import AppContext
from qimem.crypto import DEFAULT_PURPOSE
from qimem.errors import ConflictError, DecryptionError, NotFoundError, ValidationError
from qimem.keys import KeyVersion, LineagePolicy, validate_realm
from qimem.lazylog import get_logger
from qimem.services.key_refs import resolve

log = get_logger("qimem.services.lifecycle")


# -- audit -------------------------------------------------------------------------------


def audit(
    app: AppContext,
    realm: str,
    actor: str | None,
    action: str,
    target: str,
    *,
    buffered: bool = False,
    **detail: Any,
) -> None:
    """Record a lifecycle operation when the caller names an actor (the CLI and HTTP do).

    ``buffered``: written with the next batch (message operations such as
    ``crypto.sign``), not before returning (lifecycle changes)."""
    if actor is None:
        return
    from qimem.services.identity import audit_key_operation

    try:
        audit_key_operation(app, realm, actor, action, target, buffered=buffered, **detail)
    except Exception:  # auditing never turns a committed change into an error
        log.warning("could not record the audit event %s; it is buffered", action)
        try:  # buffered: written later, through the audit spill while the store is down
            audit_key_operation(app, realm, actor, action, target, buffered=True, **detail)
        except Exception:
            log.warning("could not buffer the audit event %s", action)


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


# -- purposes ---------------------------------------------------------------------------


def purpose_of_algorithm(app: AppContext, algorithm: str) -> str:
    """The purpose of the algorithm called ``algorithm`` (``encrypt``, ``sign``, ``mac``,
    ``deterministic``); ``encrypt`` for one no loaded plugin provides (as before purposes)."""
    return app.registry.algorithm_purposes.get(algorithm, DEFAULT_PURPOSE)


def key_purpose(app: AppContext, version: KeyVersion) -> str:
    """The purpose of a key version's lineage: its algorithm's."""
    return purpose_of_algorithm(app, version.algorithm)


def algorithm_of_key(app: AppContext, version: KeyVersion) -> Any:
    """``version``'s algorithm object, whatever its purpose.

    :raises UnsupportedAlgorithmError: no loaded plugin provides it.
    """
    return app.registry.algorithm(version.algorithm, key_purpose(app, version))


def require_purpose(app: AppContext, version: KeyVersion, wanted: str, operation: str) -> str:
    """``version``'s purpose if it is ``wanted``.

    :raises ValidationError: ``wrong_purpose``, naming the key, its purpose and what
        ``operation`` needs.
    """
    purpose = key_purpose(app, version)
    if purpose != wanted:
        label = version.name or version.lineage_id
        raise ValidationError(
            f"key {label} is {_KINDS.get(purpose, purpose)} key ({version.algorithm}); "
            f"{operation} needs {_KINDS.get(wanted, wanted)} key",
            code="wrong_purpose",
        )
    return purpose


#: How messages name a key of each purpose.
_KINDS = {
    "encrypt": "an encryption",
    "sign": "a signing",
    "mac": "a MAC",
    "deterministic": "a deterministic encryption",
}


# -- deletion ----------------------------------------------------------------------------


def _delete(app: AppContext, realm: str, lineage_id: str, actor: str | None) -> None:
    """Delete a lineage whose deletion is due; audit it and tell plugins (``deleted``)."""
    newest = app.store.versions(realm, lineage_id)[-1]
    app.store.delete_lineage(realm, lineage_id)
    app.cache.invalidate_lineage(lineage_id)
    audit(app, realm, actor, "keys.delete", lineage_id)
    from qimem.events import KeyEvent  # imported when an event happens

    app.registry.notify_key_event(KeyEvent("deleted", realm, newest))


def _check_pending(
    app: AppContext,
    realm: str,
    lineage_id: str,
    policy: LineagePolicy,
    error: type[ConflictError] | type[DecryptionError] = ConflictError,
) -> None:
    if policy.deletion_date is None:
        return
    if policy.deletion_date <= datetime.now(UTC):
        try:
            _delete(app, realm, lineage_id, "qimem")
        except NotFoundError:
            pass
        raise NotFoundError(f"key {lineage_id} was deleted")
    raise error(
        f"key {lineage_id} is scheduled for deletion on {policy.deletion_date.isoformat()} "
        "and refuses every operation until the deletion is cancelled",
        code="key_pending_deletion",
    )


def check_rotation(app: AppContext, realm: str, lineage_id: str) -> None:
    """Refuse rotating a lineage that is scheduled for deletion (409)."""
    check_pending_rotation(app, realm, lineage_id, app.store.policy(realm, lineage_id))


def check_pending_rotation(
    app: AppContext, realm: str, lineage_id: str, policy: LineagePolicy
) -> None:
    """:func:`check_rotation` with the lineage's policy already read."""
    _check_pending(app, realm, lineage_id, policy)
