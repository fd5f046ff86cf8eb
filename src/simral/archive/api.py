"""The archive's own HTTP routes: the change feed other services and peers follow."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Query, Request

from simral.archive.service import changes_since
from simral.context import AppContext
from simral.web.auth import request_principal
from simral.web.params import MAX_ROW_ID


def mount_archive_api(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /api/changes`` to ``web``."""

    @web.get("/api/changes")
    def changes(
        request: Request,
        since: int = Query(0, ge=0, le=MAX_ROW_ID, description="Last sequence number already seen."),
        limit: int = Query(1000, ge=1, le=10000),
    ) -> dict[str, Any]:
        """Instances created, updated or deleted after ``since``, oldest first.

        Follow the feed by passing the returned ``last`` as the next ``since``; ``more`` tells that
        another page is ready now.
        """
        with ctx.db.reading() as session:
            items = changes_since(session, principal=request_principal(request), since=since, limit=limit + 1)
        more = len(items) > limit
        items = items[:limit]
        return {
            "changes": [asdict(item) for item in items],
            "last": items[-1].seq if items else since,
            "more": more,
        }
