"""the order an imaging request came in (its answer's shape); organisations' activity sector and
practice setting (CDA healthCareFacility/code, standardIndustryClassCode)

Revision ID: 0026
Revises: 0025
Create Date: 2026-11-29 16:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hl7_order", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
    with op.batch_alter_table("organisation", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("activity_sector", sa.String(length=8), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("practice_setting", sa.String(length=32), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("organisation", schema=None) as batch_op:
        batch_op.drop_column("practice_setting")
        batch_op.drop_column("activity_sector")
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.drop_column("hl7_order")
