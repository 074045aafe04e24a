"""Identity: realms, users and service accounts, roles, grants, signing keys, refresh
tokens, revoked access tokens and the audit log (DESIGN.md §7).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_realms",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "qimem_users",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("realm", sa.String(64), sa.ForeignKey("qimem_realms.name"), nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # "user" | "client"
        sa.Column("secret_hash", sa.String(512), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", sa.Float, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("realm", "username", name="uq_users_realm_username"),
    )
    op.create_table(
        "qimem_roles",
        sa.Column("realm", sa.String(64), sa.ForeignKey("qimem_realms.name"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("permissions", sa.String(1024), nullable=False),
        sa.Column("builtin", sa.Boolean, nullable=False),
        sa.Column("description", sa.String(256), nullable=False, server_default=""),
    )
    op.create_table(
        "qimem_grants",
        sa.Column("realm", sa.String(64), sa.ForeignKey("qimem_realms.name"), primary_key=True),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("qimem_users.user_id"), primary_key=True),
        sa.Column("role", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(128), primary_key=True),  # "" = every key
    )
    op.create_table(
        "qimem_signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("realm", sa.String(64), sa.ForeignKey("qimem_realms.name"), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),  # base64url raw Ed25519
        sa.Column("private_wrapped", sa.LargeBinary, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("retire_at", sa.Float, nullable=True),  # dropped from JWKS after this
    )
    op.create_index("ix_signing_keys_realm", "qimem_signing_keys", ["realm"])
    op.create_table(
        "qimem_refresh_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("family_id", sa.String(36), nullable=False),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("family_expires_at", sa.Float, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_index("ix_refresh_family", "qimem_refresh_tokens", ["family_id"])
    op.create_table(
        "qimem_revoked_tokens",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=False),
    )
    op.create_table(
        "qimem_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(1024), nullable=False),
    )
    op.create_index("ix_audit_realm_at", "qimem_audit", ["realm", "at"])


def downgrade() -> None:
    for table in (
        "qimem_audit",
        "qimem_revoked_tokens",
        "qimem_refresh_tokens",
        "qimem_signing_keys",
        "qimem_grants",
        "qimem_roles",
        "qimem_users",
        "qimem_realms",
    ):
        op.drop_table(table)
