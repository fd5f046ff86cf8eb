"""storage tiers, replication and fixity: tier rules, replica copies, fixity alarms

The single store of earlier versions becomes the default store named ``hot``: ``blob.store`` and
``request_document.store`` values ``fs`` / ``s3`` (the old backend names) are renamed.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tier_rule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target_store", sa.String(length=32), nullable=False),
        sa.Column("older_than_days", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_rule")),
    )
    op.create_table(
        "blob_replica",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("blob_pk", sa.Integer(), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("replicated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_replica")),
        sa.UniqueConstraint("blob_pk", "store", name="uq_blob_replica_blob_store"),
    )
    op.create_table(
        "fixity_alarm",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("blob_pk", sa.Integer(), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("problem", sa.String(length=16), nullable=False),
        sa.Column("expected_sha256", sa.String(length=64), nullable=False),
        sa.Column("found_sha256", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("repaired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fixity_alarm")),
    )
    with op.batch_alter_table("fixity_alarm", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fixity_alarm_blob_pk"), ["blob_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_fixity_alarm_outcome"), ["outcome"], unique=False)
    with op.batch_alter_table("blob", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blob_verified_at"), ["verified_at"], unique=False)
    op.execute("UPDATE blob SET store = 'hot' WHERE store IN ('fs', 's3')")
    op.execute("UPDATE request_document SET store = 'hot' WHERE store IN ('fs', 's3')")


def downgrade() -> None:
    op.execute("UPDATE request_document SET store = 'fs' WHERE store = 'hot'")
    op.execute("UPDATE blob SET store = 'fs' WHERE store = 'hot'")
    with op.batch_alter_table("blob", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blob_verified_at"))
    with op.batch_alter_table("fixity_alarm", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fixity_alarm_outcome"))
        batch_op.drop_index(batch_op.f("ix_fixity_alarm_blob_pk"))
    op.drop_table("fixity_alarm")
    op.drop_table("blob_replica")
    op.drop_table("tier_rule")
