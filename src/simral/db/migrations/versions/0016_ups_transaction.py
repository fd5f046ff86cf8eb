"""reading tasks remember the UPS-RS Transaction UID of their performer (ups_transaction_uid)

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ups_transaction_uid", sa.String(length=64), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.drop_column("ups_transaction_uid")
