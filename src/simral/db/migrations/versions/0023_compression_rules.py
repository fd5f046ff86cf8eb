"""compression at rest: rules (age, modality, organisation → lossless syntax) and per-instance outcomes

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-29 09:33:08.298617
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compression_rule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("syntax", sa.String(length=16), nullable=False),
        sa.Column("older_than_days", sa.Integer(), nullable=True),
        sa.Column("modalities", sa.String(length=128), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compression_rule")),
    )
    op.create_table(
        "compression_outcome",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.String(length=64), nullable=False),
        sa.Column("source_syntax", sa.String(length=64), nullable=False),
        sa.Column("target_syntax", sa.String(length=64), nullable=False),
        sa.Column("size_before", sa.BigInteger(), nullable=False),
        sa.Column("size_after", sa.BigInteger(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compression_outcome")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_compression_outcome_sop_uid")),
    )
    with op.batch_alter_table("compression_outcome", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_compression_outcome_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_compression_outcome_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    op.drop_table("compression_outcome")
    op.drop_table("compression_rule")
