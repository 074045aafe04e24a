"""The root keyring (issue 18): ``qimem_root_keyring``, one row holding the store's root
keyring document (qimem.root.keyring) and a generation counter for compare-and-set.

A store that was never rotated and whose root is a file or environment key has no row: its
root version 1 is the root key itself, as before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_root_keyring",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("qimem_root_keyring")
