"""Turnaround dashboard of the teleradiology workflow (issue 6 item 7; DESIGN.md §7).

Per requesting site, reading group, modality and priority, over a period: how many requests came,
were accepted or refused and how fast they were answered; how many studies were read and how long
it took from the images being complete (task ready) and from the request to the signed report;
how many were reported after their deadline, are late now, were escalated; and the backlog (tasks
ready or claimed now). Durations are medians and 90th percentiles in minutes.

Scope follows the access policy (:func:`simral.access.policy.dashboard_scope`): a group sees its
rows, a site its own, the regional operator everything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, dashboard_scope
from simral.db.base import utcnow
from simral.reading.models import (
    REQUEST_ACCEPTED,
    REQUEST_CANCELLED,
    REQUEST_PERFORMED,
    REQUEST_REFUSED,
    REQUEST_REPORTED,
    TASK_CANCELLED,
    TASK_CLAIMED,
    TASK_READY,
    TASK_REPORTED,
    ImagingRequest,
    ReadingTask,
    Report,
)

Key = tuple[str, str, str, str]  # site, group, modality, priority


def percentile(values: Iterable[float], fraction: float) -> float | None:
    """The ``fraction`` percentile of ``values`` (nearest rank), None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _utc(value: datetime) -> datetime:
    """SQLite hands timestamps back naive: they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _minutes(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (_utc(end) - _utc(start)).total_seconds() / 60


@dataclass
class Row:
    """The figures of one (site, group, modality, priority) over the period."""

    site: str
    group: str
    modality: str
    priority: str
    requests: int = 0
    accepted: int = 0
    refused: int = 0
    cancelled: int = 0
    answer_minutes: list[float] = field(default_factory=list)
    reported: int = 0
    ready_to_report_minutes: list[float] = field(default_factory=list)
    request_to_report_minutes: list[float] = field(default_factory=list)
    reported_late: int = 0
    late_now: int = 0
    escalated: int = 0
    backlog: int = 0

    def as_json(self) -> dict[str, Any]:
        """The row with medians and 90th percentiles instead of the raw durations."""

        def stat(values: list[float], fraction: float) -> float | None:
            found = percentile(values, fraction)
            return round(found, 1) if found is not None else None

        return {
            "site": self.site,
            "group": self.group,
            "modality": self.modality,
            "priority": self.priority,
            "requests": self.requests,
            "accepted": self.accepted,
            "refused": self.refused,
            "cancelled": self.cancelled,
            "answer_minutes_median": stat(self.answer_minutes, 0.5),
            "answer_minutes_p90": stat(self.answer_minutes, 0.9),
            "reported": self.reported,
            "ready_to_report_minutes_median": stat(self.ready_to_report_minutes, 0.5),
            "ready_to_report_minutes_p90": stat(self.ready_to_report_minutes, 0.9),
            "request_to_report_minutes_median": stat(self.request_to_report_minutes, 0.5),
            "request_to_report_minutes_p90": stat(self.request_to_report_minutes, 0.9),
            "reported_late": self.reported_late,
            "late_now": self.late_now,
            "escalated": self.escalated,
            "backlog": self.backlog,
        }


def _scoped(
    query: Any, site_column: Any, group_column: Any, scope: tuple[frozenset[str], frozenset[str]] | None
) -> Any:
    if scope is None:
        return query
    sites, groups = scope
    return query.where(or_(site_column.in_(sorted(sites)), group_column.in_(sorted(groups))))


def turnaround(
    session: Session, *, principal: Principal, days: int = 30, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The dashboard rows for the last ``days`` days (requests made and tasks opened in the period;
    backlog and lateness as of ``now``), sorted by site, group, modality, priority."""
    scope = dashboard_scope(principal)
    if scope is not None and not (scope[0] or scope[1]):
        raise AccessDenied(f"{principal.audit_name} may not see the turnaround dashboard")
    now = now or utcnow()
    since = now - timedelta(days=days)
    rows: dict[Key, Row] = {}

    def row(site: str, group: str, modality: str, priority: str) -> Row:
        key = (site, group, modality or "", priority)
        if key not in rows:
            rows[key] = Row(*key)
        return rows[key]

    requests = session.scalars(
        _scoped(
            select(ImagingRequest).where(ImagingRequest.created_at >= since),
            ImagingRequest.site_code,
            ImagingRequest.group_code,
            scope,
        )
    )
    for request in requests:
        target = row(request.site_code, request.group_code, request.modality, request.priority)
        target.requests += 1
        if request.state == REQUEST_REFUSED:
            target.refused += 1
        elif request.state == REQUEST_CANCELLED:
            target.cancelled += 1
        if request.state in (REQUEST_ACCEPTED, REQUEST_PERFORMED, REQUEST_REPORTED) or (
            request.state == REQUEST_CANCELLED and request.protocol
        ):
            target.accepted += 1
        answered = _minutes(request.created_at, request.answered_at)
        if answered is not None:
            target.answer_minutes.append(answered)

    task_query = _scoped(
        select(ReadingTask, ImagingRequest)
        .outerjoin(ImagingRequest, ImagingRequest.id == ReadingTask.request_id)
        .where(or_(ReadingTask.created_at >= since, ReadingTask.state.in_((TASK_READY, TASK_CLAIMED)))),
        ReadingTask.site_code,
        ReadingTask.group_code,
        scope,
    )
    tasks = list(session.execute(task_query))
    signed = _first_signatures(session, [task.id for task, _ in tasks])
    for task, request in tasks:
        if task.state == TASK_CANCELLED:
            continue
        target = row(task.site_code, task.group_code, task.modality, task.priority)
        if task.escalated_at is not None:
            target.escalated += 1
        if task.state in (TASK_READY, TASK_CLAIMED):
            target.backlog += 1
            if task.due_at is not None and _utc(task.due_at) < now:
                target.late_now += 1
        signed_at = signed.get(task.id)
        if task.state == TASK_REPORTED and signed_at is not None:
            target.reported += 1
            ready = _minutes(task.ready_at, signed_at)
            if ready is not None:
                target.ready_to_report_minutes.append(ready)
            if request is not None:
                whole = _minutes(request.created_at, signed_at)
                if whole is not None:
                    target.request_to_report_minutes.append(whole)
            if task.due_at is not None and _utc(signed_at) > _utc(task.due_at):
                target.reported_late += 1
    return [rows[key].as_json() for key in sorted(rows)]


def _first_signatures(session: Session, task_ids: list[int]) -> dict[int, datetime]:
    """When each task's report was first signed (its version 1; addenda do not count)."""
    out: dict[int, datetime] = {}
    for start in range(0, len(task_ids), 500):
        chunk = task_ids[start : start + 500]
        for task_id, signed_at in session.execute(
            select(Report.task_id, Report.signed_at).where(
                Report.task_id.in_(chunk), Report.version == 1, Report.signed_at.is_not(None)
            )
        ):
            if task_id is not None and signed_at is not None:
                out[int(task_id)] = signed_at
    return out
