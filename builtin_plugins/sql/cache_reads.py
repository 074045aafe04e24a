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

# Built once (a statement costs as much to build as to run on this stack): the newest
# active version of the lineage a name or lineage id names, and one version by key_id.
_ENCRYPTION_STATE = (
    SELECT_STATES.where(
        lineages.c.realm == sa.bindparam("es_realm"),
        sa.or_(
            lineages.c.name == sa.bindparam("es_ref"),
            lineages.c.lineage_id == sa.bindparam("es_ref"),
        ),
        versions.c.realm == sa.bindparam("es_realm"),
        versions.c.state == KeyState.ACTIVE.value,
    )
    .order_by(versions.c.version.desc())
    .limit(1)
)
_DECRYPTION_STATE = SELECT_STATES.where(
    versions.c.key_id == sa.bindparam("ds_key"), versions.c.realm == sa.bindparam("ds_realm")
)


class SqlCacheReads(KeyStore):
    """``encryption_state`` and ``decryption_state`` of the SQL store (which provides the
    engine and the unwrapping)."""

    _reads: sa.Engine  # qimem.sql.read_engine(engine)

    def _unwrap(self, realm: str, row: Any) -> bytearray:
        raise NotImplementedError  # SqlKeyStore._unwrap

    def encryption_state(
        self, realm: str, ref: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """One query: the newest active version of the lineage named ``ref``, with its
        lineage's policy and its wrapped material (unwrapped when the caller asks)."""
        with translate_errors(), self._reads.connect() as conn:
            row = conn.execute(_ENCRYPTION_STATE, {"es_realm": realm, "es_ref": ref}).first()
        if row is None:  # no such lineage, or nothing active: the parts say which
            return super().encryption_state(realm, ref)
        return to_version(row), to_policy(row), partial(self._unwrap, realm, row)

    def decryption_state(
        self, realm: str, key_id: str
    ) -> tuple[KeyVersion, LineagePolicy, Unwrap | None]:
        """One query: the version, its lineage's policy and (if it can decrypt at all:
        active or decrypt-only) its material's unwrapping."""
        with translate_errors(), self._reads.connect() as conn:
            row = conn.execute(_DECRYPTION_STATE, {"ds_key": key_id, "ds_realm": realm}).first()
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        version = to_version(row)
        decrypts = version.state in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)
        return version, to_policy(row), partial(self._unwrap, realm, row) if decrypts else None
