"""routing by subspecialty and on-call schedule (contract subspecialties, request subspecialty,
on-call pre-assignment and alert of reading tasks, on_call_shift)

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reading_contract", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("subspecialties", sa.String(length=256), server_default="", nullable=False)
        )
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("subspecialty", sa.String(length=32), server_default="", nullable=False)
        )
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assigned_to", sa.String(length=128), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("oncall_alerted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "on_call_shift",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_code", sa.String(length=32), nullable=False),
        sa.Column("login", sa.String(length=128), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subspecialty", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_on_call_shift")),
    )
    with op.batch_alter_table("on_call_shift", schema=None) as batch_op:
        batch_op.create_index(
            "ix_on_call_shift_group_period", ["group_code", "start_at", "end_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_on_call_shift_login"), ["login"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("on_call_shift", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_on_call_shift_login"))
        batch_op.drop_index("ix_on_call_shift_group_period")
    op.drop_table("on_call_shift")
    with op.batch_alter_table("reading_task", schema=None) as batch_op:
        batch_op.drop_column("oncall_alerted_at")
        batch_op.drop_column("assigned_at")
        batch_op.drop_column("assigned_to")
    with op.batch_alter_table("imaging_request", schema=None) as batch_op:
        batch_op.drop_column("subspecialty")
    with op.batch_alter_table("reading_contract", schema=None) as batch_op:
        batch_op.drop_column("subspecialties")
