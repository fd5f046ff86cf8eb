"""Alembic environment: runs migrations on the connection handed over by :mod:`simral.db.migrate`."""

from __future__ import annotations

from alembic import context

from simral.db.registry import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through simral.db.migrate.upgrade()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
