"""registered HL7 identity sources: senders admitted to the ADT feed and PDQ (hl7_source)

Revision ID: 0028
Revises: 0027
Create Date: 2026-11-29 19:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hl7_source",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("application", sa.String(length=200), nullable=False),
        sa.Column("facility", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("check_host", sa.Boolean(), nullable=False),
        sa.Column("tls_subject", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hl7_source")),
        sa.UniqueConstraint("name", name=op.f("uq_hl7_source_name")),
    )
    with op.batch_alter_table("hl7_source", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_source_application"), ["application"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("hl7_source", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hl7_source_application"))
    op.drop_table("hl7_source")
