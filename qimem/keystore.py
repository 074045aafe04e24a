"""The key store interface every backend implements (DESIGN.md §3, §8).

All operations are realm-scoped: a key of another realm is "not found". Stores hold key
material (persistent stores wrapped under the root key) and hand it out only through
:meth:`KeyStore.material`, as a ``bytearray`` the caller zeroes when done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from qimem.keys import KeyVersion


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

    def rotation_marker(self) -> object:
        """A value that changes whenever any key version changes state (rotation ...).

        Caches compare it to notice rotations made by other processes. Must be cheap (it is
        called a few times a second per process). ``None`` means the store cannot tell; the
        cache then relies on its TTL alone.
        """
        return None

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
