"""de-identified exports and their pseudonym maps

Revision ID: 0013
Revises: 0010
Create Date: 2026-11-29 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deidentified_export",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_by_organisation", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("study_uids", sa.Text(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("pseudonym_map", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deidentified_export")),
    )
    op.create_index(op.f("ix_deidentified_export_created_by"), "deidentified_export", ["created_by"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deidentified_export_created_by"), table_name="deidentified_export")
    op.drop_table("deidentified_export")
