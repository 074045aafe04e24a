"""Events passed to ``qimem_key_event`` hook implementations."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from qimem.keys import KeyVersion


@dataclass(frozen=True)
class KeyEvent:
    """A committed change to a key: ``kind`` is ``created``, ``rotated``, ``disabled``,
    ``enabled``, ``destroyed`` (one version) or ``deleted`` (the whole lineage; ``key`` is
    its newest version).

    ``key`` is the version the event is about (for ``rotated``, the new version) and
    ``previous`` the version it replaced. Metadata only: no key material.
    """

    kind: str
    realm: str
    key: KeyVersion
    previous: KeyVersion | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
