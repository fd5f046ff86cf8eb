"""shares and capability links

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 01:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "share",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=True),
        sa.Column("grantee_kind", sa.String(length=16), nullable=False),
        sa.Column("grantee", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_by_organisation", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share")),
    )
    op.create_index(op.f("ix_share_study_uid"), "share", ["study_uid"])
    op.create_index(op.f("ix_share_patient_pk"), "share", ["patient_pk"])
    op.create_index(op.f("ix_share_grantee"), "share", ["grantee"])
    op.create_table(
        "share_link",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("study_uids", sa.String(length=2048), nullable=False),
        sa.Column("purpose", sa.String(length=500), nullable=False),
        sa.Column("birth_date_check", sa.String(length=8), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_by_organisation", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_checks", sa.Integer(), nullable=False),
        sa.Column("audience", sa.String(length=16), nullable=False),
        sa.Column("seal_key", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share_link")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_share_link_token_sha256")),
    )


def downgrade() -> None:
    op.drop_table("share_link")
    op.drop_index(op.f("ix_share_grantee"), table_name="share")
    op.drop_index(op.f("ix_share_patient_pk"), table_name="share")
    op.drop_index(op.f("ix_share_study_uid"), table_name="share")
    op.drop_table("share")
