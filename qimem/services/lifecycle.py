"""Key lifecycle: version policy, usage limits and auto-rotation, version states, deletion.

Everything here is one service function called by the CLI (``qimem keys policy|disable|
enable|destroy|schedule-deletion|cancel-deletion|purge``) and the HTTP API
(``/v1/security/keys/{key_id}/...``); docs/keys.md describes the behaviour.

**Usage counting.** Each version counts the messages it encrypted, durably. Counting every
message in the store would cost a write per encryption, so a process *reserves* blocks of
counts (``keys.usage_reserve_block``, default 64, doubling while a cache entry stays busy)
from the store before it uses them: the stored count is always at least the number of
messages really encrypted (a crash or an evicted cache entry only wastes the unused rest of
a block, never under-counts), and a reservation never passes the version's limit, so no
version ever encrypts more than ``usage_limit`` messages, across all processes and servers.
When a reservation finds the version at its limit, the version is rotated
(compare-and-swap: concurrent exhaustion in many servers yields one new version) and
encryption continues with the new one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qimem.app import AppContext
from qimem.config import MIN_DELETION_DAYS, LifecycleSettings, parse_keys, read_document
from qimem.errors import (
    ConflictError,
    DecryptionError,
    KeyNotActiveError,
    NotFoundError,
    ValidationError,
)
from qimem.keys import (
    DEFAULT_REALM,
    KeyState,
    KeyVersion,
    LineagePolicy,
)
from qimem.lazylog import get_logger
from qimem.services import usage_bound
from qimem.services.derived import MAX_CONTEXT, check_context, check_derived, derive_subkey
from qimem.services.key_states import destroy_version, disable_version, enable_version
from qimem.services.lifecycle_common import (
    _check_pending,
    _delete,
    audit,
    check_rotation,
    key_purpose,
)
from qimem.services.lifecycle_common import lineage_of as _lineage

log = get_logger(__name__)

__all__ = [  # parts live in their own modules (derived keys, message bounds, version
    # states, audit): re-exported here, the lifecycle API stays one module
    "MAX_CONTEXT",
    "MIN_DELETION_DAYS",
    "LifecycleSettings",
    "audit",
    "check_rotation",
    "check_context",
    "derive_subkey",
    "destroy_version",
    "disable_version",
    "enable_version",
    "message_bound",
]
message_bound = usage_bound.message_bound

_UNSET: Any = object()

#: AWS KMS's bounds on the deletion waiting period, in days.
MAX_DELETION_DAYS = 30
DEFAULT_DELETION_DAYS = 30
#: The largest block of usage counts one cache entry reserves at once.
MAX_RESERVE_BLOCK = 1 << 20
#: Nonces drawn from os.urandom per call (one getrandom for many messages).
NONCE_BATCH = 256


def load_settings(path: Path | None) -> LifecycleSettings:
    """The ``[keys]`` table of the config file at ``path`` (defaults when absent); the
    parser is :func:`qimem.config.parse_keys` (a broken file is reported by
    :func:`qimem.config.load_config`)."""
    return parse_keys(read_document(path, lenient=True), path)


def configure(app: AppContext, settings: LifecycleSettings) -> None:
    """Use ``settings`` for ``app`` instead of the config file's ``[keys]`` table."""
    app.configure_lifecycle(settings)


def settings(app: AppContext) -> LifecycleSettings:
    """The lifecycle settings of ``app`` (its parsed config's ``[keys]`` table)."""
    return app.lifecycle


# -- policy ------------------------------------------------------------------------------


def get_policy(app: AppContext, ref: str, *, realm: str = DEFAULT_REALM) -> LineagePolicy:
    """The lifecycle policy of the lineage ``ref`` names."""
    return app.store.policy(realm, _lineage(app, ref, realm))


#: Upper bounds: a usage limit JSON clients can hold exactly, an age of 100 years.
MAX_USAGE_LIMIT = 2**53 - 1
MAX_ROTATE_SECONDS = 100 * 365 * 86400


def _positive(
    value: Any, what: str, *, allow_none: bool = False, maximum: int = 2**31 - 1
) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ValidationError(f"{what} must be an integer from 1 to {maximum}")
    return value


def set_policy(
    app: AppContext,
    ref: str,
    *,
    min_decryption_version: int | None = None,
    min_encryption_version: int | None = None,
    usage_limit: int | None = _UNSET,
    auto_rotate_seconds: int | None = _UNSET,
    deletion_protection: bool | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> LineagePolicy:
    """Change a lineage's policy; arguments left out keep their value.

    ``usage_limit`` / ``auto_rotate_seconds`` of ``None`` clear them (deployment default /
    no age-based rotation). Both minimum versions must be between 1 and the active version
    (encryption always uses the active version, and it must stay decryptable).

    :raises ValidationError: a value out of range (``invalid_policy``).
    """
    lineage_id = _lineage(app, ref, realm)
    current = app.store.policy(realm, lineage_id)
    active = app.store.active_version(realm, lineage_id)
    changes: dict[str, Any] = {}
    for name, value in (
        ("min_decryption_version", min_decryption_version),
        ("min_encryption_version", min_encryption_version),
    ):
        if value is None:
            continue
        _positive(value, name)
        if value > active.version:
            raise ValidationError(
                f"{name} {value} is above the active version {active.version}; rotate first",
                code="invalid_policy",
            )
        changes[name] = value
    if usage_limit is not _UNSET and usage_limit is not None:
        purpose = key_purpose(app, active)
        if purpose in ("sign", "mac"):
            raise ValidationError(
                f"a usage limit bounds the messages an encryption key seals; {active.algorithm} "
                f"makes {purpose} keys, which have none (rotate them by age: auto_rotate_seconds)",
                code="invalid_policy",
            )
    if usage_limit is not _UNSET:
        if isinstance(usage_limit, int) and not isinstance(usage_limit, bool):
            usage_bound.check_message_bound(app, active, usage_limit)  # the reason, first
        changes["usage_limit"] = _positive(
            usage_limit, "usage_limit", allow_none=True, maximum=MAX_USAGE_LIMIT
        )
    if auto_rotate_seconds is not _UNSET:
        changes["auto_rotate_seconds"] = _positive(
            auto_rotate_seconds, "auto_rotate_seconds", allow_none=True, maximum=MAX_ROTATE_SECONDS
        )
    if deletion_protection is not None:
        if not isinstance(deletion_protection, bool):
            raise ValidationError("deletion_protection must be true or false")
        changes["deletion_protection"] = deletion_protection
    if deletion_protection and current.deletion_date is not None:
        raise ConflictError(
            "the key is scheduled for deletion; cancel the deletion first",
            code="key_pending_deletion",
        )
    policy = replace(current, **changes)
    if changes:
        app.store.set_policy(realm, lineage_id, policy)
        app.cache.invalidate_lineage(lineage_id)
    audit(app, realm, actor, "keys.policy", lineage_id, **_json_safe(changes))
    return policy


def effective_usage_limit(app: AppContext, version: KeyVersion, policy: LineagePolicy) -> int:
    """The usage limit that applies to ``version``: the lineage's, else the deployment
    default, and never above its algorithm's message bound."""
    limit = policy.usage_limit or settings(app).usage_limit
    return min(limit, usage_bound.message_bound(app, version))


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, int | bool | str) or v is None}


# -- deletion ----------------------------------------------------------------------------


def schedule_deletion(
    app: AppContext,
    ref: str,
    *,
    days: int = DEFAULT_DELETION_DAYS,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
    now: datetime | None = None,
) -> LineagePolicy:
    """Schedule a whole lineage for deletion in ``days`` days (AWS KMS style).

    Until then the key refuses every operation (``key_pending_deletion``) and the deletion
    can be cancelled; on that date it is deleted with all its versions (by the next
    :func:`purge_due_deletions`, or the next use of the key).

    :raises ConflictError: ``deletion_protected``, or already scheduled.
    """
    minimum = settings(app).min_deletion_days
    if not isinstance(days, int) or isinstance(days, bool) or not minimum <= days <= 3650:
        raise ValidationError(f"the deletion waiting period must be {minimum}..3650 days")
    lineage_id = _lineage(app, ref, realm)
    policy = app.store.policy(realm, lineage_id)
    if policy.deletion_protection:
        raise ConflictError(
            f"key {lineage_id} has deletion protection; turn it off first",
            code="deletion_protected",
        )
    if policy.deletion_date is not None:
        raise ConflictError(
            f"key {lineage_id} is already scheduled for deletion on "
            f"{policy.deletion_date.isoformat()}",
            code="key_pending_deletion",
        )
    when = (now or datetime.now(UTC)) + timedelta(days=days)
    policy = replace(policy, deletion_date=when)
    app.store.set_policy(realm, lineage_id, policy)
    app.cache.invalidate_lineage(lineage_id)
    audit(app, realm, actor, "keys.schedule_deletion", lineage_id, deletion_date=when.isoformat())
    return policy


def cancel_deletion(
    app: AppContext, ref: str, *, realm: str = DEFAULT_REALM, actor: str | None = None
) -> LineagePolicy:
    """Cancel a scheduled deletion; the key works again.

    :raises ConflictError: ``not_pending_deletion``.
    """
    lineage_id = _lineage(app, ref, realm)
    policy = app.store.policy(realm, lineage_id)
    if policy.deletion_date is None:
        raise ConflictError(
            f"key {lineage_id} is not scheduled for deletion", code="not_pending_deletion"
        )
    policy = replace(policy, deletion_date=None)
    app.store.set_policy(realm, lineage_id, policy)
    app.cache.invalidate_lineage(lineage_id)
    audit(app, realm, actor, "keys.cancel_deletion", lineage_id)
    return policy


def purge_due_deletions(
    app: AppContext, *, now: datetime | None = None, actor: str | None = "qimem"
) -> list[str]:
    """Delete every lineage whose deletion date has passed; return their lineage ids."""
    now = now or datetime.now(UTC)
    purged: list[str] = []
    for realm, lineage_id in app.store.lineages():
        try:
            policy = app.store.policy(realm, lineage_id)
            if policy.deletion_date is None or policy.deletion_date > now:
                continue
            _delete(app, realm, lineage_id, actor)
        except NotFoundError:
            continue  # another process purged it first
        purged.append(lineage_id)
    return purged


# -- checks on the encrypt and decrypt paths (cache misses only) -------------------------


def check_encryption(
    app: AppContext,
    version: KeyVersion,
    context: bytes | None = None,
    *,
    vault_layout: bool = False,
    policy: LineagePolicy | None = None,
) -> tuple[KeyVersion, int]:
    """Apply the lineage policy to the version about to encrypt: pending deletion, derived
    keys and their context, the minimum encryption version, age-based rotation. Returns
    the version to use (a new one after an automatic rotation) and its usage limit.

    ``vault_layout``: the caller seals Vault's raw layout (:mod:`qimem.services.vault_import`);
    otherwise a version restored from Vault is refused (see :func:`_refuse_vault_layout`).
    ``policy``: the lineage's, when the caller read it with the version (else read here)."""
    realm, lineage_id = version.realm, version.lineage_id
    if policy is None:
        policy = app.store.policy(realm, lineage_id)
    _check_pending(app, realm, lineage_id, policy)
    check_derived(version, policy, context)
    if version.version < policy.min_encryption_version:
        raise KeyNotActiveError(
            f"key {version.key_id} (version {version.version}) is below the lineage's "
            f"minimum encryption version {policy.min_encryption_version}"
        )
    period = policy.auto_rotate_seconds
    if period and datetime.now(UTC) - version.created_at >= timedelta(seconds=period):
        version = auto_rotate(app, version, "age")
    if not vault_layout:
        _refuse_vault_layout(version, policy)
    return version, effective_usage_limit(app, version, policy)


def _refuse_vault_layout(version: KeyVersion, policy: LineagePolicy) -> None:
    """A version restored from Vault keeps Vault's raw ciphertext layout: it never seals or
    opens a qimem envelope (one AES key in two formats, which the facade could not open).

    :raises ValidationError: ``vault_layout_key``.
    """
    if policy.vault_layout_versions >= version.version:
        raise ValidationError(
            f"key {version.key_id} (version {version.version}) was restored from Vault and "
            "keeps Vault's ciphertext layout: use it through the Transit facade, or rotate "
            "it in qimem first",
            code="vault_layout_key",
        )


def check_decryption(
    app: AppContext,
    version: KeyVersion,
    context: bytes | None = None,
    *,
    vault_layout: bool = False,
    policy: LineagePolicy | None = None,
) -> None:
    """Refuse a version the policy or its state keeps from decrypting, with a clear code
    (``vault_layout`` and ``policy`` as for :func:`check_encryption`).

    :raises DecryptionError: ``key_disabled``, ``key_destroyed``,
        ``below_min_decryption_version`` or ``key_pending_deletion`` (422).
    :raises NotFoundError: the lineage's deletion date has passed (it is deleted now).
    """
    label = f"key {version.key_id} (version {version.version})"
    if version.state is KeyState.DISABLED:
        raise DecryptionError(f"{label} is disabled", code="key_disabled")
    if version.state is KeyState.DESTROYED:
        raise DecryptionError(
            f"{label} was destroyed; what it encrypted can no longer be decrypted",
            code="key_destroyed",
        )
    if policy is None:
        policy = app.store.policy(version.realm, version.lineage_id)
    _check_pending(app, version.realm, version.lineage_id, policy, DecryptionError)
    check_derived(version, policy, context)
    if version.version < policy.min_decryption_version:
        raise DecryptionError(
            f"{label} is below the lineage's minimum decryption version "
            f"{policy.min_decryption_version}",
            code="below_min_decryption_version",
        )
    if not vault_layout:
        _refuse_vault_layout(version, policy)


def check_signing(app: AppContext, version: KeyVersion) -> KeyVersion:
    """Apply the lineage policy to the active version about to sign or compute a MAC:
    pending deletion, the minimum version (``min_encryption_version`` is the minimum
    version that signs), age-based rotation. Returns the version to use (a new one after
    an automatic rotation). Signing and MAC keys count no uses (no nonce bound)."""
    realm, lineage_id = version.realm, version.lineage_id
    policy = app.store.policy(realm, lineage_id)
    _check_pending(app, realm, lineage_id, policy)
    if version.version < policy.min_encryption_version:
        raise KeyNotActiveError(
            f"key {version.key_id} (version {version.version}) is below the lineage's "
            f"minimum version {policy.min_encryption_version}"
        )
    period = policy.auto_rotate_seconds
    if period and datetime.now(UTC) - version.created_at >= timedelta(seconds=period):
        version = auto_rotate(app, version, "age")
    return version


def check_verification(app: AppContext, version: KeyVersion) -> None:
    """Refuse a version its state or the policy keeps from verifying (signatures, tags) or
    giving its public key, as :func:`check_decryption` does for decryption.

    :raises ConflictError: ``key_disabled``, ``key_destroyed``,
        ``below_min_decryption_version`` (the lineage's minimum version that still
        decrypts or verifies) or ``key_pending_deletion``.
    :raises NotFoundError: the lineage's deletion date has passed (it is deleted now).
    """
    label = f"key {version.key_id} (version {version.version})"
    if version.state is KeyState.DISABLED:
        raise ConflictError(f"{label} is disabled", code="key_disabled")
    if version.state is KeyState.DESTROYED:
        raise ConflictError(
            f"{label} was destroyed; what it signed can no longer be verified with it",
            code="key_destroyed",
        )
    policy = app.store.policy(version.realm, version.lineage_id)
    _check_pending(app, version.realm, version.lineage_id, policy)
    if version.version < policy.min_decryption_version:
        raise ConflictError(
            f"{label} is below the lineage's minimum version {policy.min_decryption_version} "
            "(min_decryption_version)",
            code="below_min_decryption_version",
        )


#: Automatic rotations of one lineage in this process take turns (striped by lineage): the
#: callers racing a due rotation used to generate a key each and keep one (red team, issue
#: 16: six RSA-3072 keygens for one rotation; a burst of signs at the expiry multiplied
#: them). The next in line finds the version rotated away and uses the new one.
_ROTATION_LOCKS = tuple(threading.RLock() for _ in range(32))


def auto_rotate(app: AppContext, version: KeyVersion, reason: str) -> KeyVersion:
    """Rotate ``version`` away (usage limit or age); if another caller (or process) already
    did, the lineage's active version. Never loses decryptability: the old version stays
    decrypt-only."""
    lock = _ROTATION_LOCKS[hash(version.lineage_id) % len(_ROTATION_LOCKS)]
    with lock:
        active = app.store.active_version(version.realm, version.lineage_id)
        if active.key_id != version.key_id:  # rotated while this caller waited
            return active
        try:
            from qimem.services.keys import rotate_key  # imported when a rotation is due

            rotated = rotate_key(app, version.key_id, realm=version.realm)
        except KeyNotActiveError:
            return app.store.active_version(version.realm, version.lineage_id)
    audit(app, version.realm, "qimem", "keys.auto_rotate", rotated.key_id, reason=reason)
    return rotated


def reserve(app: AppContext, key: Any) -> bytes | None:
    """A nonce for one more encryption with the cache entry ``key``, with its usage count
    reserved in the store first (a block of counts at a time, nonces drawn from
    ``os.urandom`` 256 at a time).

    Returns None when the version is at its usage limit (after rotating it away): the
    caller then loads the lineage's new active version.
    """
    with key.lock:
        nonce: bytes | None = next(key.nonces, None)
        if nonce is not None:  # another thread refilled meanwhile
            return nonce
        if key.unissued == 0:
            # A one-shot process (the CLI) starts at one count: it reserves what it uses.
            one_shot = app.one_shot or app.cache.ttl <= 0
            block = 1 if one_shot else settings(app).usage_reserve_block
            # Doubling: a busy entry reserves rarely, and what an entry can waste (the
            # unused rest of its last block) stays below what it used, plus one block.
            block = max(block, min(key.reserved, MAX_RESERVE_BLOCK))
            granted = app.store.reserve_usage(key.realm, key.key_id, block, key.limit)
            if granted == 0:
                auto_rotate(app, key.meta, "usage_limit")
                return None
            key.reserved += granted
            key.unissued += granted
        count = min(key.unissued, NONCE_BATCH)
        size = key.nonce_size
        pool = os.urandom(size * count)
        nonces = [pool[i : i + size] for i in range(0, size * count, size)]
        key.unissued -= count
        key.nonces = iter(nonces[1:])
        return nonces[0]


def key_usage(app: AppContext, ref: str, *, realm: str = DEFAULT_REALM) -> dict[str, int]:
    """``{key_id: encryptions counted}`` (reserved counts: an upper bound) per version."""
    return app.store.usage(realm, _lineage(app, ref, realm))
