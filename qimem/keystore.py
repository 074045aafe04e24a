"""The key store interface every backend implements (DESIGN.md §3, §8).

All operations are realm-scoped: a key of another realm is "not found". Stores hold key
material (persistent stores wrapped under the root key) and hand it out only through
:meth:`KeyStore.material`, as a ``bytearray`` the caller zeroes when done.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable

from qimem.errors import ConflictError, DecryptionError, ValidationError
from qimem.keys import KeyState, KeyVersion, LineagePolicy, LineageRecord

#: Unwraps a version's material read with it (:meth:`KeyStore.encryption_state`): called at
#: most once, after the caller's checks; the caller zeroes the ``bytearray``.
Unwrap = Callable[[], bytearray]


def _unsupported(store: KeyStore, what: str) -> ValidationError:
    return ValidationError(
        f"the {type(store).__name__} key store does not support {what}", code="unsupported"
    )


def _label(version: KeyVersion) -> str:
    return f"key {version.key_id} (version {version.version})"


def check_transition(current: KeyVersion, target: KeyState) -> None:
    """Refuse a state change :meth:`KeyStore.set_state` does not allow (shared by stores).

    :raises ConflictError: ``key_active``, ``key_destroyed`` or ``invalid_state``.
    """
    if target is KeyState.ACTIVE:
        raise ConflictError(
            "a version becomes active only by rotation; enable makes it decrypt-only",
            code="invalid_state",
        )
    if current.state is target:
        return
    if current.state is KeyState.ACTIVE:
        raise ConflictError(
            f"{_label(current)} is the active version; rotate the key first, then "
            f"{'destroy' if target is KeyState.DESTROYED else 'disable'} the old version",
            code="key_active",
        )
    if current.state is KeyState.DESTROYED:
        raise ConflictError(f"{_label(current)} is destroyed", code="key_destroyed")


def destroyed_error(version: KeyVersion) -> DecryptionError:
    """The error for using a destroyed version's material."""
    return DecryptionError(
        f"{_label(version)} was destroyed; what it encrypted can no longer be decrypted",
        code="key_destroyed",
    )


class KeyStore(ABC):
    """A realm-scoped store of key lineages and versions.

    Implementations must make :meth:`rotate` a compare-and-swap: of N concurrent rotations of
    the same active ``key_id`` exactly one succeeds and the others raise
    :class:`qimem.errors.KeyNotActiveError`, across threads, processes and hosts sharing the
    store. Errors are qimem's own (:class:`~qimem.errors.NotFoundError`,
    :class:`~qimem.errors.ConflictError`, :class:`~qimem.errors.StoreUnavailableError`);
    backend exceptions do not leak out.
    """

    @abstractmethod
    def create(
        self, realm: str, algorithm: str, material: bytes | bytearray, *, name: str | None = None
    ) -> KeyVersion:
        """Create a new lineage with version 1 (active) holding ``material``.

        :raises ConflictError: ``name`` is already used in ``realm``.
        """

    @abstractmethod
    def get(self, realm: str, key_id: str) -> KeyVersion:
        """The version with ``key_id``.

        :raises NotFoundError: no such version in ``realm``.
        """

    @abstractmethod
    def find_lineage(self, realm: str, ref: str) -> str:
        """The lineage id for ``ref``, which is a lineage id or a name.

        :raises NotFoundError: no lineage in ``realm`` has that id or name.
        """

    @abstractmethod
    def versions(self, realm: str, lineage_id: str) -> list[KeyVersion]:
        """Every version of a lineage, oldest first.

        :raises NotFoundError: no such lineage in ``realm``.
        """

    @abstractmethod
    def list(self, realm: str) -> list[KeyVersion]:
        """The newest version of every lineage in ``realm``, oldest lineage first."""

    @abstractmethod
    def rotate(self, realm: str, key_id: str, material: bytes | bytearray) -> KeyVersion:
        """Atomically make ``key_id`` decrypt-only and add the next version, active.

        :raises NotFoundError: no such version in ``realm``.
        :raises KeyNotActiveError: ``key_id`` is not the active version (someone rotated it).
        """

    @abstractmethod
    def material(self, realm: str, key_id: str) -> bytearray:
        """The unwrapped key material of ``key_id``; the caller zeroes it when done.

        :raises NotFoundError: no such version in ``realm``.
        """

    # -- lifecycle (issue 7). Optional for third-party stores: the defaults refuse. -------

    def policy(self, realm: str, lineage_id: str) -> LineagePolicy:
        """The lifecycle policy of a lineage (defaults when never set).

        :raises NotFoundError: no such lineage in ``realm``.
        """
        self.versions(realm, lineage_id)
        return LineagePolicy()

    def set_policy(self, realm: str, lineage_id: str, policy: LineagePolicy) -> LineagePolicy:
        """Replace a lineage's policy and change :meth:`rotation_marker` in the same
        transaction. The caller validated ``policy``.

        :raises NotFoundError: no such lineage in ``realm``.
        """
        raise _unsupported(self, "lineage policies")

    def set_state(self, realm: str, key_id: str, state: KeyState) -> KeyVersion:
        """Move a non-active version between ``decrypt-only`` and ``disabled``, or to
        ``destroyed`` (its material is overwritten and removed; irreversible). Changes
        :meth:`rotation_marker`. Setting the state a version already has is a no-op.

        :raises NotFoundError: no such version in ``realm``.
        :raises ConflictError: ``key_active`` (the active version: rotate first),
            ``key_destroyed`` (a destroyed version cannot come back), or an ``active``
            target state.
        """
        raise _unsupported(self, "version states")

    def reserve_usage(self, realm: str, key_id: str, count: int, limit: int) -> int:
        """Atomically add up to ``count`` to the version's encryption counter without
        passing ``limit``; return how many were granted (0 when the counter is at the
        limit). Callers reserve before they encrypt, so a crash never under-counts.

        :raises NotFoundError: no such version in ``realm``.
        """
        raise _unsupported(self, "usage counters")

    def release_usage(self, realm: str, key_id: str, count: int) -> None:  # noqa: B027
        """Give back ``count`` counts reserved with :meth:`reserve_usage` and never used
        (a process returns the unused rest of its reservations when it closes), so the
        counter shows what was really encrypted. Never below zero; a version that no longer
        exists is ignored. The default keeps them counted (an over-count, never an
        under-count)."""

    def usage(self, realm: str, lineage_id: str) -> dict[str, int]:
        """``{key_id: encryptions counted}`` for every version of a lineage."""
        return {v.key_id: 0 for v in self.versions(realm, lineage_id)}

    def delete_lineage(self, realm: str, lineage_id: str) -> None:
        """Remove a lineage and all its versions (material overwritten first). Changes
        :meth:`rotation_marker`.

        :raises NotFoundError: no such lineage in ``realm``.
        """
        raise _unsupported(self, "deleting keys")

    def restore_lineage(self, record: LineageRecord) -> None:
        """Insert a whole lineage from a backup, with its ids, states, policy and counters.

        :raises ConflictError: ``key_exists`` (a lineage or key_id is already present) or
            ``name_taken``.
        """
        raise _unsupported(self, "restoring keys")

    def lineages(self) -> builtins.list[tuple[str, str]]:
        """``(realm, lineage_id)`` of every lineage in every realm (whole-store backup)."""
        raise _unsupported(self, "listing all realms")

    def rotation_marker(self) -> object:
        """A value that changes whenever any key version changes state (rotation, disable,
        enable, destroy, policy change, deletion).

        Caches compare it to notice rotations made by other processes. Must be cheap (it is
        called a few times a second per process). ``None`` means the store cannot tell; the
        cache then relies on its TTL alone.
        """
        return None

    def encryption_state(
        self, realm: str, ref: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """What an encryption needs on a cache miss: the active version of the lineage
        ``ref`` names (a name or lineage id), the lineage's policy and, where the store
        reads the wrapped material in the same step, a callable that unwraps it (None: the
        caller reads :meth:`material`). The caller checks the version first and calls it
        only if it will use the key (a refused request costs no root-key call), and zeroes
        what it returns. The PostgreSQL store answers in one query; this default composes
        :meth:`find_lineage`, :meth:`active_version` and :meth:`policy`.

        :raises NotFoundError: no lineage in ``realm`` has that id or name.
        :raises KeyNotActiveError: none of its versions is active.
        """
        lineage_id = self.find_lineage(realm, ref)
        return self.active_version(realm, lineage_id), self.policy(realm, lineage_id), None

    def decryption_state(
        self, realm: str, key_id: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """What a decryption needs on a cache miss: the version ``key_id``, its lineage's
        policy and, where the store reads the wrapped material in the same step, a callable
        that unwraps it, as :meth:`encryption_state` (None: the caller reads
        :meth:`material`, which also refuses a destroyed version).
        Default: :meth:`get` and :meth:`policy`.

        :raises NotFoundError: no such version in ``realm``.
        """
        version = self.get(realm, key_id)
        return version, self.policy(realm, version.lineage_id), None

    def ping(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Check the store is reachable; raise StoreUnavailableError if not."""

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release connections and zero any key material held in memory."""

    def active_version(self, realm: str, lineage_id: str) -> KeyVersion:
        """The active version of a lineage.

        :raises NotFoundError: the lineage does not exist.
        :raises KeyNotActiveError: no version of it is active.
        """
        from qimem.errors import KeyNotActiveError
        from qimem.keys import KeyState

        versions = self.versions(realm, lineage_id)
        for version in reversed(versions):
            if version.state is KeyState.ACTIVE:
                return version
        raise KeyNotActiveError(f"key lineage {lineage_id} has no active version")
