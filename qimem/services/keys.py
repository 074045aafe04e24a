"""Key operations: create, list, show, rotate.

Below :mod:`qimem.services.lifecycle` (which rotates through :func:`rotate_key`): what both
need (finding a key, auditing, the pending-deletion check) is in
:mod:`qimem.services.key_refs` and :mod:`qimem.services.lifecycle_common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qimem.app import AppContext
from qimem.crypto import DEFAULT_PURPOSE, PURPOSES, zero
from qimem.errors import KeyNotActiveError, ValidationError
from qimem.keys import DEFAULT_REALM, KeyVersion, validate_name, validate_realm
from qimem.services.key_refs import resolve, resolve_with_policy
from qimem.services.lifecycle_common import (
    audit,
    check_pending_rotation,
    check_rotation,
    purpose_of_algorithm,
)

DEFAULT_ALGORITHM = "aes-256-gcm"


def key_dict(app: AppContext, key: KeyVersion) -> dict[str, Any]:
    """``key.to_dict()`` with the lineage's ``purpose`` (what ``keys create|list|rotate``
    print with ``--json``)."""
    return {**key.to_dict(), "purpose": purpose_of_algorithm(app, key.algorithm)}


def generate_material(algorithm: Any, purpose: str) -> bytearray:
    """Fresh key material for a new version: a signing algorithm's private key (PKCS#8
    DER), every other purpose's secret key. The caller zeroes it."""
    if purpose == "sign":
        return bytearray(algorithm.generate_private_key())
    return bytearray(algorithm.generate_key())


def _purpose(app: AppContext, algorithm: str, purpose: str | None) -> str:
    """The purpose of ``algorithm``, which must agree with ``purpose`` if one is given."""
    if purpose is not None and purpose not in PURPOSES:
        raise ValidationError(f"purpose must be one of {', '.join(PURPOSES)}")
    purposes = app.registry.algorithm_purposes
    if algorithm not in purposes:  # the registry's message names the algorithms there are
        app.registry.algorithm(algorithm, purpose or DEFAULT_PURPOSE)
    actual = purposes[algorithm]
    if purpose is not None and purpose != actual:
        raise ValidationError(
            f"algorithm {algorithm!r} makes {actual} keys, not {purpose} keys",
            code="wrong_purpose",
        )
    return actual


@dataclass(frozen=True)
class KeyDetails:
    """A lineage with all its versions, as ``keys show`` prints it."""

    lineage_id: str
    name: str | None
    realm: str
    algorithm: str
    versions: list[KeyVersion]
    purpose: str = DEFAULT_PURPOSE

    @property
    def active(self) -> KeyVersion | None:
        return next((v for v in reversed(self.versions) if v.active), None)

    def to_dict(self) -> dict[str, Any]:
        active = self.active
        return {
            "lineage_id": self.lineage_id,
            "name": self.name,
            "realm": self.realm,
            "algorithm": self.algorithm,
            "purpose": self.purpose,
            "active_key_id": active.key_id if active else None,
            "active_version": active.version if active else None,
            "versions": [v.to_dict() for v in self.versions],
        }


def create_key(
    app: AppContext,
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    name: str | None = None,
    realm: str = DEFAULT_REALM,
    derived: bool = False,
    purpose: str | None = None,
    actor: str | None = None,
) -> KeyVersion:
    """Create a key lineage with one active version of ``algorithm``.

    The lineage's purpose is its algorithm's (``encrypt`` for the AEADs, ``sign``,
    ``mac`` or ``deterministic``); ``purpose``, if given, must agree (``wrong_purpose``).
    A signing key's material is its private key; like every key's, it is wrapped under the
    root key.

    ``actor``: who asked, for the audit log (the CLI names the OS user; the HTTP server
    audits in its middleware and passes none).

    ``derived``: every encryption and decryption with this key needs a ``context`` and uses
    a per-context subkey (HKDF-SHA256 of the version's key and the context), so one key
    serves many tenants without them sharing a data key (docs/keys.md).

    :raises UnsupportedAlgorithmError: no plugin provides ``algorithm``.
    :raises ValidationError: ``wrong_purpose``; ``derived_not_supported`` (derived keys
        are encryption keys).
    :raises ConflictError: ``name`` is taken in ``realm``.
    :raises NotFoundError: ``realm_not_found``: the store has an identity layer (see
        :func:`has_identity`) and ``realm`` is not one of its realms.
    """
    if not isinstance(derived, bool):
        raise ValidationError("derived must be true or false")
    validate_realm(realm)
    _require_realm(app, realm)
    if name is not None:
        validate_name(name)
    actual = _purpose(app, algorithm, purpose)
    if derived and actual != DEFAULT_PURPOSE:
        raise ValidationError(
            f"derived keys are encryption keys; {algorithm} makes {actual} keys",
            code="derived_not_supported",
        )
    algo = app.registry.algorithm(algorithm, actual)
    material = generate_material(algo, actual)
    try:
        key = app.store.create(realm, algo.name, material, name=name)
    finally:
        zero(material)
    if derived:  # before the key_id is handed out: nobody can use it underived
        from qimem.keys import LineagePolicy

        app.store.set_policy(realm, key.lineage_id, LineagePolicy(derived=True))
    from qimem.events import KeyEvent  # imported when an event happens

    app.registry.notify_key_event(KeyEvent("created", realm, key))
    audit(app, realm, actor, "keys.create", key.key_id, algorithm=key.algorithm, purpose=actual)
    return key


def has_identity(app: AppContext) -> bool:
    """Whether ``app`` keeps realms: its identity layer is open, or its store holds the
    identity tables (the SQL store). A memory store nobody opened identity on has none."""
    return app.has_identity


def _require_realm(app: AppContext, realm: str) -> None:
    """A typo in a realm must not start a new tenant: with an identity layer, only its
    realms take keys (``master`` always exists)."""
    if realm != DEFAULT_REALM and has_identity(app):
        from qimem.services.identity import require_realm

        require_realm(app, realm)


def list_keys(app: AppContext, *, realm: str = DEFAULT_REALM) -> list[KeyVersion]:
    """The newest version of every key lineage in ``realm``."""
    validate_realm(realm)
    return app.store.list(realm)


def show_key(app: AppContext, ref: str, *, realm: str = DEFAULT_REALM) -> KeyDetails:
    """A lineage and all its versions, found by key_id, lineage_id or name."""
    validate_realm(realm)
    lineage_id, _ = resolve(app, ref, realm)
    versions = app.store.versions(realm, lineage_id)
    first = versions[0]
    purpose = purpose_of_algorithm(app, first.algorithm)
    return KeyDetails(lineage_id, first.name, realm, first.algorithm, versions, purpose)


def rotate_key(
    app: AppContext, ref: str, *, realm: str = DEFAULT_REALM, actor: str | None = None
) -> KeyVersion:
    """Rotate: the given key_id (or the active version of a name/lineage) becomes
    decrypt-only and a new active version is created, atomically.

    ``actor``: who asked, for the audit log (as for :func:`create_key`).

    :raises KeyNotActiveError: ``ref`` is a key_id that is no longer active; or ``ref`` is a
        name or lineage_id and another rotation of the same key committed between reading
        its active version and rotating it (the error names that version: concurrent
        rotations yield one new version, and the others learn that it happened).
    :raises ConflictError: ``key_pending_deletion``.
    """
    validate_realm(realm)
    try:
        current, policy, _ = resolve_with_policy(app, ref, realm)
    except KeyNotActiveError:
        check_rotation(app, realm, app.store.find_lineage(realm, ref))  # pending: 409 first
        raise
    lineage_id = current.lineage_id
    check_pending_rotation(app, realm, lineage_id, policy)
    purpose = purpose_of_algorithm(app, current.algorithm)
    algo = app.registry.algorithm(current.algorithm, purpose)
    material = generate_material(algo, purpose)
    try:
        rotated = app.store.rotate(realm, current.key_id, material)
    finally:
        zero(material)
        app.cache.invalidate_lineage(lineage_id, rotation=True)
    from qimem.events import KeyEvent  # imported when an event happens

    app.registry.notify_key_event(KeyEvent("rotated", realm, rotated, previous=current))
    audit(
        app,
        realm,
        actor,
        "keys.rotate",
        rotated.key_id,
        previous=current.key_id,
        version=rotated.version,
    )
    return rotated
