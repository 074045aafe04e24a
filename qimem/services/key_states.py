"""Version states: disable, enable and destroy one version of a key (docs/keys.md)."""

from __future__ import annotations

from qimem.app import AppContext
from qimem.errors import ConflictError
from qimem.keys import DEFAULT_REALM, KeyState, KeyVersion
from qimem.services.lifecycle_common import audit
from qimem.services.lifecycle_common import version_of as _version


def _set_state(
    app: AppContext,
    ref: str,
    version: int | None,
    state: KeyState,
    action: str,
    realm: str,
    actor: str | None,
) -> KeyVersion:
    target = _version(app, ref, version, realm)
    if state is KeyState.DESTROYED:
        policy = app.store.policy(realm, target.lineage_id)
        if policy.deletion_protection:
            raise ConflictError(
                f"key {target.lineage_id} has deletion protection; turn it off first",
                code="deletion_protected",
            )
    try:
        changed = app.store.set_state(realm, target.key_id, state)
    finally:
        app.cache.invalidate_lineage(target.lineage_id)
    audit(app, realm, actor, action, target.key_id, version=target.version)
    if changed.state is not target.state:
        kind = {"keys.disable": "disabled", "keys.enable": "enabled"}.get(action, "destroyed")
        from qimem.events import KeyEvent  # imported when an event happens

        app.registry.notify_key_event(KeyEvent(kind, realm, changed, previous=target))
    return changed


def disable_version(
    app: AppContext,
    ref: str,
    *,
    version: int | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> KeyVersion:
    """Disable one version: it refuses to decrypt until enabled again.

    :raises ConflictError: ``key_active`` for the active version (rotate first),
        ``key_destroyed`` for a destroyed one.
    """
    return _set_state(app, ref, version, KeyState.DISABLED, "keys.disable", realm, actor)


def enable_version(
    app: AppContext,
    ref: str,
    *,
    version: int | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> KeyVersion:
    """Enable a disabled version again (it becomes decrypt-only)."""
    target = _version(app, ref, version, realm)
    if target.state is KeyState.ACTIVE:
        return target
    return _set_state(app, target.key_id, None, KeyState.DECRYPT_ONLY, "keys.enable", realm, actor)


def destroy_version(
    app: AppContext,
    ref: str,
    *,
    version: int | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> KeyVersion:
    """Destroy one version: its material is overwritten and removed, for good.

    What it encrypted fails to decrypt with ``key_destroyed``.

    :raises ConflictError: ``deletion_protected``, ``key_active`` (rotate first).
    """
    return _set_state(app, ref, version, KeyState.DESTROYED, "keys.destroy", realm, actor)
