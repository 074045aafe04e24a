"""Authorization integrity: a per-user token-validity stamp, and a MAC column on the rows
that say who may do what (users, roles, grants).

``qimem_users.tokens_valid_after`` (epoch seconds): access tokens of the user issued at or
before it are refused (set when the user is disabled, changes password or loses a role).
``mac`` (HMAC-SHA-256, hex) authenticates a row under a key derived from the root key. The
migration cannot compute MACs (migrations run without the root key), so existing rows are
left NULL here and sealed in the same transaction by the hook of the process running the
upgrade, which holds the root key (qimem.identity.authz_mac.sealing_after_upgrade; see
docs/identity.md, "Integrity").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qimem_users") as batch:
        batch.add_column(
            sa.Column("tokens_valid_after", sa.Float, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))
    with op.batch_alter_table("qimem_roles") as batch:
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))
    with op.batch_alter_table("qimem_grants") as batch:
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("qimem_grants") as batch:
        batch.drop_column("mac")
    with op.batch_alter_table("qimem_roles") as batch:
        batch.drop_column("mac")
    with op.batch_alter_table("qimem_users") as batch:
        batch.drop_column("mac")
        batch.drop_column("tokens_valid_after")
