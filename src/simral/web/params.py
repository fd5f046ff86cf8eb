"""Path parameters shared by the HTTP routes, bounded so that the database never sees what it cannot
store (a 64-bit signed integer: SQLite INTEGER, PostgreSQL BIGINT); anything else answers 422."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

#: The largest row id (and integer query value) a route passes to the database.
MAX_ROW_ID = 2**63 - 1

#: A table row's id in a route path (a report, request, task, job…).
RowId = Annotated[int, Path(ge=0, le=MAX_ROW_ID, description="Row id (a 64-bit integer)")]
