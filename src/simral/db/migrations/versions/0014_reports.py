"""reports (versions, addenda, publication) and second opinions

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29 06:38:17.634341
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("set_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document_uid", sa.String(length=64), nullable=False),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("indications", sa.Text(), nullable=False),
        sa.Column("technique", sa.Text(), nullable=False),
        sa.Column("results", sa.Text(), nullable=False),
        sa.Column("conclusion", sa.Text(), nullable=False),
        sa.Column("addendum", sa.Text(), nullable=False),
        sa.Column("dose", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("author_name", sa.String(length=200), nullable=False),
        sa.Column("author_national_id", sa.String(length=32), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signature_method", sa.String(length=16), nullable=False),
        sa.Column("publication_state", sa.String(length=16), nullable=False),
        sa.Column("published", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["previous_id"], ["report.id"], name=op.f("fk_report_previous_id_report")),
        sa.ForeignKeyConstraint(
            ["request_id"], ["imaging_request.id"], name=op.f("fk_report_request_id_imaging_request")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["reading_task.id"], name=op.f("fk_report_task_id_reading_task")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report")),
        sa.UniqueConstraint("document_uid", name=op.f("uq_report_document_uid")),
        sa.UniqueConstraint("set_id", "version", name="uq_report_set_version"),
    )
    with op.batch_alter_table("report", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_request_id"), ["request_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_set_id"), ["set_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_study_uid"), ["study_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_task_id"), ["task_id"], unique=False)

    op.create_table(
        "second_opinion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("requested_of", sa.String(length=128), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_id"], ["reading_task.id"], name=op.f("fk_second_opinion_task_id_reading_task")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_second_opinion")),
    )
    with op.batch_alter_table("second_opinion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_second_opinion_requested_of"), ["requested_of"], unique=False)
        batch_op.create_index(batch_op.f("ix_second_opinion_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_second_opinion_task_id"), ["task_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("second_opinion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_second_opinion_task_id"))
        batch_op.drop_index(batch_op.f("ix_second_opinion_state"))
        batch_op.drop_index(batch_op.f("ix_second_opinion_requested_of"))

    op.drop_table("second_opinion")
    with op.batch_alter_table("report", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_task_id"))
        batch_op.drop_index(batch_op.f("ix_report_study_uid"))
        batch_op.drop_index(batch_op.f("ix_report_state"))
        batch_op.drop_index(batch_op.f("ix_report_set_id"))
        batch_op.drop_index(batch_op.f("ix_report_request_id"))

    op.drop_table("report")
