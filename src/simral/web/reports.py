"""Writing and signing reports (DESIGN.md §7, issue 6 item 5): ``/reading/tasks/{id}/report``.

The radiologist holding a task sees the request's clinical information, opens the study in the
viewer (new tab), starts the report from a template of the exam type, writes the four sections
(and the dose of ionising exams) with autosave (``/static/report-autosave.js`` posts the form to
``/api/reports/{id}/draft`` every few seconds and when a field loses focus: the CSP forbids inline
scripts), signs with a TOTP code, then reads the signed report (versions, publication) and adds an
addendum. The holder may ask another radiologist of the group for an opinion (télé-expertise);
the one asked answers on the same page. The same operations answer JSON under ``/api/``. The
report service checks every right and writes the audit records.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from simral.access.policy import AccessDenied, Principal, may_review_requests
from simral.context import AppContext
from simral.db.base import as_utc
from simral.identity.models import Organisation
from simral.reading import reports
from simral.reading import tasks as reading_tasks
from simral.reading.models import (
    PRIORITY_URGENT,
    PUBLICATION_DONE,
    PUBLICATION_FAILED,
    REPORT_DRAFT,
    TASK_CLAIMED,
    ImagingRequest,
    ReadingTask,
    Report,
    SecondOpinion,
)
from simral.reading.templates import TEMPLATES, is_ionising, suggest
from simral.reading.worklist import local_timezone
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import Language, csrf_field, explicit_language, page, post_button, request_language
from simral.web.params import RowId

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Compte rendu",
        "patient": "Patient",
        "exam": "Examen",
        "site": "Site demandeur",
        "priority": "Priorité",
        "urgent": "Urgent",
        "routine": "Standard",
        "clinical": "Renseignements cliniques",
        "justification": "Motif de la demande",
        "history": "Antécédents",
        "purpose": "Question posée",
        "protocol": "Protocole",
        "none": "Non renseigné",
        "viewer": "Ouvrir l'examen dans la visionneuse (nouvel onglet)",
        "back": "Retour à la liste de lecture",
        "template": "Modèle de compte rendu",
        "start": "Rédiger à partir de ce modèle",
        "start_intro": "Choisissez le modèle de l'examen : la technique, les résultats et la conclusion "
        "sont pré-remplis, les indications reprennent la demande.",
        "not_holder": "Cet examen n'est pas pris par vous : prenez-le dans la liste de lecture pour rédiger.",
        "indications": "Indications",
        "technique": "Technique",
        "results": "Résultats",
        "conclusion": "Conclusion",
        "addendum": "Addendum",
        "dose": "Équipement et dose (examen irradiant)",
        "equipment": "Appareil",
        "ctdivol_mgy": "IDSV / CTDIvol (mGy)",
        "dlp_mgycm": "PDL (mGy·cm)",
        "dap_gycm2": "PDS (Gy·cm²)",
        "fluoro_seconds": "Durée de scopie (s)",
        "save": "Enregistrer le brouillon",
        "saved_at": "Brouillon enregistré à {time}",
        "save_failed": "Enregistrement impossible : vérifiez votre connexion.",
        "sign_legend": "Signature",
        "sign_help": "Pour signer, saisissez le code à 6 chiffres de votre application d'authentification.",
        "code": "Code de vérification",
        "sign": "Signer le compte rendu",
        "sign_addendum": "Signer l'addendum",
        "bad_code": "Code de vérification refusé : le compte rendu n'est pas signé.",
        "locked": "Trop d'échecs : votre compte est verrouillé pour quelques minutes.",
        "signed": "Compte rendu signé : sa publication est en cours.",
        "signed_by": "Signé par {who} le {when} ({method})",
        "draft_by": "Brouillon en cours de rédaction par {who}.",
        "version": "Version",
        "state": "État",
        "author": "Auteur",
        "signed_at": "Signé le",
        "publication": "Publication",
        "history_title": "Historique des versions",
        "state_draft": "Brouillon",
        "state_signed": "Signé",
        "pub_pending": "En cours",
        "pub_done": "Publié",
        "pub_failed": "Échec",
        "add_addendum": "Ajouter un addendum",
        "addendum_intro": "L'addendum complète la version signée, qui reste inchangée. "
        "Rédigez ce qu'il ajoute.",
        "opinions": "Avis d'un confrère (télé-expertise)",
        "ask": "Demander un avis",
        "ask_to": "Radiologue sollicité",
        "question": "Question",
        "answer": "Réponse",
        "give_answer": "Envoyer l'avis",
        "asked": "Avis demandé à {who} le {when}",
        "answered": "Réponse du {when}",
        "waiting_answer": "En attente de réponse.",
        "no_colleague": "Aucun autre radiologue dans le groupe.",
        "opinion_sent": "Demande d'avis envoyée.",
        "answer_sent": "Avis envoyé.",
        "error": "Impossible : {reason}",
        "denied": "Cette page est réservée aux radiologues du groupe de lecture de l'examen.",
        "publication_state": "Publication : {state}",
        "method_totp": "code TOTP",
        "method_psc": "Pro Santé Connect",
        "suggested": "(suggéré)",
        "mine_title": "Mes comptes rendus",
        "mine_intro": "Vos comptes rendus pour {group}, les plus récents d'abord (dernière version).",
        "mine_none": "Vous n'avez pas encore rédigé de compte rendu pour ce groupe.",
        "updated": "Modifié le",
        "open_report": "Voir",
        "actions": "Actions",
        "open_report_label": "Voir le compte rendu de {patient}",
    },
    "en": {
        "title": "Report",
        "patient": "Patient",
        "exam": "Study",
        "site": "Requesting site",
        "priority": "Priority",
        "urgent": "Urgent",
        "routine": "Routine",
        "clinical": "Clinical information",
        "justification": "Reason for the request",
        "history": "History",
        "purpose": "Clinical question",
        "protocol": "Protocol",
        "none": "Not given",
        "viewer": "Open the study in the viewer (new tab)",
        "back": "Back to the reading worklist",
        "template": "Report template",
        "start": "Write from this template",
        "start_intro": "Choose the exam's template: technique, findings and conclusion are pre-filled, "
        "the indications come from the request.",
        "not_holder": "You do not hold this study: claim it on the reading worklist to write its report.",
        "indications": "Indications",
        "technique": "Technique",
        "results": "Findings",
        "conclusion": "Conclusion",
        "addendum": "Addendum",
        "dose": "Equipment and dose (ionising exam)",
        "equipment": "Equipment",
        "ctdivol_mgy": "CTDIvol (mGy)",
        "dlp_mgycm": "DLP (mGy·cm)",
        "dap_gycm2": "DAP (Gy·cm²)",
        "fluoro_seconds": "Fluoroscopy time (s)",
        "save": "Save the draft",
        "saved_at": "Draft saved at {time}",
        "save_failed": "Could not save: check your connection.",
        "sign_legend": "Signature",
        "sign_help": "To sign, type the 6-digit code of your authenticator app.",
        "code": "Verification code",
        "sign": "Sign the report",
        "sign_addendum": "Sign the addendum",
        "bad_code": "Verification code refused: the report is not signed.",
        "locked": "Too many failures: your account is locked for a few minutes.",
        "signed": "Report signed: it is being published.",
        "signed_by": "Signed by {who} on {when} ({method})",
        "draft_by": "Draft being written by {who}.",
        "version": "Version",
        "state": "State",
        "author": "Author",
        "signed_at": "Signed on",
        "publication": "Publication",
        "history_title": "Version history",
        "state_draft": "Draft",
        "state_signed": "Signed",
        "pub_pending": "In progress",
        "pub_done": "Published",
        "pub_failed": "Failed",
        "add_addendum": "Add an addendum",
        "addendum_intro": "The addendum completes the signed version, which stays unchanged. "
        "Write what it adds.",
        "opinions": "Colleague's opinion (tele-expertise)",
        "ask": "Ask for an opinion",
        "ask_to": "Radiologist asked",
        "question": "Question",
        "answer": "Answer",
        "give_answer": "Send the opinion",
        "asked": "Opinion asked of {who} on {when}",
        "answered": "Answered on {when}",
        "waiting_answer": "Waiting for the answer.",
        "no_colleague": "No other radiologist in the group.",
        "opinion_sent": "Opinion request sent.",
        "answer_sent": "Opinion sent.",
        "error": "Not possible: {reason}",
        "denied": "This page is for the radiologists of the study's reading group.",
        "publication_state": "Publication: {state}",
        "method_totp": "TOTP code",
        "method_psc": "Pro Santé Connect",
        "suggested": "(suggested)",
        "mine_title": "My reports",
        "mine_intro": "Your reports for {group}, most recent first (latest version).",
        "mine_none": "You have not written any report for this group yet.",
        "updated": "Changed on",
        "open_report": "View",
        "actions": "Actions",
        "open_report_label": "View the report of {patient}",
    },
}

#: Messages shown after a redirect (``?done=``).
DONE = ("signed", "opinion_sent", "answer_sent")
#: The autosave script (served from the app: the CSP allows same-origin scripts only).
AUTOSAVE_JS = """\
(function () {
  "use strict";
  var form = document.querySelector("form[data-autosave]");
  if (!form) { return; }
  var status = document.getElementById("autosave-status");
  var token = form.querySelector("input[name=csrf_token]").value;
  var sections = ["indications", "technique", "results", "conclusion", "addendum"];
  var last = null;
  var busy = false;
  function body() {
    var data = {dose: {}};
    new FormData(form).forEach(function (value, key) {
      if (key.indexOf("dose_") === 0) { data.dose[key.slice(5)] = value; }
      else if (sections.indexOf(key) >= 0) { data[key] = value; }
    });
    if (!form.querySelector("[name^=dose_]")) { delete data.dose; }
    return JSON.stringify(data);
  }
  function save(force) {
    var payload = body();
    if (busy || (!force && payload === last)) { return; }
    busy = true;
    fetch(form.getAttribute("data-autosave"), {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": token},
      body: payload
    }).then(function (response) {
      if (!response.ok) { throw new Error(String(response.status)); }
      return response.json();
    }).then(function (answer) {
      last = payload;
      var technique = form.querySelector("textarea[name=technique]");
      if (technique && answer.technique !== undefined && document.activeElement !== technique
          && technique.value !== answer.technique) {
        technique.value = answer.technique;
        last = body();
      }
      status.textContent = status.getAttribute("data-saved").replace("{time}", answer.saved_at);
      status.className = "autosave saved";
    }).catch(function () {
      status.textContent = status.getAttribute("data-failed");
      status.className = "autosave failed";
    }).then(function () { busy = false; });
  }
  last = body();
  form.addEventListener("focusout", function () { save(false); });
  window.setInterval(function () { save(false); }, 4000);
})();
"""
#: Styles of the report page (the shared stylesheet is extended by :func:`report_style`).
STYLE = """
.report-columns{display:flex;gap:2rem;flex-wrap:wrap;align-items:flex-start}
.report-columns>section.clinical{flex:0 1 30rem;min-width:20rem}
.report-columns>section.writing{flex:1 1 40rem;min-width:20rem;max-width:60rem}
section.clinical dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;margin:0 0 1rem}
section.clinical dt{font-weight:600}section.clinical dd{margin:0;white-space:pre-line}
form.report{flex-direction:column;align-items:stretch;max-width:56rem}
form.report textarea{width:100%;box-sizing:border-box;min-height:7rem;font-family:inherit}
form.report fieldset{flex-wrap:wrap;align-items:end}
form.report fieldset.dose input{width:9rem}
form.report fieldset.dose label:first-of-type{flex-basis:100%}
form.report fieldset.dose input[name=dose_equipment]{width:100%;max-width:34rem;box-sizing:border-box}
#publication{margin:.5rem 0 1rem}
form.report fieldset.sign{flex-direction:column;align-items:flex-start;gap:.5rem}
form.report fieldset.sign input{width:8rem;letter-spacing:.2em}
.autosave{min-height:1.3rem;margin:0;color:#166534;font-size:.9rem}.autosave.failed{color:#b91c1c}
article.report{border:1px solid #cbd5e1;padding:.5rem 1.25rem;max-width:56rem;background:#fff}
article.report h3{font-size:1rem;margin:1rem 0 .25rem}article.report p{white-space:pre-line;margin:0}
article.report .signed{color:#374151;font-size:.9rem;margin-top:1rem}
article.addendum{border-left:4px solid #1d4ed8;margin-top:1rem}
table.history{width:auto;min-width:40rem;margin-bottom:1rem}
section.opinions{border-top:1px solid #cbd5e1;margin-top:1.5rem;max-width:56rem}
section.opinions textarea{width:36rem;max-width:85vw}
.opinion{border:1px solid #e5e7eb;padding:.5rem .75rem;margin-bottom:.75rem}
.opinion p{white-space:pre-line;margin:.25rem 0}
form.report .buttons{gap:1rem}
"""


def _local(value: datetime | None, language: Language, *, seconds: bool = False) -> str:
    moment = as_utc(value)
    if moment is None:
        return ""
    local = moment.astimezone(local_timezone())
    if seconds:
        return local.strftime("%H:%M:%S")
    return local.strftime("%d/%m/%Y %H:%M") if language == "fr" else local.strftime("%Y-%m-%d %H:%M")


def _iso(value: datetime | None) -> str | None:
    moment = as_utc(value)
    return moment.isoformat() if moment is not None else None


def report_json(report: Report) -> dict[str, Any]:
    """A report version as the JSON API gives it."""
    return {
        "id": report.id,
        "task_id": report.task_id,
        "study_uid": report.study_uid,
        "set_id": report.set_id,
        "version": report.version,
        "document_uid": report.document_uid,
        "previous_id": report.previous_id,
        "template": report.template,
        "state": report.state,
        **{name: getattr(report, name) for name in (*reports.SECTIONS, "addendum")},
        "dose": report.dose or {},
        "author": report.author,
        "author_name": report.author_name,
        "signed_at": _iso(report.signed_at),
        "signature_method": report.signature_method,
        "publication_state": report.publication_state,
        "updated_at": _iso(report.updated_at),
    }


def opinion_json(opinion: SecondOpinion) -> dict[str, Any]:
    """A second opinion as the JSON API gives it."""
    return {
        "id": opinion.id,
        "task_id": opinion.task_id,
        "requested_by": opinion.requested_by,
        "requested_of": opinion.requested_of,
        "question": opinion.question,
        "answer": opinion.answer,
        "state": opinion.state,
    }


def _error_status(exc: Exception) -> int:
    if isinstance(exc, AccessDenied):
        return 403
    if isinstance(exc, (reports.ReportError, reading_tasks.TaskError)):
        return 409 if exc.conflict else 400
    return 400


def mount_reports(web: FastAPI, ctx: AppContext) -> None:
    """Add the report pages and their JSON API to ``web``."""

    def _suffix(request: Request, **params: str) -> str:
        explicit = explicit_language(request)
        query = {**params, **({"lang": explicit} if explicit else {})}
        return ("?" + urlencode(query)) if query else ""

    @web.get("/static/report-autosave.js", include_in_schema=False)
    def autosave_script() -> Response:
        return Response(AUTOSAVE_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    @web.get("/static/report.css", include_in_schema=False)
    def report_stylesheet() -> Response:
        return Response(STYLE, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------------ rendering

    def _clinical(request: Request, task: ReadingTask, req: ImagingRequest | None, site: str) -> str:
        language = request_language(request)
        text = TEXT[language]
        patient = (req.patient if req is not None else None) or {}
        family = str(patient.get("used_name") or patient.get("birth_name") or "")
        given = str(patient.get("used_given_name") or patient.get("first_birth_given_name") or "")
        name = " ".join(p for p in (family.upper(), given) if p) or task.study_uid
        anatomy = " ".join(
            str(a.get("display") or a.get("code") or "") for a in (req.anatomy if req else []) or []
        )
        rows = [
            (text["patient"], name),
            (text["exam"], f"{task.modality} {anatomy}".strip()),
            (text["site"], site),
            (text["priority"], text["urgent"] if task.priority == PRIORITY_URGENT else text["routine"]),
        ]
        if req is not None:
            rows += [
                (text["justification"], req.justification),
                (text["history"], req.clinical_history),
                (text["purpose"], req.purpose),
                (text["protocol"], req.protocol),
            ]
        items = "".join(
            f"<dt>{escape(label)}</dt><dd>{escape(value) if value.strip() else escape(text['none'])}</dd>"
            for label, value in rows
        )
        viewer = f"/reading/tasks/{task.id}/viewer{_suffix(request)}"  # the study and its priors
        return (
            f'<section class="clinical" aria-labelledby="clinical-title">'
            f'<h2 id="clinical-title">{escape(text["clinical"])}</h2><dl>{items}</dl>'
            f'<p><a class="button" href="{escape(viewer)}" target="_blank" rel="noopener" id="open-viewer">'
            f"{escape(text['viewer'])}</a></p></section>"
        )

    def _start_form(request: Request, task: ReadingTask, req: ImagingRequest | None) -> str:
        language = request_language(request)
        text = TEXT[language]
        words = " ".join(str(a.get("display") or "") for a in (req.anatomy if req else []) or [])
        suggested = suggest(task.modality, words + " " + (req.purpose if req else ""))
        options = "".join(
            f'<option value="{escape(t.code)}"{" selected" if suggested is t else ""}>'
            f"{escape(t.title(language))}{' ' + escape(text['suggested']) if suggested is t else ''}</option>"
            for t in TEMPLATES
        )
        return (
            f"<p>{escape(text['start_intro'])}</p>"
            f'<form method="post" action="/reading/tasks/{task.id}/report{escape(_suffix(request))}">'
            f"{csrf_field(request)}<label>{escape(text['template'])}"
            f'<select name="template" id="template">{options}</select></label>'
            f'<button class="primary" type="submit">{escape(text["start"])}</button></form>'
        )

    def _sign_fieldset(request: Request, report: Report) -> str:
        text = TEXT[request_language(request)]
        label = text["sign_addendum"] if report.version > 1 else text["sign"]
        return (
            f'<fieldset class="sign"><legend>{escape(text["sign_legend"])}</legend>'
            f'<p class="hint" id="sign-help">{escape(text["sign_help"])}</p>'
            f'<label>{escape(text["code"])}<input name="code" id="totp-code" inputmode="numeric" '
            f'pattern="[0-9 ]*" maxlength="8" autocomplete="one-time-code" aria-describedby="sign-help">'
            f"</label>"
            f'<button class="primary" type="submit" formaction="/reports/{report.id}/sign'
            f'{escape(_suffix(request))}">{escape(label)}</button></fieldset>'
        )

    def _read_only(request: Request, report: Report, *, with_addendum: bool = True) -> str:
        language = request_language(request)
        text = TEXT[language]
        parts = [
            f'<h3>{escape(text[name])}</h3><p data-section="{name}">{escape(getattr(report, name))}</p>'
            for name in reports.SECTIONS
        ]
        return "".join(parts)

    def _signature_line(request: Request, report: Report) -> str:
        language = request_language(request)
        text = TEXT[language]
        method = text.get(f"method_{report.signature_method}", report.signature_method)
        return text["signed_by"].format(
            who=report.author_name or report.author, when=_local(report.signed_at, language), method=method
        )

    def _draft_form(request: Request, report: Report, modality: str) -> str:
        language = request_language(request)
        text = TEXT[language]
        fields = ""
        if report.version == 1:
            for name in reports.SECTIONS:
                fields += (
                    f'<label for="section-{name}">{escape(text[name])}</label>'
                    f'<textarea id="section-{name}" name="{name}" rows="{8 if name == "results" else 4}">'
                    f"{escape(getattr(report, name))}</textarea>"
                )
            if is_ionising(modality):
                dose = report.dose or {}
                inputs = "".join(
                    f'<label>{escape(text[key])}<input name="dose_{key}" '
                    f"{'' if key == 'equipment' else 'inputmode=decimal '}"
                    f'value="{escape(str(dose.get(key, "")))}"></label>'
                    for key in reports.DOSE_FIELDS
                )
                fields += f'<fieldset class="dose"><legend>{escape(text["dose"])}</legend>{inputs}</fieldset>'
        else:
            fields += (
                f"<p>{escape(text['addendum_intro'])}</p>"
                f'<label for="section-addendum">{escape(text["addendum"])}</label>'
                f'<textarea id="section-addendum" name="addendum" rows="6">'
                f"{escape(report.addendum)}</textarea>"
            )
        status = (
            f'<p id="autosave-status" class="autosave" role="status" aria-live="polite" '
            f'data-saved="{escape(text["saved_at"])}" data-failed="{escape(text["save_failed"])}"></p>'
        )
        return (
            f'<form class="report" method="post" '
            f'action="/reports/{report.id}/save{escape(_suffix(request))}" '
            f'data-autosave="/api/reports/{report.id}/draft">{csrf_field(request)}{fields}{status}'
            f'<div class="buttons"><button type="submit" class="secondary">'
            f"{escape(text['save'])}</button></div>"
            f"{_sign_fieldset(request, report)}</form>"
            '<script src="/static/report-autosave.js" defer></script>'
        )

    def _history(request: Request, versions: list[Report]) -> str:
        language = request_language(request)
        text = TEXT[language]
        rows = []
        for version in versions:
            publication = {
                "pending": text["pub_pending"],
                PUBLICATION_DONE: text["pub_done"],
                PUBLICATION_FAILED: text["pub_failed"],
            }.get(version.publication_state, "—")
            state = text["state_draft"] if version.state == REPORT_DRAFT else text["state_signed"]
            cells = (
                str(version.version),
                state,
                version.author_name or version.author,
                _local(version.signed_at, language) or "—",
                publication if version.state != REPORT_DRAFT else "—",
            )
            rows.append(
                f'<tr data-version="{version.version}">'
                + "".join(f"<td>{escape(c)}</td>" for c in cells)
                + "</tr>"
            )
        head = "".join(
            f'<th scope="col">{escape(text[k])}</th>'
            for k in ("version", "state", "author", "signed_at", "publication")
        )
        return (
            f'<h2 id="history-title">{escape(text["history_title"])}</h2>'
            f'<table class="history" aria-labelledby="history-title"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    def _signed_view(request: Request, principal: Principal, versions: list[Report]) -> str:
        language = request_language(request)
        text = TEXT[language]
        signed = [v for v in versions if v.state != REPORT_DRAFT]
        if not signed:
            return ""
        first = signed[0]
        body = f'<article class="report" aria-label="{escape(text["title"])}">{_read_only(request, first)}'
        body += f'<p class="signed">{escape(_signature_line(request, first))}</p></article>'
        for version in signed[1:]:
            body += (
                f'<article class="report addendum" data-version="{version.version}">'
                f"<h3>{escape(text['addendum'])} (v{version.version})</h3>"
                f'<p data-section="addendum">{escape(version.addendum)}</p>'
                f'<p class="signed">{escape(_signature_line(request, version))}</p></article>'
            )
        latest = signed[-1]
        state = {
            PUBLICATION_DONE: text["pub_done"],
            PUBLICATION_FAILED: text["pub_failed"],
        }.get(latest.publication_state, text["pub_pending"])
        body += (
            f'<p class="meta" id="publication">{escape(text["publication_state"].format(state=state))}</p>'
        )
        return body

    def _opinions(
        request: Request, principal: Principal, task: ReadingTask, opinions: list[SecondOpinion],
        colleagues: list[tuple[str, str]], names: dict[str, str],
    ) -> str:  # fmt: skip
        language = request_language(request)
        text = TEXT[language]
        body = (
            '<section class="opinions" aria-labelledby="opinions-title">'
            f'<h2 id="opinions-title">{escape(text["opinions"])}</h2>'
        )
        for opinion in opinions:
            asked = text["asked"].format(
                who=names.get(opinion.requested_of, opinion.requested_of),
                when=_local(opinion.created_at, language),
            )
            body += (
                f'<div class="opinion" data-opinion="{opinion.id}" data-state="{escape(opinion.state)}">'
                f'<p class="meta">{escape(asked)}</p>'
                f"<p><strong>{escape(text['question'])} :</strong> {escape(opinion.question)}</p>"
            )
            if opinion.state == reports.OPINION_ANSWERED:
                answered = text["answered"].format(when=_local(opinion.answered_at, language))
                body += (
                    f'<p class="meta">{escape(answered)}</p><p data-answer="{opinion.id}">'
                    f"<strong>{escape(text['answer'])} :</strong> {escape(opinion.answer)}</p>"
                )
            elif opinion.requested_of == principal.name:
                body += (
                    f'<form class="stack" method="post" '
                    f'action="/opinions/{opinion.id}/answer{escape(_suffix(request))}">'
                    f"{csrf_field(request)}<label>{escape(text['answer'])}"
                    f'<textarea name="answer" required></textarea></label>'
                    f'<button type="submit" class="primary">{escape(text["give_answer"])}</button></form>'
                )
            else:
                body += f'<p class="hint">{escape(text["waiting_answer"])}</p>'
            body += "</div>"
        if task.claimed_by == principal.name:
            others = [(login, name) for login, name in colleagues if login != principal.name]
            if others:
                options = "".join(
                    f'<option value="{escape(login)}">{escape(name)}</option>' for login, name in others
                )
                body += (
                    f'<form class="stack" method="post" '
                    f'action="/reading/tasks/{task.id}/opinions{escape(_suffix(request))}">'
                    f"{csrf_field(request)}<label>{escape(text['ask_to'])}"
                    f'<select name="requested_of">{options}</select></label>'
                    f'<label>{escape(text["question"])}<textarea name="question" required></textarea></label>'
                    f'<button type="submit">{escape(text["ask"])}</button></form>'
                )
            else:
                body += f'<p class="hint">{escape(text["no_colleague"])}</p>'
        return body + "</section>"

    def _report_page(
        request: Request,
        principal: Principal,
        task_id: int,
        *,
        message: str = "",
        error: str = "",
        status: int = 200,
    ) -> HTMLResponse:
        language = request_language(request)
        text = TEXT[language]
        with ctx.db.reading() as session:
            try:
                task = reading_tasks.get_or_raise(session, task_id)
            except reading_tasks.TaskError:
                task = None
            if task is None or not reports.may_open_task(session, task, principal):
                body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
                return page(request, text["title"], body, principal=principal, status=403 if task else 404)
            req = session.get(ImagingRequest, task.request_id) if task.request_id is not None else None
            site_name = (
                session.scalar(select(Organisation.name).where(Organisation.code == task.site_code))
                or task.site_code
            )
            latest = reports.latest_for_task(session, task.id)
            versions = reports.history(session, latest.set_id) if latest is not None else []
            opinions = reports.opinions_of_task(session, task.id)
            colleagues = reports.group_radiologists(session, task.group_code)
            names = dict(colleagues)
            clinical = _clinical(request, task, req, site_name)
            main = ""
            if message:
                main += f'<p class="message" role="status">{escape(message)}</p>'
            if error:
                main += f'<p class="error" role="alert">{escape(error)}</p>'
            if latest is None:
                if task.state == TASK_CLAIMED and task.claimed_by == principal.name:
                    main += _start_form(request, task, req)
                else:
                    main += f"<p>{escape(text['not_holder'])}</p>"
            else:
                main += _signed_view(request, principal, versions)
                if latest.state == REPORT_DRAFT:
                    if latest.author == principal.name:
                        main += _draft_form(request, latest, task.modality)
                    else:
                        who = names.get(latest.author, latest.author_name or latest.author)
                        main += f'<p class="hint">{escape(text["draft_by"].format(who=who))}</p>'
                else:
                    main += post_button(
                        request,
                        f"/reports/{latest.id}/addendum{_suffix(request)}",
                        text["add_addendum"],
                        css="primary",
                    )
                if any(v.state != REPORT_DRAFT for v in versions) or len(versions) > 1:
                    main += _history(request, versions)
            main += _opinions(request, principal, task, opinions, colleagues, names)
        body = (
            '<link rel="stylesheet" href="/static/report.css">'
            f'<p><a href="/reading{escape(_suffix(request))}">{escape(text["back"])}</a></p>'
            f'<div class="report-columns">{clinical}'
            f'<section class="writing" aria-label="{escape(text["title"])}">'
            f"{main}</section></div>"
        )
        return page(request, text["title"], body, principal=principal, status=status)

    # ---------------------------------------------------------------------------- pages

    @web.get("/reading/reports", response_class=HTMLResponse)
    def my_reports(request: Request) -> HTMLResponse:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        group = principal.organisation
        with ctx.db.reading() as session:
            if not (principal.kind == "user" and may_review_requests(principal, group)):
                body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
                return page(request, text["mine_title"], body, principal=principal, status=403)
            rows = reports.recent_reports(session, principal)
            group_name = session.scalar(select(Organisation.name).where(Organisation.code == group)) or group
        body = (
            f'<p><a href="/reading{escape(_suffix(request))}">{escape(text["back"])}</a></p>'
            f'<p class="meta">{escape(text["mine_intro"].format(group=group_name))}</p>'
        )
        if not rows:
            return page(
                request, text["mine_title"], body + f"<p>{escape(text['mine_none'])}</p>", principal=principal
            )
        lines = []
        for row in rows:
            report = row.report
            state = text["state_draft"] if report.state == REPORT_DRAFT else text["state_signed"]
            publication = {
                "pending": text["pub_pending"],
                PUBLICATION_DONE: text["pub_done"],
                PUBLICATION_FAILED: text["pub_failed"],
            }.get(report.publication_state, "—")
            patient = row.patient_name or report.study_uid
            link = (
                f'<a href="/reading/tasks/{report.task_id}/report{escape(_suffix(request))}" '
                f'aria-label="{escape(text["open_report_label"].format(patient=patient))}">'
                f"{escape(text['open_report'])}</a>"
                if report.task_id is not None
                else ""
            )
            cells = (
                escape(patient),
                escape(row.modality),
                escape(str(report.version)),
                escape(state),
                escape(_local(report.updated_at, language)),
                escape(publication if report.state != REPORT_DRAFT else "—"),
                link,
            )
            lines.append(
                f'<tr data-report="{report.id}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
            )
        headings = ("patient", "exam", "version", "state", "updated", "publication", "actions")
        head = "".join(f'<th scope="col">{escape(text[k])}</th>' for k in headings)
        body += (
            f'<table class="my-reports"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'
        )
        return page(request, text["mine_title"], body, principal=principal)

    @web.get("/reading/tasks/{task_id}/report", response_class=HTMLResponse)
    def report_page(request: Request, task_id: RowId, done: str = "") -> HTMLResponse:
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        return _report_page(request, principal, task_id, message=text[done] if done in DONE else "")

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v) for k, v in form.items() if isinstance(v, str)}

    def _redirect(request: Request, task_id: int | None, **params: str) -> Response:
        target = f"/reading/tasks/{task_id}/report" if task_id is not None else "/reading"
        return RedirectResponse(target + _suffix(request, **params), status_code=303)

    def _failure(request: Request, principal: Principal, task_id: int | None, exc: Exception) -> Response:
        text = TEXT[request_language(request)]
        if task_id is None:
            body = f'<p class="error" role="alert">{escape(text["error"].format(reason=str(exc)))}</p>'
            return page(request, text["title"], body, principal=principal, status=_error_status(exc))
        return _report_page(
            request,
            principal,
            task_id,
            error=text["error"].format(reason=str(exc)),
            status=_error_status(exc),
        )

    def _task_of(report_id: int) -> int | None:
        with ctx.db.reading() as session:
            report = session.get(Report, report_id)
            return report.task_id if report is not None else None

    @web.post("/reading/tasks/{task_id}/report")
    async def start(request: Request, task_id: RowId) -> Response:
        principal, form = await _form(request)
        try:
            with ctx.db.unit_of_work() as session:
                reports.start_report(session, task_id, principal, form.get("template", ""))
        except (reports.ReportError, AccessDenied) as exc:
            return _failure(request, principal, task_id, exc)
        return _redirect(request, task_id)

    def _draft_values(form: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any] | None, str | None]:
        sections = {name: str(form[name]) for name in reports.SECTIONS if name in form}
        dose_raw = form.get("dose")
        if isinstance(dose_raw, dict):
            dose: dict[str, Any] | None = dose_raw
        else:
            keys = [k for k in form if str(k).startswith("dose_")]
            dose = {k[5:]: form[k] for k in keys} if keys else None
        addendum = str(form["addendum"]) if "addendum" in form else None
        return sections, dose, addendum

    @web.post("/reports/{report_id}/save")
    async def save(request: Request, report_id: RowId) -> Response:
        principal, form = await _form(request)
        task_id = _task_of(report_id)
        sections, dose, addendum = _draft_values(form)
        try:
            with ctx.db.unit_of_work() as session:
                reports.save_draft(
                    session, report_id, principal, sections=sections, dose=dose, addendum=addendum
                )
        except (reports.ReportError, AccessDenied) as exc:
            return _failure(request, principal, task_id, exc)
        return _redirect(request, task_id)

    def _sign(
        principal: Principal, report_id: int, code: str, values: Mapping[str, Any] | None
    ) -> reports.Signature:
        with ctx.db.unit_of_work() as session:
            if values is not None:
                sections, dose, addendum = _draft_values(values)
                reports.save_draft(
                    session, report_id, principal, sections=sections, dose=dose, addendum=addendum
                )
            return reports.sign_report(session, report_id, principal, totp_code=code)

    @web.post("/reports/{report_id}/sign")
    async def sign(request: Request, report_id: RowId) -> Response:
        principal, form = await _form(request)
        text = TEXT[request_language(request)]
        task_id = _task_of(report_id)
        try:
            outcome = _sign(principal, report_id, form.get("code", "")[:16], form)
        except (reports.ReportError, AccessDenied) as exc:
            return _failure(request, principal, task_id, exc)
        if not outcome.signed:
            error = text["locked"] if outcome.locked else text["bad_code"]
            if task_id is None:
                return page(
                    request,
                    text["title"],
                    f'<p class="error" role="alert">{escape(error)}</p>',
                    principal=principal,
                    status=401,
                )
            return _report_page(request, principal, task_id, error=error, status=401)
        return _redirect(request, task_id, done="signed")

    @web.post("/reports/{report_id}/addendum")
    async def addendum(request: Request, report_id: RowId) -> Response:
        principal, _ = await _form(request)
        task_id = _task_of(report_id)
        try:
            with ctx.db.unit_of_work() as session:
                reports.add_addendum(session, report_id, principal)
        except (reports.ReportError, AccessDenied) as exc:
            return _failure(request, principal, task_id, exc)
        return _redirect(request, task_id)

    @web.post("/reading/tasks/{task_id}/opinions")
    async def ask(request: Request, task_id: RowId) -> Response:
        principal, form = await _form(request)
        try:
            with ctx.db.unit_of_work() as session:
                reports.ask_second_opinion(
                    session,
                    task_id,
                    principal,
                    requested_of=form.get("requested_of", ""),
                    question=form.get("question", ""),
                )
        except (reports.ReportError, AccessDenied, reading_tasks.TaskError) as exc:
            return _failure(request, principal, task_id, exc)
        return _redirect(request, task_id, done="opinion_sent")

    @web.post("/opinions/{opinion_id}/answer")
    async def answer(request: Request, opinion_id: RowId) -> Response:
        principal, form = await _form(request)
        with ctx.db.reading() as session:
            opinion = session.get(SecondOpinion, opinion_id)
            task_id = opinion.task_id if opinion is not None else None
        try:
            with ctx.db.unit_of_work() as session:
                reports.answer_second_opinion(session, opinion_id, principal, answer=form.get("answer", ""))
        except (reports.ReportError, AccessDenied) as exc:
            return _failure(request, principal, task_id, exc)
        return _redirect(request, task_id, done="answer_sent")

    # ---------------------------------------------------------------------------- JSON API

    async def _json(request: Request) -> dict[str, Any]:
        try:
            payload = await request.json()
        except ValueError:
            return {}
        return payload if isinstance(payload, dict) else {}

    def _api_error(exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_error_status(exc))

    @web.post("/api/reading/tasks/{task_id}/report")
    async def api_start(request: Request, task_id: RowId) -> JSONResponse:
        """Start (or get) the report of a held task: ``{"template": "ct-head"}``."""
        principal = request_principal(request)
        payload = await _json(request)
        try:
            with ctx.db.unit_of_work() as session:
                report = reports.start_report(session, task_id, principal, str(payload.get("template", "")))
                return JSONResponse(report_json(report), status_code=201)
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.get("/api/reports/{report_id}")
    def api_report(request: Request, report_id: RowId) -> JSONResponse:
        """One report version."""
        principal = request_principal(request)
        try:
            with ctx.db.reading() as session:
                return JSONResponse(report_json(reports.get_for(session, report_id, principal)))
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.get("/api/reports/{report_id}/history")
    def api_history(request: Request, report_id: RowId) -> JSONResponse:
        """Every version of the report, oldest first."""
        principal = request_principal(request)
        try:
            with ctx.db.reading() as session:
                report = reports.get_for(session, report_id, principal)
                return JSONResponse(
                    {"versions": [report_json(v) for v in reports.history(session, report.set_id)]}
                )
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.post("/api/reports/{report_id}/draft")
    async def api_draft(request: Request, report_id: RowId) -> JSONResponse:
        """Autosave: ``{"indications", "technique", "results", "conclusion", "dose": {...}, "addendum"}``."""
        principal = request_principal(request)
        payload = await _json(request)
        sections, dose, addendum = _draft_values(payload)
        try:
            with ctx.db.unit_of_work() as session:
                report = reports.save_draft(
                    session, report_id, principal, sections=sections, dose=dose, addendum=addendum
                )
                answer = report_json(report)
                answer["saved_at"] = _local(report.updated_at, "fr", seconds=True)
                return JSONResponse(answer)
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.post("/api/reports/{report_id}/sign")
    async def api_sign(request: Request, report_id: RowId) -> JSONResponse:
        """Sign with re-authentication: ``{"totp_code": "123456"}``; 401 when the code is refused."""
        principal = request_principal(request)
        payload = await _json(request)
        try:
            outcome = _sign(principal, report_id, str(payload.get("totp_code", ""))[:16], None)
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)
        if not outcome.signed:
            return JSONResponse(
                {"error": "account locked" if outcome.locked else "verification code refused"},
                status_code=401,
            )
        with ctx.db.reading() as session:
            return JSONResponse(report_json(reports.get_or_raise(session, report_id)))

    @web.post("/api/reports/{report_id}/addendum")
    def api_addendum(request: Request, report_id: RowId) -> JSONResponse:
        """A new draft version completing the signed report."""
        principal = request_principal(request)
        try:
            with ctx.db.unit_of_work() as session:
                return JSONResponse(
                    report_json(reports.add_addendum(session, report_id, principal)), status_code=201
                )
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.post("/api/reading/tasks/{task_id}/second-opinions")
    async def api_ask(request: Request, task_id: RowId) -> JSONResponse:
        """Ask a colleague of the group: ``{"requested_of": login, "question": text}``."""
        principal = request_principal(request)
        payload = await _json(request)
        try:
            with ctx.db.unit_of_work() as session:
                opinion = reports.ask_second_opinion(
                    session,
                    task_id,
                    principal,
                    requested_of=str(payload.get("requested_of", "")),
                    question=str(payload.get("question", "")),
                )
                return JSONResponse(opinion_json(opinion), status_code=201)
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)

    @web.get("/api/second-opinions")
    def api_opinions(request: Request) -> dict[str, Any]:
        """The open second opinions asked of the caller."""
        principal = request_principal(request)
        with ctx.db.reading() as session:
            return {"opinions": [opinion_json(o) for o in reports.opinions_asked_of(session, principal)]}

    @web.post("/api/second-opinions/{opinion_id}/answer")
    async def api_answer(request: Request, opinion_id: RowId) -> JSONResponse:
        """Answer an opinion asked of the caller: ``{"answer": text}``."""
        principal = request_principal(request)
        payload = await _json(request)
        try:
            with ctx.db.unit_of_work() as session:
                opinion = reports.answer_second_opinion(
                    session, opinion_id, principal, answer=str(payload.get("answer", ""))
                )
                return JSONResponse(opinion_json(opinion))
        except (reports.ReportError, AccessDenied) as exc:
            return _api_error(exc)
