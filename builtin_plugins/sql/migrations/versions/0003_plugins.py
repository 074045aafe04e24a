"""Plugins: the registered plugin manifests (DESIGN.md §2, ``qimem plugins register``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_plugins",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),  # the validated manifest as JSON
        sa.Column("registered_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("qimem_plugins")
