"""Service-account secret rotation and the second factor (issue 15, items 5 and 6).

* ``qimem_client_secrets``: a service account's previous secrets during a rotation's
  overlap (SHA-256 of the 256-bit secret, its expiry, and a MAC under a root-derived key
  binding it to the account and its current secret: qimem.identity.clients);
* ``qimem_otp``: a password user's TOTP secret, wrapped under the root key (bound to the
  realm and user id), whether it is confirmed, and the last time step used (replay);
* ``qimem_otp_recovery``: single-use recovery codes, stored as HMACs under a root-derived key;
* ``qimem_realm_policy``: per-realm policy (``otp_required``), MAC'd (qimem.identity.otp).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qimem_client_secrets",
        sa.Column("secret_id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), nullable=False, index=True),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(512), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_table(
        "qimem_otp",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("secret_wrapped", sa.LargeBinary, nullable=False),
        sa.Column("confirmed", sa.Boolean, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "qimem_otp_recovery",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(36), nullable=False, index=True),
        sa.Column("realm", sa.String(64), nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
    )
    op.create_table(
        "qimem_realm_policy",
        sa.Column("realm", sa.String(64), primary_key=True),
        sa.Column("otp_required", sa.Boolean, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("qimem_realm_policy", "qimem_otp_recovery", "qimem_otp", "qimem_client_secrets"):
        op.drop_table(table)
