"""patient identity: assigning authorities, identities, persons, merges, vigilance cases, HL7 log

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assigning_authority",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("oid", sa.String(length=64), nullable=True),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("organisation_code", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assigning_authority")),
        sa.UniqueConstraint("oid", name=op.f("uq_assigning_authority_oid")),
        sa.UniqueConstraint("organisation_code", name=op.f("uq_assigning_authority_organisation_code")),
    )
    op.create_index(op.f("ix_assigning_authority_namespace"), "assigning_authority", ["namespace"])
    op.create_table(
        "hl7_message",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dedup_key", sa.String(length=300), nullable=True),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("sending_application", sa.String(length=200), nullable=False),
        sa.Column("sending_facility", sa.String(length=200), nullable=False),
        sa.Column("message_type", sa.String(length=32), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=2), nullable=False),
        sa.Column("error", sa.String(length=1000), nullable=False),
        sa.Column("ack", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hl7_message")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_hl7_message_dedup_key")),
    )
    op.create_index(op.f("ix_hl7_message_control_id"), "hl7_message", ["control_id"])
    op.create_index(op.f("ix_hl7_message_outcome"), "hl7_message", ["outcome"])
    op.create_index(op.f("ix_hl7_message_received_at"), "hl7_message", ["received_at"])
    op.create_table(
        "person",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_person")),
    )
    op.create_table(
        "patient_identity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("authority_id", sa.Integer(), nullable=False),
        sa.Column("local_id", sa.String(length=64), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("birth_name", sa.String(length=100), nullable=False),
        sa.Column("birth_given_names", sa.String(length=200), nullable=False),
        sa.Column("first_birth_given_name", sa.String(length=100), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("birth_place_code", sa.String(length=5), nullable=False),
        sa.Column("used_name", sa.String(length=100), nullable=False),
        sa.Column("used_given_name", sa.String(length=100), nullable=False),
        sa.Column("ins_matricule", sa.String(length=15), nullable=False),
        sa.Column("ins_oid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_source", sa.String(length=128), nullable=False),
        sa.Column("attributes", sa.String(length=64), nullable=False),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["authority_id"],
            ["assigning_authority.id"],
            name=op.f("fk_patient_identity_authority_id_assigning_authority"),
        ),
        sa.ForeignKeyConstraint(
            ["merged_into_id"],
            ["patient_identity.id"],
            name=op.f("fk_patient_identity_merged_into_id_patient_identity"),
        ),
        sa.ForeignKeyConstraint(
            ["person_id"], ["person.id"], name=op.f("fk_patient_identity_person_id_person")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_identity")),
        sa.UniqueConstraint("authority_id", "local_id", name="uq_patient_identity_authority_local_id"),
    )
    op.create_index(op.f("ix_patient_identity_authority_id"), "patient_identity", ["authority_id"])
    op.create_index("ix_patient_identity_ins", "patient_identity", ["ins_oid", "ins_matricule"])
    op.create_index(op.f("ix_patient_identity_merged_into_id"), "patient_identity", ["merged_into_id"])
    op.create_index(op.f("ix_patient_identity_person_id"), "patient_identity", ["person_id"])
    op.create_index("ix_patient_identity_traits", "patient_identity", ["birth_date", "birth_name"])
    op.create_table(
        "identity_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("other_identity_id", sa.Integer(), nullable=True),
        sa.Column("moved", sa.JSON(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undone_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_identity_change_identity_id_patient_identity"),
        ),
        sa.ForeignKeyConstraint(
            ["other_identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_identity_change_other_identity_id_patient_identity"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_change")),
    )
    op.create_index(op.f("ix_identity_change_identity_id"), "identity_change", ["identity_id"])
    op.create_index(op.f("ix_identity_change_kind"), "identity_change", ["kind"])
    op.create_index(op.f("ix_identity_change_other_identity_id"), "identity_change", ["other_identity_id"])
    op.create_table(
        "study_identity",
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_study_identity_identity_id_patient_identity"),
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["study.id"], name=op.f("fk_study_identity_study_pk_study"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_pk", name=op.f("pk_study_identity")),
    )
    op.create_index(op.f("ix_study_identity_identity_id"), "study_identity", ["identity_id"])
    op.create_table(
        "vigilance_case",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("other_identity_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=128), nullable=False),
        sa.Column("resolution", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_vigilance_case_identity_id_patient_identity"),
        ),
        sa.ForeignKeyConstraint(
            ["other_identity_id"],
            ["patient_identity.id"],
            name=op.f("fk_vigilance_case_other_identity_id_patient_identity"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vigilance_case")),
    )
    op.create_index(op.f("ix_vigilance_case_identity_id"), "vigilance_case", ["identity_id"])
    op.create_index(op.f("ix_vigilance_case_kind"), "vigilance_case", ["kind"])
    op.create_index(op.f("ix_vigilance_case_other_identity_id"), "vigilance_case", ["other_identity_id"])
    op.create_index(op.f("ix_vigilance_case_state"), "vigilance_case", ["state"])


def downgrade() -> None:
    op.drop_table("vigilance_case")
    op.drop_table("study_identity")
    op.drop_table("identity_change")
    op.drop_table("patient_identity")
    op.drop_table("person")
    op.drop_table("hl7_message")
    op.drop_table("assigning_authority")
