"""The HTTP service (ASGI). The archive core exposes health and a status summary."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import func, select

from simral import __version__
from simral.archive.api import mount_archive_api
from simral.archive.models import Instance, Patient, Series, Study
from simral.context import AppContext
from simral.dicomweb.api import mount_dicomweb
from simral.dicomweb.wado_uri import mount_wado_uri
from simral.dicomweb.workitems import mount_workitems
from simral.fhir.api import mount_fhir
from simral.lifecycle.api import mount_lifecycle_api
from simral.sharing.api import mount_sharing_api
from simral.web.admin import mount_admin
from simral.web.auth import install_auth_handlers, request_principal
from simral.web.dashboard import mount_dashboard
from simral.web.dmp import mount_dmp
from simral.web.drimm import mount_drimm
from simral.web.jobs_admin import mount_jobs_admin
from simral.web.media_import import mount_media_import
from simral.web.observability import mount_observability
from simral.web.oidc_login import mount_oidc_login
from simral.web.oncall import mount_oncall
from simral.web.pages import mount_pages
from simral.web.portal import mount_portal
from simral.web.reading import mount_reading
from simral.web.report_documents import mount_report_documents
from simral.web.reports import mount_reports
from simral.web.requests import mount_requests
from simral.web.retention_admin import mount_retention_admin
from simral.web.route_rules import install_openapi_security
from simral.web.security_headers import SecurityHeaders
from simral.web.shares import mount_patient_pages, mount_shares
from simral.web.viewer import mount_viewer
from simral.web.vigilance import mount_vigilance


def create_web_app(ctx: AppContext) -> FastAPI:
    """Build the ASGI application bound to ``ctx``."""
    web = FastAPI(title="simral", version=__version__)
    install_auth_handlers(web, ctx)
    web.add_middleware(SecurityHeaders, https=ctx.settings.https, hsts_max_age=ctx.settings.hsts_max_age)

    mount_observability(web, ctx)  # /healthz, /readyz, /metrics, /admin/metrics

    @web.get("/api/status")
    def status(request: Request) -> dict[str, Any]:
        """Counts of the archive's content (for logged-in users and token holders)."""
        request_principal(request)
        with ctx.db.reading() as session:
            counts = {
                name: session.scalar(select(func.count()).select_from(model))
                for name, model in (
                    ("patients", Patient),
                    ("studies", Study),
                    ("series", Series),
                    ("instances", Instance),
                )
            }
        return {"version": __version__, "ae_title": ctx.settings.ae_title, **counts}

    mount_archive_api(web, ctx)
    mount_lifecycle_api(web, ctx)
    mount_dicomweb(web, ctx)
    mount_wado_uri(web, ctx)
    mount_workitems(web, ctx)
    mount_pages(web, ctx)
    mount_portal(web, ctx)
    mount_admin(web, ctx)
    mount_jobs_admin(web, ctx)
    mount_retention_admin(web, ctx)
    mount_sharing_api(web, ctx)
    mount_shares(web, ctx)
    mount_patient_pages(web, ctx)
    mount_oidc_login(web, ctx)
    mount_viewer(web, ctx)
    mount_drimm(web, ctx)
    mount_media_import(web, ctx)
    mount_dashboard(web, ctx)
    mount_report_documents(web, ctx)
    mount_vigilance(web, ctx)
    mount_fhir(web, ctx)
    mount_requests(web, ctx)
    mount_dmp(web, ctx)  # /dmp: the site's DMP publications
    mount_reports(web, ctx)  # before mount_reading: its /reading/tasks/{id}/{action} would match
    mount_oncall(web, ctx)  # /reading/oncall: the groups' on-call schedule
    mount_reading(web, ctx)
    install_openapi_security(web)
    return web
