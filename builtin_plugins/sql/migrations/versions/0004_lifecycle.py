"""Key lifecycle: per-lineage policy, deletion schedule and derived flag; per-version usage
counters.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qimem_lineages") as batch:
        batch.add_column(
            sa.Column("min_decryption_version", sa.Integer, nullable=False, server_default="1")
        )
        batch.add_column(
            sa.Column("min_encryption_version", sa.Integer, nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("usage_limit", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("auto_rotate_seconds", sa.BigInteger, nullable=True))
        batch.add_column(
            sa.Column("deletion_protection", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("deletion_date", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("derived", sa.Boolean, nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("qimem_key_versions") as batch:
        batch.add_column(
            sa.Column("encryptions", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("qimem_key_versions") as batch:
        batch.drop_column("encryptions")
    with op.batch_alter_table("qimem_lineages") as batch:
        for column in (
            "derived",
            "deletion_date",
            "deletion_protection",
            "auto_rotate_seconds",
            "usage_limit",
            "min_encryption_version",
            "min_decryption_version",
        ):
            batch.drop_column(column)
