"""HTTP routes of the sharing service: media export of a study (IHE PDI ZIP)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from simral.access.policy import Principal
from simral.context import AppContext
from simral.sharing import media
from simral.web.auth import request_principal


def mount_sharing_api(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /studies/{study_uid}/export.zip`` (session or bearer token; access policy applies)."""

    @web.get("/studies/{study_uid}/export.zip", include_in_schema=False)
    def export_study(request: Request, study_uid: str) -> FileResponse:
        return export_response(ctx, request_principal(request), study_uid)


def export_response(ctx: AppContext, principal: Principal, study_uid: str) -> FileResponse:
    """The study as a PDI ZIP download, built in a scratch file removed once sent; 404 alike for
    an unknown study and one the principal may not see (no existence oracle)."""
    fd, name = tempfile.mkstemp(prefix=".export-", suffix=".zip", dir=ctx.store.scratch_dir())
    os.close(fd)
    target = Path(name)
    try:
        result = media.export_pdi(ctx, principal, [study_uid[:64]], target)
    except media.ExportError:
        target.unlink(missing_ok=True)
        raise HTTPException(404, "no such study, or no access") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return FileResponse(
        result.path,
        media_type="application/zip",
        filename=f"examen-{study_uid[-12:]}.zip",
        headers={"Cache-Control": "no-store"},
        background=BackgroundTask(target.unlink, missing_ok=True),
    )
