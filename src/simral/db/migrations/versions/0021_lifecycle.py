"""Lifecycle: retention policies, legal holds, deletion batches, IOCM rejected instances; death date

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patient_identity", schema=None) as batch_op:
        batch_op.add_column(sa.Column("death_date", sa.String(length=8), nullable=False, server_default=""))
    op.create_table(
        "retention_policy",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("years", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retention_policy")),
        sa.UniqueConstraint("organisation_code", name=op.f("uq_retention_policy_organisation_code")),
    )
    op.create_table(
        "legal_hold",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=128), nullable=False),
        sa.Column("release_reason", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["patient_identity.id"], name=op.f("fk_legal_hold_identity_id_patient_identity")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_legal_hold")),
    )
    with op.batch_alter_table("legal_hold", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_legal_hold_study_uid"), ["study_uid"])
        batch_op.create_index(batch_op.f("ix_legal_hold_identity_id"), ["identity_id"])
    op.create_table(
        "deletion_batch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reviewed_on", sa.String(length=10), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approved_by", sa.String(length=128), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_batch")),
    )
    with op.batch_alter_table("deletion_batch", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deletion_batch_organisation_code"), ["organisation_code"])
        batch_op.create_index(batch_op.f("ix_deletion_batch_state"), ["state"])
    op.create_table(
        "deletion_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("sop_uids", sa.JSON(), nullable=False),
        sa.Column("retention_until", sa.String(length=10), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("blob_keys", sa.JSON(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["deletion_batch.id"], name=op.f("fk_deletion_item_batch_id_deletion_batch")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_item")),
    )
    with op.batch_alter_table("deletion_item", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deletion_item_batch_id"), ["batch_id"])
        batch_op.create_index(batch_op.f("ix_deletion_item_study_uid"), ["study_uid"])
        batch_op.create_index(batch_op.f("ix_deletion_item_state"), ["state"])
    op.create_table(
        "rejected_instance",
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("reason_code", sa.String(length=16), nullable=False),
        sa.Column("note_sop_uid", sa.String(length=64), nullable=False),
        sa.Column("rejected_by", sa.String(length=128), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instance.id"],
            name=op.f("fk_rejected_instance_instance_pk_instance"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_pk", name=op.f("pk_rejected_instance")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_rejected_instance_sop_uid")),
    )
    with op.batch_alter_table("rejected_instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rejected_instance_study_uid"), ["study_uid"])
        batch_op.create_index(batch_op.f("ix_rejected_instance_reason_code"), ["reason_code"])


def downgrade() -> None:
    op.drop_table("rejected_instance")
    op.drop_table("deletion_item")
    op.drop_table("deletion_batch")
    op.drop_table("legal_hold")
    op.drop_table("retention_policy")
    with op.batch_alter_table("patient_identity", schema=None) as batch_op:
        batch_op.drop_column("death_date")
