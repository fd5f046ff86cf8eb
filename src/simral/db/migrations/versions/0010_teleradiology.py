"""teleradiology: reading contracts, RIS endpoints, imaging requests, procedure steps, reading tasks

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 06:06:20.786203
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reading_contract",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_code", sa.String(length=32), nullable=False),
        sa.Column("group_code", sa.String(length=32), nullable=False),
        sa.Column("modalities", sa.String(length=128), nullable=False),
        sa.Column("urgent_minutes", sa.Integer(), nullable=False),
        sa.Column("routine_minutes", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reading_contract")),
        sa.UniqueConstraint("site_code", "group_code", name="uq_reading_contract_site_group"),
    )
    with op.batch_alter_table("reading_contract", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reading_contract_group_code"), ["group_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_reading_contract_site_code"), ["site_code"], unique=False)

    op.create_table(
        "ris_endpoint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("site_code", sa.String(length=32), nullable=False),
        sa.Column("application", sa.String(length=200), nullable=False),
        sa.Column("facility", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ris_endpoint")),
        sa.UniqueConstraint("name", name=op.f("uq_ris_endpoint_name")),
    )
    with op.batch_alter_table("ris_endpoint", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ris_endpoint_site_code"), ["site_code"], unique=False)

    op.create_table(
        "imaging_request",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_code", sa.String(length=32), nullable=False),
        sa.Column("group_code", sa.String(length=32), nullable=False),
        sa.Column("placer_number", sa.String(length=64), nullable=False),
        sa.Column("placer_authority", sa.String(length=64), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=True),
        sa.Column("patient", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("desired_delay", sa.String(length=32), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("justification", sa.Text(), nullable=False),
        sa.Column("clinical_history", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("anatomy", sa.JSON(), nullable=False),
        sa.Column("pregnancy", sa.String(length=8), nullable=False),
        sa.Column("height_cm", sa.Float(), nullable=True),
        sa.Column("weight_kg", sa.Float(), nullable=True),
        sa.Column("consent", sa.Boolean(), nullable=False),
        sa.Column("appointment_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requester", sa.JSON(), nullable=False),
        sa.Column("documents", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=False),
        sa.Column("refusal_reason", sa.Text(), nullable=False),
        sa.Column("answered_by", sa.String(length=128), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_reason", sa.Text(), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("accession_authority", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("complement", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_imaging_request_identity_id_patient_identity"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_request")),
        sa.UniqueConstraint(
            "site_code", "placer_number", "placer_authority", name="uq_imaging_request_placer"
        ),
    )
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_request_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_imaging_request_group_code"), ["group_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_imaging_request_identity_id"), ["identity_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_imaging_request_site_code"), ["site_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_imaging_request_state"), ["state"], unique=False)
        batch_op.create_index("ix_imaging_request_state_due", ["state", "due_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_imaging_request_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "reading_task",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("site_code", sa.String(length=32), nullable=False),
        sa.Column("group_code", sa.String(length=32), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("subspecialty", sa.String(length=32), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["imaging_request.id"], name=op.f("fk_reading_task_request_id_imaging_request")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reading_task")),
    )
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.create_index(
            "ix_reading_task_group_state_due", ["group_code", "state", "due_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_reading_task_request_id"), ["request_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reading_task_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_reading_task_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "scheduled_procedure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("site_code", sa.String(length=32), nullable=False),
        sa.Column("step_id", sa.String(length=16), nullable=False),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("station_ae", sa.String(length=16), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["imaging_request.id"],
            name=op.f("fk_scheduled_procedure_request_id_imaging_request"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_procedure")),
        sa.UniqueConstraint("step_id", name=op.f("uq_scheduled_procedure_step_id")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_scheduled_procedure_study_uid")),
    )
    with op.batch_alter_table("scheduled_procedure", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scheduled_procedure_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_scheduled_procedure_request_id"), ["request_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_scheduled_procedure_site_code"), ["site_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_scheduled_procedure_start_at"), ["start_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_scheduled_procedure_state"), ["state"], unique=False)

    op.create_table(
        "performed_procedure_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("procedure_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("station_ae", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["procedure_id"],
            ["scheduled_procedure.id"],
            name=op.f("fk_performed_procedure_step_procedure_id_scheduled_procedure"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performed_procedure_step")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_performed_procedure_step_sop_instance_uid")),
    )
    with op.batch_alter_table("performed_procedure_step", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_procedure_id"), ["procedure_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_performed_procedure_step_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_study_uid"), ["study_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("performed_procedure_step", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_performed_procedure_step_study_uid"))
        batch_op.drop_index(batch_op.f("ix_performed_procedure_step_status"))
        batch_op.drop_index(batch_op.f("ix_performed_procedure_step_procedure_id"))

    op.drop_table("performed_procedure_step")
    with op.batch_alter_table("scheduled_procedure", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduled_procedure_state"))
        batch_op.drop_index(batch_op.f("ix_scheduled_procedure_start_at"))
        batch_op.drop_index(batch_op.f("ix_scheduled_procedure_site_code"))
        batch_op.drop_index(batch_op.f("ix_scheduled_procedure_request_id"))
        batch_op.drop_index(batch_op.f("ix_scheduled_procedure_accession_number"))

    op.drop_table("scheduled_procedure")
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reading_task_study_uid"))
        batch_op.drop_index(batch_op.f("ix_reading_task_state"))
        batch_op.drop_index(batch_op.f("ix_reading_task_request_id"))
        batch_op.drop_index("ix_reading_task_group_state_due")

    op.drop_table("reading_task")
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_imaging_request_study_uid"))
        batch_op.drop_index("ix_imaging_request_state_due")
        batch_op.drop_index(batch_op.f("ix_imaging_request_state"))
        batch_op.drop_index(batch_op.f("ix_imaging_request_site_code"))
        batch_op.drop_index(batch_op.f("ix_imaging_request_identity_id"))
        batch_op.drop_index(batch_op.f("ix_imaging_request_group_code"))
        batch_op.drop_index(batch_op.f("ix_imaging_request_accession_number"))

    op.drop_table("imaging_request")
    with op.batch_alter_table("ris_endpoint", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ris_endpoint_site_code"))

    op.drop_table("ris_endpoint")
    with op.batch_alter_table("reading_contract", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reading_contract_site_code"))
        batch_op.drop_index(batch_op.f("ix_reading_contract_group_code"))

    op.drop_table("reading_contract")
