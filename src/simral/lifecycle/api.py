"""HTTP routes of the lifecycle service: the deletion batches an administrator reviews and
approves (CSP R.1112-7; :mod:`simral.lifecycle.service`). Thin: the service decides who may."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request

from simral.access.policy import AccessDenied
from simral.context import AppContext
from simral.lifecycle import service as lifecycle
from simral.web.auth import request_principal
from simral.web.params import RowId


def mount_lifecycle_api(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /api/retention/batches``, ``GET /api/retention/batches/{id}`` and
    ``POST /api/retention/batches/{id}/approve`` (site administrators of the batch's organisation,
    regional administrators)."""

    @web.get("/api/retention/batches")
    def batches(request: Request) -> list[dict[str, Any]]:
        """Deletion batches the caller may approve, newest first."""
        principal = request_principal(request)
        with ctx.db.reading() as session:
            rows = lifecycle.list_batches(session, principal=principal)
        return [{**row.__dict__, "items": dict(row.items)} for row in rows]

    @web.get("/api/retention/batches/{batch_id}")
    def batch(request: Request, batch_id: RowId) -> dict[str, Any]:
        """A batch's items: study, scope, retention date, state."""
        principal = request_principal(request)
        try:
            with ctx.db.reading() as session:
                items = lifecycle.batch_items(session, batch_id, principal=principal)
                return {
                    "id": batch_id,
                    "items": [
                        {
                            "id": item.id,
                            "study_uid": item.study_uid,
                            "scope": item.scope,
                            "instances": len(item.sop_uids),
                            "retention_until": item.retention_until,
                            "state": item.state,
                            "detail": item.detail,
                        }
                        for item in items
                    ],
                }
        except (lifecycle.LifecycleError, AccessDenied):
            raise HTTPException(404, "no such deletion batch, or no access") from None

    @web.post("/api/retention/batches/{batch_id}/approve")
    def approve(request: Request, batch_id: RowId) -> dict[str, Any]:
        """Approve a proposed batch: its deletion jobs are queued."""
        principal = request_principal(request)
        try:
            with ctx.db.unit_of_work() as session:
                queued = lifecycle.approve(session, batch_id, principal=principal)
        except AccessDenied:
            raise HTTPException(404, "no such deletion batch, or no access") from None
        except lifecycle.LifecycleError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"id": batch_id, "jobs": queued}
