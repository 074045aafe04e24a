"""Whole lineages with their material, as backups hold them (re-exported by
:mod:`qimem.keys`, which imports this module only when one of them is used)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from qimem.keys import KeyState, KeyVersion, LineagePolicy


@dataclass(frozen=True)
class VersionRecord:
    """One version with its material, as a backup holds it (``material`` None: destroyed)."""

    key_id: str
    version: int
    state: KeyState
    created_at: datetime
    encryptions: int
    material: bytearray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LineageRecord:
    """A whole lineage with material, for :meth:`qimem.keystore.KeyStore.restore_lineage`."""

    lineage_id: str
    realm: str
    name: str | None
    algorithm: str
    created_at: datetime
    policy: LineagePolicy
    versions: list[VersionRecord]

    def key_version(self, item: VersionRecord) -> KeyVersion:
        """The metadata of one of this lineage's versions, as a store returns it."""
        return KeyVersion(
            key_id=item.key_id,
            lineage_id=self.lineage_id,
            name=self.name,
            realm=self.realm,
            version=item.version,
            algorithm=self.algorithm,
            state=item.state,
            created_at=item.created_at,
        )
