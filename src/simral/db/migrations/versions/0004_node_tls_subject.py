"""remote node bound to a client certificate subject

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 00:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_node", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tls_subject", sa.String(length=255), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("remote_node", schema=None) as batch_op:
        batch_op.drop_column("tls_subject")
