"""RIS endpoints: bind the HL7 sender to its host or its TLS client certificate

Revision ID: 0024
Revises: 0023
Create Date: 2026-11-29 13:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ris_endpoint", schema=None) as batch_op:
        batch_op.add_column(sa.Column("check_host", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(
            sa.Column("tls_subject", sa.String(length=255), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("ris_endpoint", schema=None) as batch_op:
        batch_op.drop_column("tls_subject")
        batch_op.drop_column("check_host")
