"""The SQL key store's tables and row helpers (SQLAlchemy Core), shared by
:mod:`qimem.builtin_plugins.sql.store` and its usage accounting
(:mod:`qimem.builtin_plugins.sql.usage`). The SQLite hot path
(:mod:`qimem.builtin_plugins.sql.sqlite`) spells the same tables in plain SQL and does
not import this module (no SQLAlchemy on the CLI's path)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from qimem.keys import KeyState, KeyVersion, LineagePolicy

metadata = sa.MetaData()
meta_table = sa.Table(
    "qimem_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
lineages = sa.Table(
    "qimem_lineages",
    metadata,
    sa.Column("lineage_id", sa.String(36), primary_key=True),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("name", sa.String(128)),
    sa.Column("algorithm", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("min_decryption_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("min_encryption_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("usage_limit", sa.BigInteger),
    sa.Column("auto_rotate_seconds", sa.BigInteger),
    sa.Column("deletion_protection", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("deletion_date", sa.DateTime(timezone=True)),
    sa.Column("derived", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("vault_layout_versions", sa.Integer, nullable=False, server_default="0"),
)
versions = sa.Table(
    "qimem_key_versions",
    metadata,
    sa.Column("key_id", sa.String(36), primary_key=True),
    sa.Column("lineage_id", sa.String(36), nullable=False),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("algorithm", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("material", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("encryptions", sa.BigInteger, nullable=False, server_default="0"),
)

METADATA_COLUMNS = (
    versions.c.key_id,
    versions.c.lineage_id,
    lineages.c.name,
    versions.c.realm,
    versions.c.version,
    versions.c.algorithm,
    versions.c.state,
    versions.c.created_at,
)
SELECT_VERSIONS = sa.select(*METADATA_COLUMNS).join_from(
    versions, lineages, versions.c.lineage_id == lineages.c.lineage_id
)


STATE_MARKER = "key_state_marker"  # changes in every transaction that changes a version's state
#: The rotation marker, as plain SQL (the PostgreSQL change feed reads it on connecting).
MARKER_SQL = "SELECT value FROM qimem_meta WHERE name = 'key_state_marker'"


def wrap_context(realm: str, lineage_id: str, key_id: str, version: int, algorithm: str) -> bytes:
    return f"qimem-key-v1|{realm}|{lineage_id}|{key_id}|{version}|{algorithm}".encode()


def utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite drops the offset; all is UTC
        return value.replace(tzinfo=UTC)
    return value


POLICY_COLUMNS = (
    "min_decryption_version",
    "min_encryption_version",
    "usage_limit",
    "auto_rotate_seconds",
    "deletion_protection",
    "deletion_date",
    "derived",
    "vault_layout_versions",
)


def policy_values(policy: LineagePolicy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in POLICY_COLUMNS}


def to_version(row: Any) -> KeyVersion:
    created = utc(row.created_at)
    assert created is not None
    return KeyVersion(
        key_id=row.key_id,
        lineage_id=row.lineage_id,
        name=row.name,
        realm=row.realm,
        version=row.version,
        algorithm=row.algorithm,
        state=KeyState(row.state),
        created_at=created,
    )


def to_policy(row: Any) -> LineagePolicy:
    """A lineage row's (or a row holding its policy columns') :class:`LineagePolicy`."""
    return LineagePolicy(
        min_decryption_version=row.min_decryption_version,
        min_encryption_version=row.min_encryption_version,
        usage_limit=row.usage_limit,
        auto_rotate_seconds=row.auto_rotate_seconds,
        deletion_protection=bool(row.deletion_protection),
        deletion_date=utc(row.deletion_date),
        derived=bool(row.derived),
        vault_layout_versions=row.vault_layout_versions,
    )


#: A version's metadata, its wrapped material and its lineage's policy: one row says all a
#: cache miss needs (SqlKeyStore.encryption_state / decryption_state).
SELECT_STATES = sa.select(
    *METADATA_COLUMNS, versions.c.material, *(lineages.c[name] for name in POLICY_COLUMNS)
).join_from(versions, lineages, versions.c.lineage_id == lineages.c.lineage_id)
