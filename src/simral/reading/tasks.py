"""Reading tasks: the studies a reading group is to interpret (DESIGN.md §7, issue 6 item 4)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.db.base import utcnow
from simral.reading.models import PRIORITIES, TASK_CANCELLED, TASK_REPORTED, TASK_WAITING, ReadingTask


def open_task(
    session: Session,
    *,
    study_uid: str,
    site_code: str,
    group_code: str,
    modality: str = "",
    priority: str,
    due_at: datetime | None,
    request_id: int | None = None,
    subspecialty: str = "",
) -> ReadingTask:
    """The reading task of a study, opened (state ``waiting``) if it has none still open: a study
    is read once per request; a task reported or cancelled does not block a new one."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    existing = session.scalar(
        select(ReadingTask)
        .where(
            ReadingTask.study_uid == study_uid,
            ReadingTask.state.not_in((TASK_REPORTED, TASK_CANCELLED)),
        )
        .order_by(ReadingTask.id.desc())
        .limit(1)
    )
    if existing is not None:
        return existing
    now = utcnow()
    task = ReadingTask(
        request_id=request_id,
        study_uid=study_uid,
        site_code=site_code,
        group_code=group_code,
        modality=modality,
        subspecialty=subspecialty,
        priority=priority,
        due_at=due_at,
        state=TASK_WAITING,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    session.flush()
    return task
