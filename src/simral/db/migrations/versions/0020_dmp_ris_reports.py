"""DMP publication of reports received from a site's RIS: source, patient identity, received CDA

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dmp_document", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=64), nullable=False, server_default="simral")
        )
        batch_op.add_column(sa.Column("identity_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("content_key", sa.String(length=300), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("content_sha256", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("set_id", sa.String(length=128), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("accession_number", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("accession_authority", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_dmp_document_identity_id_patient_identity"),
            "patient_identity",
            ["identity_id"],
            ["id"],
        )
        batch_op.create_index(batch_op.f("ix_dmp_document_identity_id"), ["identity_id"])
        batch_op.create_index(batch_op.f("ix_dmp_document_set_id"), ["set_id"])


def downgrade() -> None:
    with op.batch_alter_table("dmp_document", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dmp_document_set_id"))
        batch_op.drop_index(batch_op.f("ix_dmp_document_identity_id"))
        batch_op.drop_constraint(
            batch_op.f("fk_dmp_document_identity_id_patient_identity"), type_="foreignkey"
        )
        for column in (
            "accession_authority",
            "accession_number",
            "set_id",
            "content_sha256",
            "content_key",
            "identity_id",
            "source",
        ):
            batch_op.drop_column(column)
