"""request documents: the request letter and prior documents attached to an imaging request

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_document",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=256), nullable=False),
        sa.Column("document_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("media_type", sa.String(length=64), nullable=False),
        sa.Column("type_code", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("blob_key", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["imaging_request.id"],
            name=op.f("fk_request_document_request_id_imaging_request"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_document")),
        sa.UniqueConstraint("blob_key", name=op.f("uq_request_document_blob_key")),
    )
    with op.batch_alter_table("request_document", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_request_document_request_id"), ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("request_document", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_request_document_request_id"))
    op.drop_table("request_document")
