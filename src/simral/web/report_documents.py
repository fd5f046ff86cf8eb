"""A signed report's documents for the people who may read it (ANS flux 5: the requesting site
receives the report): the PDF, taken from the DICOM Encapsulated PDF stored in the study, and the
CDA R2 CR-IMG document that went to the RIS. Every download is audited."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydicom import dcmread

from simral.access.policy import AccessDenied
from simral.archive.service import audit_reads, get_instance, open_blob
from simral.audit import service as audit
from simral.context import AppContext
from simral.reading import reports
from simral.reading.models import PUBLICATION_DONE, REPORT_SIGNED
from simral.reading.pdf import pdf_of_instance
from simral.web.auth import request_principal
from simral.web.params import RowId


def _not_found() -> Response:
    return JSONResponse({"error": "no such document"}, status_code=404)


def mount_report_documents(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /reports/{id}/report.pdf`` and ``GET /reports/{id}/report.xml`` to ``web``."""

    def published(request: Request, report_id: int) -> tuple[dict[str, object], int, str] | None:
        principal = request_principal(request)
        try:
            with ctx.db.unit_of_work() as session:
                report = reports.get_for(session, report_id, principal)
                if report.state != REPORT_SIGNED or report.publication_state != PUBLICATION_DONE:
                    return None
                audit.record(
                    session,
                    action="report.read",
                    principal=principal,
                    study_uid=report.study_uid,
                    detail={"report": report.id, "version": report.version, "document": request.url.path},
                )
                return dict(report.published or {}), report.version, report.study_uid
        except (reports.ReportError, AccessDenied):
            return None

    @web.get("/reports/{report_id}/report.pdf")
    def report_pdf(request: Request, report_id: RowId) -> Response:
        found = published(request, report_id)
        if found is None:
            return _not_found()
        facts, version, study_uid = found
        principal = request_principal(request)
        with ctx.db.reading() as session:
            instance = get_instance(
                session, principal=principal, sop_uid=str(facts.get("sop_instance_uid", ""))
            )
        if instance is None:
            return _not_found()
        with open_blob(ctx, instance.blob_key) as stream:
            pdf = pdf_of_instance(dcmread(stream))
        audit_reads(ctx, principal, [study_uid], detail={"protocol": "portal report PDF"})
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="compte-rendu-v{version}.pdf"'},
        )

    @web.get("/reports/{report_id}/report.xml")
    def report_cda(request: Request, report_id: RowId) -> Response:
        found = published(request, report_id)
        if found is None or not found[0].get("cda"):
            return _not_found()
        facts, version, _study = found
        return Response(
            str(facts["cda"]).encode("utf-8"),
            media_type="application/xml",
            headers={"Content-Disposition": f'attachment; filename="compte-rendu-v{version}-cda.xml"'},
        )
