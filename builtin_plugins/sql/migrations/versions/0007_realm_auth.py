"""Realm login configuration: the provider chain (password, LDAP ...), the providers'
options and how external identities map to users and roles, one row per realm, sealed under
the root key by the identity layer (qimem.identity.providers; docs/identity.md, "Login
providers").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_realm_auth",
        sa.Column("realm", sa.String(64), primary_key=True),
        sa.Column("config", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("qimem_realm_auth")
