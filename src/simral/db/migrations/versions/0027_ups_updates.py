"""reading tasks keep what their UPS-RS performer set with Update Workitem (ups_updates)

Revision ID: 0027
Revises: 0026
Create Date: 2026-11-29 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ups_updates", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.drop_column("ups_updates")
