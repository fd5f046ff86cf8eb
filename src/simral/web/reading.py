"""The reading worklist (DESIGN.md §7): ``/reading`` for the radiologists of a teleradiology group.

The group's ready and claimed tasks, urgent first then by deadline, with the time left ("dans
35 min", "en retard de 10 min"), counted down in the page every 30 s by ``/static/reading-countdown.js``
(a static script: the Content-Security-Policy allows no inline script) from each row's
``data-deadline`` (ISO 8601, UTC); rows whose deadline is within ``reading_escalate_minutes`` are
marked ``due-soon``, passed ones ``overdue``. A radiologist claims a ready task (exclusive: the
second claim of the same task is answered 409 with who holds it), opens the study in the viewer, or
releases it.
The group's administrators release or hand a task to a named radiologist. A ready task pre-assigned
to the radiologist on call shows "de garde : Dr X" (:mod:`simral.reading.routing`); the on-call
radiologist sees how many are theirs and which deadlines they were alerted of. The same operations
answer JSON under ``/api/reading/tasks`` (session cookie with ``X-CSRF-Token``, or a bearer
token). The reading task service checks every right and writes the audit records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from simral.access.policy import AccessDenied, Principal, may_assign_reading, may_review_requests
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.identity.models import Membership, Organisation, Professional
from simral.reading import reports, routing, tasks
from simral.reading.models import PRIORITY_URGENT, TASK_CLAIMED, TASK_READY, ReadingTask
from simral.reading.worklist import local_timezone
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import (
    Language,
    csrf_field,
    display_date,
    explicit_language,
    page,
    post_button,
    request_language,
    table,
)
from simral.web.pages import viewer_url
from simral.web.params import RowId

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Liste de lecture",
        "intro": "Examens à interpréter pour {group}, urgents d'abord puis par échéance.",
        "none": "Aucun examen à interpréter pour le moment.",
        "priority": "Priorité",
        "patient": "Patient",
        "exam": "Examen",
        "site": "Site demandeur",
        "due": "Échéance",
        "state": "État",
        "actions": "Actions",
        "urgent": "Urgent",
        "routine": "Standard",
        "ready": "À lire",
        "claimed_by_me": "Pris par vous",
        "claimed_by": "Pris par {who}",
        "claim": "Prendre",
        "release": "Libérer",
        "open": "Ouvrir",
        "assign": "Attribuer à",
        "do_assign": "Attribuer",
        "in": "dans {delay}",
        "late": "en retard de {delay}",
        "no_due": "sans échéance",
        "escalated": "alerte envoyée",
        "images": "{n} image(s)",
        "born": "né(e) le {date}",
        "claimed": "Examen pris : vous pouvez l'ouvrir.",
        "released": "Examen rendu à la liste du groupe.",
        "assigned": "Examen attribué.",
        "denied": "Cette liste est celle des radiologues d'un groupe de téléradiologie : "
        "choisissez le groupe pour lequel vous agissez.",
        "conflict": "Impossible : {reason}",
        "back": "Retour à la liste",
        "claim_label": "Prendre l'examen de {patient}",
        "release_label": "Libérer l'examen de {patient}",
        "open_label": "Ouvrir l'examen de {patient} dans la visionneuse",
        "write": "Rédiger",
        "write_label": "Rédiger le compte rendu de l'examen de {patient}",
        "request": "Demande",
        "request_label": "Demande d'examen et documents joints de {patient}",
        "opinions": "Avis demandés par vos confrères : {links}",
        "opinion_link": "examen n° {task}",
        "my_reports": "Mes comptes rendus",
        "on_call_schedule": "Tableau de garde",
        "on_call": "de garde : {who}",
        "on_call_me": "de garde : vous",
        "oncall_alerted": "alerte de garde",
        "my_on_call": "Vous êtes de garde : {n} examen(s) vous sont attribués.",
        "my_alerts": "Échéance proche : {n} examen(s) de garde vous ont été signalés.",
    },
    "en": {
        "title": "Reading worklist",
        "intro": "Studies to interpret for {group}, urgent first, then by deadline.",
        "none": "No study to interpret for now.",
        "priority": "Priority",
        "patient": "Patient",
        "exam": "Study",
        "site": "Requesting site",
        "due": "Deadline",
        "state": "State",
        "actions": "Actions",
        "urgent": "Urgent",
        "routine": "Routine",
        "ready": "To read",
        "claimed_by_me": "Claimed by you",
        "claimed_by": "Claimed by {who}",
        "claim": "Claim",
        "release": "Release",
        "open": "Open",
        "assign": "Assign to",
        "do_assign": "Assign",
        "in": "in {delay}",
        "late": "overdue by {delay}",
        "no_due": "no deadline",
        "escalated": "alert sent",
        "images": "{n} image(s)",
        "born": "born {date}",
        "claimed": "Study claimed: you can open it.",
        "released": "Study handed back to the group's list.",
        "assigned": "Study assigned.",
        "denied": "This list is for the radiologists of a teleradiology group: choose the group you act for.",
        "conflict": "Not possible: {reason}",
        "back": "Back to the list",
        "claim_label": "Claim the study of {patient}",
        "release_label": "Release the study of {patient}",
        "open_label": "Open the study of {patient} in the viewer",
        "write": "Write report",
        "write_label": "Write the report of the study of {patient}",
        "request": "Request",
        "request_label": "Imaging request and attached documents of {patient}",
        "opinions": "Opinions your colleagues asked of you: {links}",
        "opinion_link": "study no. {task}",
        "my_reports": "My reports",
        "on_call_schedule": "On-call schedule",
        "on_call": "on call: {who}",
        "on_call_me": "on call: you",
        "oncall_alerted": "on-call alert",
        "my_on_call": "You are on call: {n} study(ies) are assigned to you.",
        "my_alerts": "Deadline near: you were alerted of {n} on-call study(ies).",
    },
}

#: The worklist's countdown (``/static/reading-countdown.js``): every 30 s, each ``[data-deadline]``
#: of ``table.reading`` says the time left as :func:`delay_text` does, with the templates and the
#: day unit of the table's ``data-countdown``, and its row is marked ``due-soon`` (within
#: ``data-warn-seconds``) or ``overdue``.
COUNTDOWN_SCRIPT = """(function () {
  "use strict";
  var table = document.querySelector("table.reading[data-countdown]");
  if (!table) { return; }
  var text = JSON.parse(table.getAttribute("data-countdown"));
  var warn = Number(table.getAttribute("data-warn-seconds")) || 0;
  function amount(minutes) {
    if (minutes < 60) { return minutes + " min"; }
    if (minutes < 48 * 60) {
      var hours = Math.floor(minutes / 60), rest = minutes % 60;
      return rest ? hours + " h " + (rest < 10 ? "0" : "") + rest : hours + " h";
    }
    return Math.floor(minutes / (24 * 60)) + " " + text.day;
  }
  function tick() {
    var now = Date.now();
    table.querySelectorAll("[data-deadline]").forEach(function (cell) {
      var due = Date.parse(cell.getAttribute("data-deadline"));
      if (isNaN(due)) { return; }
      var seconds = (due - now) / 1000;
      var overdue = seconds < 0;
      var soon = !overdue && seconds <= warn;
      var delay = amount(Math.floor(Math.abs(seconds) / 60));
      cell.textContent = (overdue ? text.late : text["in"]).replace("{delay}", delay);
      cell.classList.toggle("late", overdue);
      cell.classList.toggle("left", !overdue);
      cell.classList.toggle("soon", soon);
      var row = cell.closest("tr");
      if (row) {
        row.classList.toggle("overdue", overdue);
        row.classList.toggle("due-soon", soon);
      }
    });
  }
  tick();
  window.setInterval(tick, 30000);
})();
"""

#: Messages shown after a redirect (``?done=``).
DONE = ("claimed", "released", "assigned")


def delay_text(due_at: datetime | None, now: datetime, language: Language) -> tuple[str, bool]:
    """The time left before ``due_at`` as a reader says it ("dans 35 min", "en retard de 1 h 10",
    "in 2 d"), and whether it is overdue."""
    text = TEXT[language]
    due = as_utc(due_at)
    if due is None:
        return text["no_due"], False
    seconds = (due - now).total_seconds()
    overdue = seconds < 0
    minutes = int(abs(seconds) // 60)
    if minutes < 60:
        amount = f"{minutes} min"
    elif minutes < 48 * 60:
        hours, rest = divmod(minutes, 60)
        amount = f"{hours} h {rest:02d}" if rest else f"{hours} h"
    else:
        amount = f"{minutes // (24 * 60)} {'j' if language == 'fr' else 'd'}"
    return (text["late"] if overdue else text["in"]).format(delay=amount), overdue


def _local_time(value: datetime | None, language: Language) -> str:
    due = as_utc(value)
    if due is None:
        return ""
    local = due.astimezone(local_timezone())
    return local.strftime("%d/%m %H:%M") if language == "fr" else local.strftime("%m-%d %H:%M")


def task_json(row: tasks.TaskRow, *, now: datetime) -> dict[str, Any]:
    """A task of the worklist as the JSON API gives it."""
    task = row.task
    due = as_utc(task.due_at)
    return {
        "id": task.id,
        "study_uid": task.study_uid,
        "state": task.state,
        "priority": task.priority,
        "modality": task.modality,
        "site": task.site_code,
        "site_name": row.site_name,
        "group": task.group_code,
        "due_at": due.isoformat() if due is not None else None,
        "seconds_left": int((due - now).total_seconds()) if due is not None else None,
        "claimed_by": task.claimed_by,
        "claimed_by_name": row.holder_name,
        "subspecialty": task.subspecialty,
        "assigned_to": task.assigned_to,
        "assigned_to_name": row.assignee_name,
        "oncall_alerted": task.oncall_alerted_at is not None,
        "escalated": task.escalated_at is not None,
        "patient_name": row.patient_name,
        "patient_id": row.patient_id,
        "description": row.description,
        "instances": row.instances,
        "viewer_url": viewer_url(task.study_uid),
    }


def mount_reading(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/reading`` and ``/api/reading/tasks`` to ``web``."""

    @web.get("/static/reading-countdown.js", include_in_schema=False)
    def countdown_script() -> Response:
        return Response(
            COUNTDOWN_SCRIPT, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"}
        )

    @web.get("/reading/tasks/{task_id}/viewer")
    def open_viewer(request: Request, task_id: RowId) -> Response:
        """The viewer on the task's study with the patient's earlier studies the radiologist may see
        (identity service: every identity of the person, every site; the access policy decides)."""
        principal = request_principal(request)
        with ctx.db.reading() as session:
            task = session.get(ReadingTask, task_id)
            if task is None or not reports.may_open_task(session, task, principal):
                raise HTTPException(status_code=404)
            priors = tasks.visible_priors(session, task.study_uid, principal=principal)
        return RedirectResponse(
            viewer_url(task.study_uid, explicit_language(request), priors=priors), status_code=303
        )

    #: How near a deadline marks a row (the escalation's, :mod:`simral.reading.routing`).
    warn_before = timedelta(minutes=ctx.settings.reading_escalate_minutes)

    def _suffix(request: Request, **params: str) -> str:
        explicit = explicit_language(request)
        query = {**params, **({"lang": explicit} if explicit else {})}
        return ("?" + urlencode(query)) if query else ""

    def _radiologists(principal: Principal) -> list[str]:
        with ctx.db.reading() as session:
            return list(
                session.scalars(
                    select(Professional.login)
                    .join(Membership, Membership.professional_id == Professional.id)
                    .join(Organisation, Organisation.id == Membership.organisation_id)
                    .where(
                        Organisation.code == principal.organisation,
                        Membership.role == "radiologist",
                        Professional.active.is_(True),
                    )
                    .order_by(Professional.login)
                )
            )

    def _row(request: Request, principal: Principal, row: tasks.TaskRow, *, now: datetime, admin: bool,
             radiologists: list[str]) -> str:  # fmt: skip
        language = request_language(request)
        text = TEXT[language]
        task = row.task
        urgent = task.priority == PRIORITY_URGENT
        badge = (
            f'<span class="priority urgent">{escape(text["urgent"])}</span>'
            if urgent
            else f'<span class="priority routine">{escape(text["routine"])}</span>'
        )
        delay, overdue = delay_text(task.due_at, now, language)
        deadline = as_utc(task.due_at)
        soon = deadline is not None and not overdue and deadline - now <= warn_before
        if deadline is not None:
            css = "late" if overdue else "left soon" if soon else "left"
            iso = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
            due = f'<span class="{css}" data-deadline="{iso}">{escape(delay)}</span>'
        else:
            due = f'<span class="left">{escape(delay)}</span>'
        if task.due_at is not None:
            due += f'<span class="sub">{escape(_local_time(task.due_at, language))}</span>'
        if task.oncall_alerted_at is not None:
            due += f'<span class="sub alerted">{escape(text["oncall_alerted"])}</span>'
        if task.escalated_at is not None:
            due += f'<span class="sub alerted">{escape(text["escalated"])}</span>'
        patient_label = row.patient_name or task.study_uid
        patient = f"<strong>{escape(row.patient_name)}</strong>" if row.patient_name else ""
        details = [row.patient_id]
        if row.birth_date:
            details.append(text["born"].format(date=display_date(row.birth_date, language)))
        patient += f'<span class="sub">{escape(" · ".join(d for d in details if d))}</span>'
        description = row.description
        if task.modality and description.upper().startswith(task.modality.upper() + " "):
            description = description[len(task.modality) + 1 :]
        exam = f"<strong>{escape(task.modality)}</strong> {escape(description)}"
        if task.subspecialty:
            exam += (
                f'<span class="sub">{escape(routing.subspecialty_label(task.subspecialty, language))}</span>'
            )
        exam += f'<span class="sub">{escape(text["images"].format(n=row.instances))}</span>'
        mine = task.state == TASK_CLAIMED and task.claimed_by == principal.name
        if task.state == TASK_READY:
            state = escape(text["ready"])
            if task.assigned_to == principal.name:
                state += f'<span class="sub on-call">{escape(text["on_call_me"])}</span>'
            elif task.assigned_to:
                on_call = text["on_call"].format(who=row.assignee_name or task.assigned_to)
                state += f'<span class="sub on-call">{escape(on_call)}</span>'
        elif mine:
            state = escape(text["claimed_by_me"])
        else:
            state = escape(text["claimed_by"].format(who=row.holder_name or task.claimed_by))
        actions: list[str] = []
        if task.state == TASK_READY and may_review_requests(principal, task.group_code):
            actions.append(
                post_button(
                    request,
                    f"/reading/tasks/{task.id}/claim{_suffix(request)}",
                    text["claim"],
                    aria_label=text["claim_label"].format(patient=patient_label),
                    css="primary",
                )
            )
        if mine:
            actions.append(
                f'<a class="button" href="/reading/tasks/{task.id}/viewer{escape(_suffix(request))}" '
                f'aria-label="{escape(text["open_label"].format(patient=patient_label))}">'
                f"{escape(text['open'])}</a>"
            )
            actions.append(
                f'<a class="button" href="/reading/tasks/{task.id}/report{escape(_suffix(request))}" '
                f'aria-label="{escape(text["write_label"].format(patient=patient_label))}">'
                f"{escape(text['write'])}</a>"
            )
        if task.request_id is not None and may_review_requests(principal, task.group_code):
            actions.append(
                f'<a class="button" href="/requests/{task.request_id}{escape(_suffix(request))}" '
                f'aria-label="{escape(text["request_label"].format(patient=patient_label))}">'
                f"{escape(text['request'])}</a>"
            )
        if task.state == TASK_CLAIMED and (mine or admin):
            actions.append(
                post_button(
                    request,
                    f"/reading/tasks/{task.id}/release{_suffix(request)}",
                    text["release"],
                    aria_label=text["release_label"].format(patient=patient_label),
                )
            )
        if admin and radiologists:
            options = "".join(
                f'<option value="{escape(login)}">{escape(login)}</option>' for login in radiologists
            )
            actions.append(
                f'<form class="inline assign" method="post" '
                f'action="/reading/tasks/{task.id}/reassign{escape(_suffix(request))}">{csrf_field(request)}'
                f'<label>{escape(text["assign"])} <select name="login">{options}</select></label>'
                f'<button type="submit">{escape(text["do_assign"])}</button></form>'
            )
        css = " ".join(
            c
            for c in ("urgent" if urgent else "", "overdue" if overdue else "", "due-soon" if soon else "")
            if c
        )
        return (
            f'<tr data-task="{task.id}" data-state="{escape(task.state)}"'
            + (f' class="{css}"' if css else "")
            + ">"
            + "".join(
                f"<td>{cell}</td>" for cell in (badge, patient, exam, escape(row.site_name), due, state)
            )
            + f'<td><div class="buttons">{"".join(actions)}</div></td></tr>'
        )

    @web.get("/reading", response_class=HTMLResponse)
    def reading_page(request: Request, done: str = "") -> HTMLResponse:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        group = principal.organisation
        admin = may_assign_reading(principal, group)
        if not (may_review_requests(principal, group) or admin) or principal.kind != "user":
            body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
            return page(request, text["title"], body, principal=principal, status=403)
        now = utcnow()
        with ctx.db.reading() as session:
            rows = tasks.list_tasks(session, principal=principal)
            group_name = session.scalar(select(Organisation.name).where(Organisation.code == group)) or group
            asked = reports.opinions_asked_of(session, principal)
        radiologists = _radiologists(principal) if admin else []
        body = ""
        if done in DONE:
            body += f'<p class="message" role="status">{escape(text[done])}</p>'
        on_call = [
            r.task for r in rows if r.task.state == TASK_READY and r.task.assigned_to == principal.name
        ]
        if on_call:
            body += f'<p class="message">{escape(text["my_on_call"].format(n=len(on_call)))}</p>'
        alerted = [t for t in on_call if t.oncall_alerted_at is not None]
        if alerted:
            alert = text["my_alerts"].format(n=len(alerted))
            body += f'<p class="message alerted" role="alert">{escape(alert)}</p>'
        body += f'<p class="meta">{escape(text["intro"].format(group=group_name))}</p>'
        if principal.kind == "user" and may_review_requests(principal, group):
            mine = f"/reading/reports{_suffix(request)}"
            body += f'<p><a href="{escape(mine)}">{escape(text["my_reports"])}</a></p>'
        schedule = f"/reading/oncall{_suffix(request)}"
        body += f'<p><a href="{escape(schedule)}">{escape(text["on_call_schedule"])}</a></p>'
        if asked:
            links = ", ".join(
                f'<a href="/reading/tasks/{o.task_id}/report{escape(_suffix(request))}">'
                f"{escape(text['opinion_link'].format(task=o.task_id))}</a>"
                for o in asked
            )
            body += f'<p class="message">{escape(text["opinions"]).format(links=links)}</p>'
        if rows:
            headings = [text[k] for k in ("priority", "patient", "exam", "site", "due", "state", "actions")]
            body += table(
                headings,
                [
                    _row(request, principal, row, now=now, admin=admin, radiologists=radiologists)
                    for row in rows
                ],
            ).replace("<table>", f'<table class="reading" {_countdown_attributes(language)}>', 1)
            body += '<script src="/static/reading-countdown.js" defer></script>'
        else:
            body += f"<p>{escape(text['none'])}</p>"
        return page(request, text["title"], body, principal=principal)

    def _countdown_attributes(language: Language) -> str:
        text = TEXT[language]
        templates = {"in": text["in"], "late": text["late"], "day": "j" if language == "fr" else "d"}
        warn = int(warn_before.total_seconds())
        return f'data-countdown="{escape(json.dumps(templates))}" data-warn-seconds="{warn}"'

    def _conflict_page(request: Request, principal: Principal, message: str, status: int) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = (
            f'<p class="error" role="alert">{escape(text["conflict"].format(reason=message))}</p>'
            f'<p><a href="/reading{escape(_suffix(request))}">{escape(text["back"])}</a></p>'
        )
        return page(request, text["title"], body, principal=principal, status=status)

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:200] for k, v in form.items() if isinstance(v, str)}

    def _act(principal: Principal, task_id: int, action: str, login: str = "") -> None:
        with ctx.db.unit_of_work() as session:
            if action == "claim":
                tasks.claim(session, task_id, principal=principal)
            elif action == "release":
                tasks.release(session, task_id, principal=principal)
            else:
                tasks.reassign(session, task_id, login=login, principal=principal)

    @web.post("/reading/tasks/{task_id}/{action}")
    async def task_action(request: Request, task_id: RowId, action: str) -> Response:
        if action not in ("claim", "release", "reassign"):
            raise HTTPException(404, "no such action")
        principal, form = await _form(request)
        try:
            _act(principal, task_id, action, form.get("login", ""))
        except tasks.TaskError as exc:
            return _conflict_page(request, principal, str(exc), 409 if exc.conflict else 400)
        except AccessDenied as exc:
            return _conflict_page(request, principal, str(exc), 403)
        done = {"claim": "claimed", "release": "released", "reassign": "assigned"}[action]
        return RedirectResponse(f"/reading{_suffix(request, done=done)}", status_code=303)

    # ---------------------------------------------------------------------------- JSON API

    @web.get("/api/reading/tasks")
    def api_tasks(request: Request) -> dict[str, Any]:
        """The group's ready and claimed tasks, urgent first then by deadline."""
        principal = request_principal(request)
        now = utcnow()
        with ctx.db.reading() as session:
            rows = tasks.list_tasks(session, principal=principal)
        return {"tasks": [task_json(row, now=now) for row in rows]}

    @web.post("/api/reading/tasks/{task_id}/{action}")
    async def api_task_action(request: Request, task_id: RowId, action: str) -> JSONResponse:
        """Claim, release or reassign (``{"login": ...}``) one task; 409 when someone else changed
        it first."""
        if action not in ("claim", "release", "reassign"):
            raise HTTPException(404, "no such action")
        principal = request_principal(request)
        login = ""
        if action == "reassign":
            try:
                payload = await request.json()
            except ValueError:
                payload = {}
            login = str(payload.get("login", "")) if isinstance(payload, dict) else ""
        try:
            _act(principal, task_id, action, login)
        except tasks.TaskError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409 if exc.conflict else 400)
        except AccessDenied as exc:
            return JSONResponse({"error": str(exc)}, status_code=403)
        with ctx.db.reading() as session:
            task = tasks.get_or_raise(session, task_id)
            return JSONResponse(
                {
                    "id": task.id,
                    "state": task.state,
                    "claimed_by": task.claimed_by,
                    "study_uid": task.study_uid,
                }
            )
