"""A unique record id on every audit record (issue 14 item 3, "audit that loses nothing").

``qimem_audit.record_id`` (a UUID in text form) is given to each record when it is made,
before it is written; the unique index makes writing idempotent: a record replayed from
the local spill file after a crash between the database commit and the spill's
truncation is inserted once (``INSERT ... ON CONFLICT (record_id) DO NOTHING``). Rows
written before this revision keep NULL (unique indexes allow any number of NULLs on
SQLite and PostgreSQL).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qimem_audit") as batch:
        batch.add_column(sa.Column("record_id", sa.String(36), nullable=True))
    op.create_index("ux_audit_record_id", "qimem_audit", ["record_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_audit_record_id", table_name="qimem_audit")
    with op.batch_alter_table("qimem_audit") as batch:
        batch.drop_column("record_id")
