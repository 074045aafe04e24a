"""Key lineages, key versions and store metadata.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_table(
        "qimem_lineages",
        sa.Column("lineage_id", sa.String(36), primary_key=True),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("realm", "name", name="uq_lineage_realm_name"),
    )
    op.create_index("ix_lineages_realm", "qimem_lineages", ["realm"])
    op.create_table(
        "qimem_key_versions",
        sa.Column("key_id", sa.String(36), primary_key=True),
        sa.Column(
            "lineage_id",
            sa.String(36),
            sa.ForeignKey("qimem_lineages.lineage_id"),
            nullable=False,
        ),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("material", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("lineage_id", "version", name="uq_version_lineage_version"),
    )
    op.create_index("ix_versions_lineage_state", "qimem_key_versions", ["lineage_id", "state"])


def downgrade() -> None:
    op.drop_table("qimem_key_versions")
    op.drop_table("qimem_lineages")
    op.drop_table("qimem_meta")
