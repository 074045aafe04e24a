"""Imported Vault Transit keys (issue 17): ``qimem_lineages.vault_layout_versions``, the
number of versions (1..n) whose ``vault:vN:`` ciphertexts use Vault's raw layout (0: none).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qimem_lineages") as batch:
        batch.add_column(
            sa.Column("vault_layout_versions", sa.Integer, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("qimem_lineages") as batch:
        batch.drop_column("vault_layout_versions")
