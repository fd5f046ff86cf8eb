"""DMP publication: organisations publishing through simral, document entries and their state

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-29 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmp_organisation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("auth_cert_file", sa.String(length=500), nullable=False),
        sa.Column("auth_key_file", sa.String(length=500), nullable=False),
        sa.Column("signing_cert_file", sa.String(length=500), nullable=False),
        sa.Column("signing_key_file", sa.String(length=500), nullable=False),
        sa.Column("structure_id", sa.String(length=32), nullable=False),
        sa.Column("activity_sector", sa.String(length=16), nullable=False),
        sa.Column("facility_type_code", sa.String(length=16), nullable=False),
        sa.Column("practice_setting_code", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dmp_organisation")),
        sa.UniqueConstraint("organisation_code", name=op.f("uq_dmp_organisation_organisation_code")),
    )
    op.create_table(
        "dmp_document",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("unique_id", sa.String(length=128), nullable=False),
        sa.Column("entry_uuid", sa.String(length=64), nullable=False),
        sa.Column("replaces_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("submission_uid", sa.String(length=128), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha1", sa.String(length=40), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["report.id"], name=op.f("fk_dmp_document_report_id_report")),
        sa.ForeignKeyConstraint(
            ["request_id"], ["imaging_request.id"], name=op.f("fk_dmp_document_request_id_imaging_request")
        ),
        sa.ForeignKeyConstraint(
            ["replaces_id"], ["dmp_document.id"], name=op.f("fk_dmp_document_replaces_id_dmp_document")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dmp_document")),
        sa.UniqueConstraint("entry_uuid", name=op.f("uq_dmp_document_entry_uuid")),
        sa.UniqueConstraint("organisation_code", "unique_id", name="uq_dmp_document_unique"),
    )
    with op.batch_alter_table("dmp_document", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dmp_document_organisation_code"), ["organisation_code"])
        batch_op.create_index(batch_op.f("ix_dmp_document_study_uid"), ["study_uid"])
        batch_op.create_index(batch_op.f("ix_dmp_document_report_id"), ["report_id"])
        batch_op.create_index(batch_op.f("ix_dmp_document_request_id"), ["request_id"])
        batch_op.create_index(batch_op.f("ix_dmp_document_state"), ["state"])


def downgrade() -> None:
    op.drop_table("dmp_document")
    op.drop_table("dmp_organisation")
