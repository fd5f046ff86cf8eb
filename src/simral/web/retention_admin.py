"""The retention page of the administration: reviewed deletion of records past their term.

CSP R.1112-7 (DESIGN.md §9): a review lists the studies past their retention date that no legal
hold covers into a deletion batch; an administrator reads the batch (patients, dates, exams) and
approves it, which queues the deletions, or rejects it. Site administrators see and decide the
batches and the legal holds concerning their organisations' records, regional administrators all
of them; the lifecycle service decides what each may see, checks every right again and audits each
step; forms carry the CSRF token.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from html import escape
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from simral.access.policy import AccessDenied, Principal
from simral.context import AppContext
from simral.lifecycle import service as lifecycle
from simral.lifecycle.models import BATCH_PROPOSED, SCOPE_REJECTED
from simral.web.admin import managed_organisations
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import (
    Language,
    csrf_field,
    display_date,
    lang_param,
    page,
    post_button,
    request_language,
    table,
    text_rows,
)
from simral.web.params import RowId

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Conservation des dossiers (CSP R.1112-7)",
        "batch_title": "Lot de suppression n° {id}",
        "intro": "Les examens dont la durée de conservation est échue et qu'aucun gel juridique ne "
        "couvre sont proposés en lots. Rien n'est supprimé sans validation.",
        "batches": "Lots de suppression",
        "review": "Lancer une revue",
        "scope": "Périmètre",
        "region": "toute la région",
        "nothing_due": "Aucun examen n'a dépassé sa durée de conservation.",
        "proposed_batch": "Lot n° {id} proposé : à examiner puis valider.",
        "id": "N°",
        "organisation": "Organisation",
        "state": "État",
        "reviewed_on": "Revue du",
        "by": "Proposé par",
        "approved_by": "Validé par",
        "items": "Éléments",
        "open": "Examiner",
        "holds": "Gels juridiques en cours",
        "target": "Objet",
        "patient": "Patient",
        "reason": "Motif",
        "since": "Depuis (UTC)",
        "study": "Examen",
        "patient_id": "IPP",
        "date": "Date",
        "description": "Description",
        "modalities": "Modalités",
        "instances": "Instances",
        "what": "Suppression",
        "until": "Conservé jusqu'au",
        "detail": "Détail",
        "whole_study": "examen entier",
        "rejected": "instances rejetées (durée échue)",
        "approve": "Valider la suppression",
        "cancel": "Rejeter le lot",
        "approved_note": "Lot validé : {jobs} suppression(s) mise(s) en file.",
        "none": "aucun",
        "back": "Retour à la liste des lots",
        "denied": "Réservé aux administrateurs.",
        "not_found": "Lot inconnu, ou hors de votre périmètre.",
        "proposed": "à valider",
        "approved": "validé",
        "cancelled": "rejeté",
        "pending": "en attente",
        "purging": "en cours",
        "deleted": "supprimé",
        "refused": "refusé",
    },
    "en": {
        "title": "Record retention (CSP R.1112-7)",
        "batch_title": "Deletion batch no. {id}",
        "intro": "Studies past their retention date that no legal hold covers are proposed in "
        "batches. Nothing is deleted until a batch is approved.",
        "batches": "Deletion batches",
        "review": "Run a review",
        "scope": "Scope",
        "region": "the whole region",
        "nothing_due": "No study is past its retention date.",
        "proposed_batch": "Batch no. {id} proposed: read it, then approve it.",
        "id": "No.",
        "organisation": "Organisation",
        "state": "State",
        "reviewed_on": "Reviewed on",
        "by": "Proposed by",
        "approved_by": "Approved by",
        "items": "Items",
        "open": "Open",
        "holds": "Legal holds in force",
        "target": "Target",
        "patient": "Patient",
        "reason": "Reason",
        "since": "Since (UTC)",
        "study": "Study",
        "patient_id": "Patient ID",
        "date": "Date",
        "description": "Description",
        "modalities": "Modalities",
        "instances": "Instances",
        "what": "Deletes",
        "until": "Kept until",
        "detail": "Detail",
        "whole_study": "whole study",
        "rejected": "rejected instances (term expired)",
        "approve": "Approve the deletion",
        "cancel": "Reject the batch",
        "approved_note": "Batch approved: {jobs} deletion(s) queued.",
        "none": "none",
        "back": "Back to the batches",
        "denied": "Administrators only.",
        "not_found": "No such batch, or not yours to see.",
        "proposed": "to approve",
        "approved": "approved",
        "cancelled": "rejected",
        "pending": "pending",
        "purging": "running",
        "deleted": "deleted",
        "refused": "refused",
    },
}


def _with_lang(request: Request, path: str, **params: str) -> str:
    query = {**params, **({"lang": lang_param(request)} if lang_param(request) else {})}
    return path + (f"?{urlencode(query)}" if query else "")


def _administrator(request: Request) -> tuple[Principal, Language, HTMLResponse | None]:
    """The caller, the page language, and a 403 page unless the caller administers something."""
    principal = request_principal(request)
    language = request_language(request)
    managed = managed_organisations(principal)
    if managed is not None and not managed:
        text = TEXT[language]
        body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
        return principal, language, page(request, text["title"], body, principal=principal, status=403)
    return principal, language, None


def mount_retention_admin(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/admin/retention``, a batch's page and the review, approve and reject forms to ``web``."""

    @web.get("/admin/retention", response_class=HTMLResponse)
    def retention_page(request: Request, notice: str = "", batch: int = 0) -> HTMLResponse:
        principal, language, refused = _administrator(request)
        if refused is not None:
            return refused
        text = TEXT[language]
        managed = managed_organisations(principal)
        with ctx.db.reading() as session:
            batches = lifecycle.list_batches(session, principal=principal)
            holds = lifecycle.list_holds(session, principal)
        body = f"<p>{escape(text['intro'])}</p>"
        if notice == "nothing":
            body += f'<p class="notice" role="status">{escape(text["nothing_due"])}</p>'
        elif notice == "proposed" and batch:
            body += f'<p class="notice" role="status">{escape(text["proposed_batch"].format(id=batch))}</p>'
        scopes = [("", text["region"])] if managed is None else []
        scopes += [(code, code) for code in sorted(managed or [])]
        options = "".join(f'<option value="{escape(v)}">{escape(label)}</option>' for v, label in scopes)
        body += (
            f'<form method="post" action="{escape(_with_lang(request, "/admin/retention/review"))}">'
            f"{csrf_field(request)}"
            f'<label>{escape(text["scope"])}<select name="organisation">{options}</select></label>'
            f'<button type="submit">{escape(text["review"])}</button></form>'
        )
        lines = []
        for row in batches:
            link = _with_lang(request, f"/admin/retention/batches/{row.id}")
            counts = ", ".join(f"{text.get(state, state)} {n}" for state, n in sorted(row.items.items()))
            cells = [
                str(row.id),
                row.organisation_code or text["region"],
                text.get(row.state, row.state),
                display_date(row.reviewed_on.replace("-", ""), language),
                row.created_by,
                row.approved_by,
                counts,
            ]
            lines.append(
                f'<tr data-batch="{row.id}">'
                + "".join(f"<td>{escape(c)}</td>" for c in cells)
                + f'<td><a href="{escape(link)}">{escape(text["open"])}</a></td></tr>'
            )
        columns = ("id", "organisation", "state", "reviewed_on", "by", "approved_by", "items", "open")
        body += f"<h2>{escape(text['batches'])}</h2>" + table([text[c] for c in columns], lines)
        body += f"<h2>{escape(text['holds'])}</h2>" + table(
            [text["id"], text["target"], text["patient"], text["reason"], text["by"], text["since"]],
            text_rows(
                [
                    [
                        str(h.id),
                        h.study_uid or h.target,
                        h.patient,
                        h.reason,
                        h.created_by,
                        h.created_at.strftime("%Y-%m-%d %H:%M"),
                    ]
                    for h in holds
                ]
            ),
        )
        return page(request, text["title"], body, principal=principal)

    @web.get("/admin/retention/batches/{batch_id}", response_class=HTMLResponse)
    def batch_page(request: Request, batch_id: RowId, jobs: int = -1) -> HTMLResponse:
        principal, language, refused = _administrator(request)
        if refused is not None:
            return refused
        text = TEXT[language]
        try:
            with ctx.db.unit_of_work() as session:  # reading the lines is audited
                summary = lifecycle.batch_summary(session, batch_id, principal=principal)
                lines = lifecycle.review_lines(session, batch_id, principal=principal)
        except (lifecycle.LifecycleError, AccessDenied):
            summary, lines = None, []
        title = text["batch_title"].format(id=batch_id)
        back_link = escape(_with_lang(request, "/admin/retention"))
        back = f'<p><a href="{back_link}">{escape(text["back"])}</a></p>'
        if summary is None:
            body = f'<p class="error" role="alert">{escape(text["not_found"])}</p>' + back
            return page(request, title, body, principal=principal, status=404)
        body = back
        if jobs >= 0:
            body += f'<p class="notice" role="status">{escape(text["approved_note"].format(jobs=jobs))}</p>'
        reviewed_on = display_date(summary.reviewed_on.replace("-", ""), language)
        sep = " : " if language == "fr" else ": "
        body += (
            f"<p>{escape(text['organisation'])}{sep}{escape(summary.organisation_code or text['region'])}"
            f" — {escape(text['state'])}{sep}{escape(text.get(summary.state, summary.state))}"
            f" — {escape(text['reviewed_on'])} {escape(reviewed_on)}"
            f" — {escape(text['by'])} {escape(summary.created_by)}</p>"
        )
        rows = [
            [
                line.patient_name.replace("^", " ").strip(),
                line.patient_id,
                display_date(line.study_date, language),
                line.description,
                line.modalities,
                str(line.instances),
                text["rejected"] if line.item.scope == SCOPE_REJECTED else text["whole_study"],
                display_date(line.item.retention_until.replace("-", ""), language),
                text.get(line.item.state, line.item.state),
                line.item.detail,
                line.item.study_uid,
            ]
            for line in lines
        ]
        columns = (
            "patient",
            "patient_id",
            "date",
            "description",
            "modalities",
            "instances",
            "what",
            "until",
            "state",
            "detail",
            "study",
        )
        body += table([text[c] for c in columns], text_rows(rows))
        if summary.state == BATCH_PROPOSED:
            base = f"/admin/retention/batches/{batch_id}"
            body += (
                "<p>"
                + post_button(request, _with_lang(request, f"{base}/approve"), text["approve"], css="primary")
                + post_button(request, _with_lang(request, f"{base}/cancel"), text["cancel"])
                + "</p>"
            )
        return page(request, title, body, principal=principal)

    @web.post("/admin/retention/review")
    async def review(request: Request) -> Response:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        organisation = str(form.get("organisation", ""))
        try:
            with ctx.db.unit_of_work() as session:
                batch = lifecycle.review(
                    session, principal=principal, today=date.today(), organisation=organisation
                )
                batch_id = batch.id if batch is not None else 0
        except AccessDenied:
            raise HTTPException(403, "not an administrator of this scope") from None
        if not batch_id:
            target = _with_lang(request, "/admin/retention", notice="nothing")
        else:
            target = _with_lang(request, "/admin/retention", notice="proposed", batch=str(batch_id))
        return RedirectResponse(target, status_code=303)

    @web.post("/admin/retention/batches/{batch_id}/{verb}")
    async def decide(request: Request, batch_id: RowId, verb: str) -> Response:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        if verb not in ("approve", "cancel"):
            raise HTTPException(404)
        queued = -1
        try:
            with ctx.db.unit_of_work() as session:
                if verb == "approve":
                    queued = len(lifecycle.approve(session, batch_id, principal=principal))
                else:
                    lifecycle.cancel(session, batch_id, principal=principal)
        except AccessDenied:
            raise HTTPException(404, "no such deletion batch, or no access") from None
        except lifecycle.LifecycleError as exc:
            raise HTTPException(409, str(exc)) from None
        params = {"jobs": str(queued)} if queued >= 0 else {}
        return RedirectResponse(
            _with_lang(request, f"/admin/retention/batches/{batch_id}", **params), status_code=303
        )
