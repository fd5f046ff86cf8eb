"""Recording audit events inside the caller's unit of work (DESIGN.md §2: services audit)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from simral.audit.models import AuditEvent
from simral.db.base import utcnow

_INSERT = insert(cast(Table, AuditEvent.__table__))


def record(
    session: Session,
    *,
    action: str,
    actor: str,
    outcome: str,
    study_uid: str = "",
    patient_id: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit row to the current transaction; it commits (or not) with the change it describes."""
    session.connection().execute(
        _INSERT,
        {
            "at": utcnow(),
            "action": action,
            "actor": actor,
            "outcome": outcome,
            "study_uid": study_uid,
            "patient_id": patient_id,
            "detail": detail or {},
        },
    )
