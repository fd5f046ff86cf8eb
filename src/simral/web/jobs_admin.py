"""The exchange page of the administration: routing rules and the job queue, with retry and cancel.

Regional administrators only (jobs and rules are platform-wide); the jobs service checks the right
again and audits every retry and cancellation. Forms carry the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from simral.access.policy import AccessDenied, may_manage
from simral.context import AppContext
from simral.jobs import service as jobs
from simral.jobs.models import STATES
from simral.sharing import service as sharing
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import Language, lang_param, page, post_button, request_language, table, text_rows
from simral.web.params import RowId

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Échanges : règles de routage et file des transferts",
        "rules": "Règles de routage",
        "jobs": "Transferts",
        "name": "Nom",
        "criteria": "Critères",
        "destination": "Destination",
        "id": "N°",
        "kind": "Type",
        "state": "État",
        "tries": "Essais",
        "instance": "Instance",
        "next": "Prochain essai (UTC)",
        "error": "Dernière erreur",
        "actions": "Actions",
        "retry": "Relancer",
        "cancel": "Annuler",
        "all": "Tous",
        "filter": "Filtrer",
        "totals": "Totaux",
        "denied": "Réservé aux administrateurs régionaux.",
        "queued": "en attente",
        "running": "en cours",
        "done": "terminé",
        "dead": "en échec définitif",
        "cancelled": "annulé",
    },
    "en": {
        "title": "Exchange: routing rules and the transfer queue",
        "rules": "Routing rules",
        "jobs": "Transfers",
        "name": "Name",
        "criteria": "Criteria",
        "destination": "Destination",
        "id": "No.",
        "kind": "Kind",
        "state": "State",
        "tries": "Tries",
        "instance": "Instance",
        "next": "Next try (UTC)",
        "error": "Last error",
        "actions": "Actions",
        "retry": "Retry",
        "cancel": "Cancel",
        "all": "All",
        "filter": "Filter",
        "totals": "Totals",
        "denied": "Regional administrators only.",
        "queued": "queued",
        "running": "running",
        "done": "done",
        "dead": "dead",
        "cancelled": "cancelled",
    },
}


def _action(request: Request, job_id: int, verb: str, label: str) -> str:
    return post_button(request, f"/admin/jobs/{job_id}/{verb}", label, aria_label=f"{label} {job_id}")


def mount_jobs_admin(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/admin/jobs`` and its retry/cancel forms to ``web``."""

    @web.get("/admin/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, state: str = "") -> HTMLResponse:
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        if not may_manage(principal):
            body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
            return page(request, text["title"], body, principal=principal, status=403)
        state = state if state in STATES else ""
        with ctx.db.reading() as session:
            rules = sharing.list_rules(session)
            rows = jobs.list_jobs(session, state=state, limit=200)
            totals = jobs.counts(session)
        rule_rows = [
            [
                rule.name,
                ", ".join(
                    f"{label}={value}"
                    for label, value in (
                        ("organisation", rule.source_organisation),
                        ("AE", rule.source),
                        ("modality", rule.modality),
                        ("description", rule.study_description),
                    )
                    if value
                )
                or "*",
                (
                    f"{rule.destination_node} (C-STORE)"
                    if rule.destination_node
                    else f"{rule.destination_dicomweb} (STOW-RS)"
                ),
            ]
            for rule in rules
        ]
        body = f"<h2>{escape(text['rules'])}</h2>" + table(
            [text["name"], text["criteria"], text["destination"]], text_rows(rule_rows)
        )
        options = "".join(
            f'<option value="{s}"{" selected" if s == state else ""}>{escape(text[s])}</option>'
            for s in STATES
        )
        lang = lang_param(request)
        body += (
            f"<h2>{escape(text['jobs'])}</h2>"
            f"<p>{escape(text['totals'])}{' : ' if request_language(request) == 'fr' else ': '}"
            + ", ".join(f"{escape(text[s])} {totals.get(s, 0)}" for s in STATES)
            + "</p>"
            '<form method="get" action="/admin/jobs">'
            + (f'<input type="hidden" name="lang" value="{lang}">' if lang else "")
            + f'<label>{escape(text["state"])}<select name="state">'
            f'<option value="">{escape(text["all"])}</option>{options}</select></label>'
            f'<button type="submit">{escape(text["filter"])}</button></form>'
        )
        lines = []
        for job in rows:
            actions = ""
            if job.state in ("dead", "cancelled"):
                actions += _action(request, job.id, "retry", text["retry"])
            if job.state in ("queued", "dead"):
                actions += _action(request, job.id, "cancel", text["cancel"])
            cells = [
                str(job.id),
                job.kind,
                str(job.payload.get("destination", "")),
                str(job.payload.get("sop_uid", "")),
                text.get(job.state, job.state),
                f"{job.attempts}/{job.max_attempts}",
                job.run_after.strftime("%Y-%m-%d %H:%M:%S") if job.state == "queued" else "",
                job.last_error[:200],
            ]
            lines.append(
                f'<tr data-job="{job.id}">'
                + "".join(f"<td>{escape(c)}</td>" for c in cells)
                + f"<td>{actions}</td></tr>"
            )
        columns = ("id", "kind", "destination", "instance", "state", "tries", "next", "error", "actions")
        body += table([text[k] for k in columns], lines)
        return page(request, text["title"], body, principal=principal)

    @web.post("/admin/jobs/{job_id}/{verb}")
    async def job_action(request: Request, job_id: RowId, verb: str) -> Response:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        if verb not in ("retry", "cancel"):
            raise HTTPException(404)
        operation = jobs.retry if verb == "retry" else jobs.cancel
        try:
            with ctx.db.unit_of_work() as session:
                operation(session, job_id, principal=principal)
        except AccessDenied:
            raise HTTPException(403, "regional administrators only") from None
        except jobs.JobError as exc:
            raise HTTPException(409, str(exc)) from None
        query = urlencode({"lang": lang_param(request)}) if lang_param(request) else ""
        return RedirectResponse("/admin/jobs" + (f"?{query}" if query else ""), status_code=303)
