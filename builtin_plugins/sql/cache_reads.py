"""What the key cache reads on a miss, in one query each (a mixin of
:class:`~qimem.builtin_plugins.sql.store.SqlKeyStore`): a version, its lineage's policy and
its wrapped material together, where the KeyStore defaults make three or four reads. The
material is unwrapped only when the caller, its checks passed, asks for it."""

from __future__ import annotations

from functools import partial
from typing import Any

import sqlalchemy as sa

from qimem.builtin_plugins.sql.tables import (
    SELECT_STATES,
    lineages,
    to_policy,
    to_version,
    versions,
)
from qimem.errors import NotFoundError
from qimem.keys import KeyState, KeyVersion, LineagePolicy
from qimem.keystore import KeyStore, Unwrap
from qimem.sql import translate_errors


class SqlCacheReads(KeyStore):
    """``encryption_state`` and ``decryption_state`` of the SQL store (which provides the
    engine and the unwrapping)."""

    _reads: sa.Engine  # qimem.sql.read_engine(engine)

    def _newest_active(self, select: sa.Select[Any], *where: Any) -> Any:
        raise NotImplementedError  # SqlKeyStore._newest_active

    def _unwrap(self, realm: str, row: Any) -> bytearray:
        raise NotImplementedError  # SqlKeyStore._unwrap

    def encryption_state(
        self, realm: str, ref: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """One query: the newest active version of the lineage named ``ref``, with its
        lineage's policy and its wrapped material (unwrapped when the caller asks)."""
        row = self._newest_active(
            SELECT_STATES,
            lineages.c.realm == realm,
            sa.or_(lineages.c.name == ref, lineages.c.lineage_id == ref),
            versions.c.realm == realm,
        )
        if row is None:  # no such lineage, or nothing active: the parts say which
            return super().encryption_state(realm, ref)
        return to_version(row), to_policy(row), partial(self._unwrap, realm, row)

    def decryption_state(
        self, realm: str, key_id: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """One query: the version, its lineage's policy and (if it can decrypt at all:
        active or decrypt-only) its material's unwrapping."""
        query = SELECT_STATES.where(versions.c.key_id == key_id, versions.c.realm == realm)
        with translate_errors(), self._reads.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        version = to_version(row)
        decrypts = version.state in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)
        return version, to_policy(row), partial(self._unwrap, realm, row) if decrypts else None
