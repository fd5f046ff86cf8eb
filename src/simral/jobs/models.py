"""The job table: the durable outbox of follow-up work (DESIGN.md §5)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: Waiting for its ``run_after`` time (new, or retried after a failure).
QUEUED = "queued"
#: Claimed by a runner until ``lease_until``; an expired lease makes it claimable again.
RUNNING = "running"
DONE = "done"
#: Failed ``max_attempts`` times, or permanently: kept for an operator to retry or cancel.
DEAD = "dead"
CANCELLED = "cancelled"
STATES = (QUEUED, RUNNING, DONE, DEAD, CANCELLED)
ACTIVE_STATES = (QUEUED, RUNNING)


class Job(Base):
    """One unit of follow-up work: a kind (which handler runs it) and a JSON payload.

    ``group_key`` lets a runner claim several jobs bound for the same place at once (one DICOM
    association or one STOW-RS request for a batch); ``dedupe_key`` keeps one active job per key.
    """

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_claim", "state", "run_after"),
        Index("ix_job_dedupe", "dedupe_key", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    group_key: Mapped[str] = mapped_column(String(200), default="")
    dedupe_key: Mapped[str] = mapped_column(String(300), default="")
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
