"""WADO-URI (PS3.18 §9): ``/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from simral.archive.service import audit_reads, find_instances, with_shown_identities
from simral.context import AppContext
from simral.dicom.frames import FrameError
from simral.dicom.render import NotAcceptable as RenderNotAcceptable
from simral.dicom.render import RenderError, RenderParams
from simral.dicom.transcode import can_transcode
from simral.dicomweb import wado
from simral.dicomweb.media import DEFAULT_SYNTAX
from simral.web.auth import request_principal

RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def mount_wado_uri(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /wado`` to ``web``."""

    @web.get("/wado")
    def wado_uri(request: Request) -> Response:
        principal = request_principal(request)
        q = request.query_params
        if q.get("requestType") != "WADO":
            return _error(400, "requestType must be WADO")
        study, series, sop = q.get("studyUID"), q.get("seriesUID"), q.get("objectUID")
        if not (study and series and sop):
            return _error(400, "studyUID, seriesUID and objectUID are required")
        if q.get("anonymize") == "yes":
            return _error(400, "anonymize is not supported")
        with ctx.db.reading() as session:
            found = with_shown_identities(
                session,
                principal,
                find_instances(session, principal=principal, study_uid=study, series_uid=series, sop_uid=sop),
            )
        audit_reads(
            ctx,
            principal,
            [study[:64]],
            outcome="success" if found else "failure",
            detail={"protocol": "WADO-URI"},
        )
        if not found:
            return _error(404, "no such object")
        instance = found[0]
        wanted = [t.split(";")[0].strip().lower() for t in q.get("contentType", "").split(",") if t.strip()]
        if not wanted:
            wanted = ["image/jpeg"] if instance.frame_count else ["application/dicom"]
        for media_type in wanted:
            if media_type in {"application/dicom", "*/*"}:
                syntax = q.get("transferSyntax") or DEFAULT_SYNTAX
                target = instance.transfer_syntax_uid if syntax == "*" else syntax
                if not can_transcode(instance.transfer_syntax_uid, target):
                    continue
                if instance.shown_patient is not None:
                    return Response(wado.coerced(ctx, instance, target), media_type="application/dicom")
                if target == instance.transfer_syntax_uid:
                    body = wado.blob_chunks(ctx, instance.blob_key)
                    return StreamingResponse(
                        body, media_type="application/dicom", headers={"Content-Length": str(instance.size)}
                    )
                return Response(wado.transcoded(ctx, instance, target), media_type="application/dicom")
            if media_type in RENDERED_TYPES and instance.frame_count:
                return _rendered(request, ctx, instance.blob_key, instance.frame_count, media_type)
        return _error(406, f"object not available as {', '.join(wanted)}")


def _rendered(request: Request, ctx: AppContext, key: str, frames: int, media_type: str) -> Response:
    q = request.query_params
    query: dict[str, str] = {}
    if q.get("windowCenter") and q.get("windowWidth"):
        query["window"] = f"{q['windowCenter']},{q['windowWidth']},linear"
    rows, columns = q.get("rows"), q.get("columns")
    if rows or columns:
        query["viewport"] = f"{columns or 8192},{rows or 8192}"  # the other side follows the aspect ratio
    if q.get("imageQuality"):
        query["quality"] = q["imageQuality"]
    try:
        frame = int(q.get("frameNumber", "1"))
        params = RenderParams.from_query(query, media_type, thumbnail=False)
    except ValueError as exc:
        return _error(400, str(exc))
    except RenderNotAcceptable as exc:
        return _error(406, str(exc))
    if not 1 <= frame <= frames:
        return _error(404, f"the object has {frames} frame(s)")
    try:
        return Response(wado.render(ctx, key, frame, params), media_type=params.media_type)
    except (FrameError, RenderError) as exc:
        return _error(400, str(exc))
