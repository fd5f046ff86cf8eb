"""HTTP routes of the sharing service: media export of a study (IHE PDI ZIP), plain or
de-identified (PS3.15 Annex E), and the pseudonym map of a de-identified export."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from simral.access.policy import AccessDenied, Principal
from simral.context import AppContext
from simral.sharing import media
from simral.sharing.deidentify import Deidentifier, DeidentifyOptions
from simral.web.auth import request_principal
from simral.web.params import RowId

_TRUE = ("1", "true", "yes", "on")


def mount_sharing_api(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /studies/{study_uid}/export.zip`` (session or bearer token; access policy applies;
    ``?deidentify=1`` with ``retain_dates``, ``retain_uids``, ``clean_descriptors``,
    ``retain_patient_characteristics``, ``retain_device_identity``, ``retain_institution_identity``)
    and ``GET /deidentified-exports/{id}`` (the pseudonym map: its author or an administrator)."""

    @web.get("/studies/{study_uid}/export.zip", include_in_schema=False)
    def export_study(request: Request, study_uid: str) -> FileResponse:
        flags = {name for name, value in request.query_params.items() if value.lower() in _TRUE}
        deidentifier = None
        if "deidentify" in flags:
            options = DeidentifyOptions(
                **{name: name in flags for name in DeidentifyOptions.__dataclass_fields__}
            )
            deidentifier = Deidentifier(options)
        return export_response(ctx, request_principal(request), study_uid, deidentifier=deidentifier)

    @web.get("/deidentified-exports/{export_id}", include_in_schema=False)
    def deidentified_export(request: Request, export_id: RowId) -> dict[str, Any]:
        principal = request_principal(request)
        try:
            with ctx.db.unit_of_work() as session:
                row = media.get_deidentified_export(session, principal=principal, export_id=export_id)
                return media.deidentified_export_document(row)
        except (media.ExportError, AccessDenied):
            raise HTTPException(404, "no such de-identified export, or no access") from None


def export_response(
    ctx: AppContext, principal: Principal, study_uid: str, *, deidentifier: Deidentifier | None = None
) -> FileResponse:
    """The study as a PDI ZIP download, built in a scratch file removed once sent; 404 alike for
    an unknown study and one the principal may not see (no existence oracle)."""
    fd, name = tempfile.mkstemp(prefix=".export-", suffix=".zip", dir=ctx.store.scratch_dir())
    os.close(fd)
    target = Path(name)
    try:
        result = media.export_pdi(ctx, principal, [study_uid[:64]], target, deidentifier=deidentifier)
    except media.ExportError:
        target.unlink(missing_ok=True)
        raise HTTPException(404, "no such study, or no access") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    headers = {"Cache-Control": "no-store"}
    filename = f"examen-{study_uid[-12:]}.zip"
    if result.deidentified_export is not None:
        headers["X-Simral-Deidentified-Export"] = str(result.deidentified_export)
        filename = f"deidentified-{result.deidentified_export}.zip"
    return FileResponse(
        result.path,
        media_type="application/zip",
        filename=filename,
        headers=headers,
        background=BackgroundTask(target.unlink, missing_ok=True),
    )
