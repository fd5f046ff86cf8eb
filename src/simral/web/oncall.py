"""The on-call schedule ("tableau de garde") of teleradiology groups in the portal (DESIGN.md §7;
issue 6 item 4): ``/reading/oncall``.

- GET ``/reading/oncall`` — the shifts still running or to come of every group whose schedule the
  user may read (:func:`simral.access.policy.may_read_on_call`: the group's radiologists, its
  administrators, regional administrators): radiologist, start and end (Paris time), subspecialty
  covered, who added it; the shift running now is marked "de garde maintenant". For who may change
  a group's schedule (:func:`simral.access.policy.may_schedule_on_call`), a form to add a shift and
  a remove button per shift;
- POST ``/reading/oncall/add`` and ``/reading/oncall/{shift_id}/remove`` — the same
  :func:`simral.reading.routing.add_shift` and :func:`~simral.reading.routing.remove_shift` as
  ``simral oncall add|remove`` (rights checked and changes audited there), with the session's CSRF
  token; 303 back to the page with a notice, or the page with the refusal in words.

French first, English with ``?lang=en``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from html import escape

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from simral.access.policy import AccessDenied, Principal, may_schedule_on_call
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.reading import reports, routing
from simral.reading.models import OnCallShift
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import (
    LOCAL_TIME,
    Language,
    csrf_field,
    display_time,
    lang_param,
    page,
    post_button,
    request_language,
    table,
)
from simral.web.params import RowId

ONCALL_PATH = "/reading/oncall"

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Tableau de garde",
        "intro": "Gardes en cours et à venir des groupes de téléradiologie dont vous êtes membre.",
        "group": "Groupe {name} ({code})",
        "none": "Aucune garde en cours ni à venir.",
        "radiologist": "Radiologue",
        "start": "Début",
        "end": "Fin",
        "subspecialty": "Surspécialité",
        "added_by": "Ajoutée par",
        "state": "État",
        "actions": "Actions",
        "all": "Tous les examens",
        "now": "de garde maintenant",
        "remove": "Retirer",
        "remove_label": "Retirer la garde de {who} du {start}",
        "add": "Ajouter une garde",
        "do_add": "Ajouter",
        "added_notice": "Garde ajoutée au tableau.",
        "removed_notice": "Garde retirée du tableau.",
        "denied": "Le tableau de garde est celui des groupes de téléradiologie dont vous êtes membre.",
        "refused": "Garde refusée : {reason}",
        "bad_time": "la date et l'heure de début et de fin sont attendues (heure de Paris).",
        "order": "la fin de la garde doit suivre son début.",
        "too_long": "une garde dure au plus {days} jours.",
        "not_radiologist": "{login} n'est pas radiologue actif du groupe.",
        "overlap": "ce radiologue a déjà une garde du groupe sur cette période (chevauchement).",
        "unknown_subspecialty": "surspécialité inconnue.",
        "no_shift": "cette garde n'existe plus.",
        "not_group": "ce groupe n'est pas un groupe de téléradiologie.",
        "other": "{message}",
        "back": "Retour au tableau de garde",
        "paris": "heure de Paris",
    },
    "en": {
        "title": "On-call schedule",
        "intro": "Current and upcoming shifts of the teleradiology groups you belong to.",
        "group": "Group {name} ({code})",
        "none": "No current or upcoming shift.",
        "radiologist": "Radiologist",
        "start": "Start",
        "end": "End",
        "subspecialty": "Subspecialty",
        "added_by": "Added by",
        "state": "State",
        "actions": "Actions",
        "all": "Every study",
        "now": "on call now",
        "remove": "Remove",
        "remove_label": "Remove the shift of {who} starting {start}",
        "add": "Add a shift",
        "do_add": "Add",
        "added_notice": "Shift added to the schedule.",
        "removed_notice": "Shift removed from the schedule.",
        "denied": "The on-call schedule is that of the teleradiology groups you belong to.",
        "refused": "Shift refused: {reason}",
        "bad_time": "the start and end dates and times are expected (Paris time).",
        "order": "a shift ends after it starts.",
        "too_long": "a shift lasts at most {days} days.",
        "not_radiologist": "{login} is not an active radiologist of the group.",
        "overlap": "this radiologist already has a shift of the group in this period (overlap).",
        "unknown_subspecialty": "unknown subspecialty.",
        "no_shift": "this shift no longer exists.",
        "not_group": "this group is not a teleradiology group.",
        "other": "{message}",
        "back": "Back to the on-call schedule",
        "paris": "Paris time",
    },
}

NOTICES = ("added", "removed")


def refusal(exc: routing.ScheduleError, language: Language, login: str = "") -> str:
    """The reason a shift was refused, in the page's language, by the rule the service names."""
    text = TEXT[language]
    if exc.reason == "too_long":
        reason = text["too_long"].format(days=routing.MAX_SHIFT.days)
    elif exc.reason == "not_radiologist":
        reason = text["not_radiologist"].format(login=login)
    elif exc.reason in text:
        reason = text[exc.reason]
    else:
        reason = text["other"].format(message=str(exc))
    return text["refused"].format(reason=reason)


def parse_local(value: str) -> datetime:
    """A ``datetime-local`` field (YYYY-MM-DDTHH:MM), in Paris time."""
    moment = datetime.fromisoformat(value.strip())
    if moment.tzinfo is not None:
        raise ValueError("a datetime-local value has no offset")
    return moment.replace(tzinfo=LOCAL_TIME)


def mount_oncall(web: FastAPI, ctx: AppContext) -> None:
    """Add the on-call schedule page and its forms to ``web``."""

    def _groups(principal: Principal) -> list[tuple[str, str]]:
        """(code, name) of the teleradiology groups whose schedule ``principal`` may read."""
        if principal.kind != "user":
            return []
        with ctx.db.reading() as session:
            return routing.readable_groups(session, principal)

    def _radiologists(group_code: str) -> list[tuple[str, str]]:
        with ctx.db.reading() as session:
            return reports.group_radiologists(session, group_code)

    def _suffix(request: Request) -> str:
        lang = lang_param(request)
        return f"?lang={lang}" if lang else ""

    def _shift_row(
        request: Request, shift: OnCallShift, names: Mapping[str, str], *, now: datetime, manage: bool
    ) -> str:
        language = request_language(request)
        text = TEXT[language]
        start, end = as_utc(shift.start_at) or shift.start_at, as_utc(shift.end_at) or shift.end_at
        who = names.get(shift.login) or shift.login
        running = start <= now < end
        cells = [
            escape(f"{who} ({shift.login})" if who != shift.login else who),
            escape(display_time(start, language)),
            escape(display_time(end, language)),
            escape(
                routing.subspecialty_label(shift.subspecialty, language)
                if shift.subspecialty
                else text["all"]
            ),
            escape(shift.created_by),
            f'<strong class="on-call-now">{escape(text["now"])}</strong>' if running else "",
        ]
        if manage:
            label = text["remove_label"].format(who=who, start=display_time(start, language))
            cells.append(
                post_button(
                    request,
                    f"{ONCALL_PATH}/{shift.id}/remove{_suffix(request)}",
                    text["remove"],
                    aria_label=label,
                )
            )
        klass = ' class="on-call-now"' if running else ""
        return f'<tr data-shift="{shift.id}"{klass}>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    def _add_form(request: Request, group_code: str) -> str:
        language = request_language(request)
        text = TEXT[language]
        radiologists = "".join(
            f'<option value="{escape(login)}">{escape(f"{name} ({login})" if name else login)}</option>'
            for login, name in _radiologists(group_code)
        )
        labels = routing.SUBSPECIALTIES_EN if language == "en" else routing.SUBSPECIALTIES
        subspecialties = f'<option value="">{escape(text["all"])}</option>' + "".join(
            f'<option value="{escape(code)}">{escape(label)}</option>' for code, label in labels.items()
        )
        return (
            f"<h3>{escape(text['add'])}</h3>"
            f'<form class="stack oncall-add" method="post" action="{ONCALL_PATH}/add{_suffix(request)}">'
            f"{csrf_field(request)}"
            f'<input type="hidden" name="group" value="{escape(group_code)}">'
            f"<label>{escape(text['radiologist'])} "
            f'<select name="login" required>{radiologists}</select></label>'
            f"<label>{escape(text['start'])} ({escape(text['paris'])}) "
            '<input type="datetime-local" name="start" required></label>'
            f"<label>{escape(text['end'])} ({escape(text['paris'])}) "
            '<input type="datetime-local" name="end" required></label>'
            f"<label>{escape(text['subspecialty'])} "
            f'<select name="subspecialty">{subspecialties}</select></label>'
            f'<button type="submit">{escape(text["do_add"])}</button></form>'
        )

    def _render(
        request: Request, principal: Principal, *, error: str = "", status: int = 200
    ) -> HTMLResponse:
        language = request_language(request)
        text = TEXT[language]
        groups = _groups(principal)
        if not groups:
            body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
            return page(request, text["title"], body, principal=principal, status=403)
        now = utcnow()
        body = ""
        done = request.query_params.get("done", "")
        if error:
            body += f'<p class="error" role="alert">{escape(error)}</p>'
        elif done in NOTICES:
            body += f'<p class="message" role="status">{escape(text[done + "_notice"])}</p>'
        body += f'<p class="meta">{escape(text["intro"])}</p>'
        headings = [text[k] for k in ("radiologist", "start", "end", "subspecialty", "added_by", "state")]
        for code, name in groups:
            manage = may_schedule_on_call(principal, code)
            with ctx.db.reading() as session:
                shifts = routing.list_shifts(session, group_code=code, ending_after=now)
            names = dict(_radiologists(code))
            heading = text["group"].format(name=name, code=code)
            body += f'<section data-group="{escape(code)}"><h2>{escape(heading)}</h2>'
            if shifts:
                rows = [_shift_row(request, s, names, now=now, manage=manage) for s in shifts]
                body += table(headings + ([text["actions"]] if manage else []), rows)
            else:
                body += f"<p>{escape(text['none'])}</p>"
            if manage:
                body += _add_form(request, code)
            body += "</section>"
        return page(request, text["title"], body, principal=principal, status=status)

    def _redirect(request: Request, notice: str) -> RedirectResponse:
        lang = lang_param(request)
        return RedirectResponse(
            f"{ONCALL_PATH}?done={notice}" + (f"&lang={lang}" if lang else ""), status_code=303
        )

    def _denied(request: Request, principal: Principal) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = (
            f'<p class="error" role="alert">{escape(text["denied"])}</p>'
            f'<p><a href="{ONCALL_PATH}{escape(_suffix(request))}">{escape(text["back"])}</a></p>'
        )
        return page(request, text["title"], body, principal=principal, status=403)

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:200] for k, v in form.items() if isinstance(v, str)}

    @web.get(ONCALL_PATH, response_class=HTMLResponse)
    def oncall_page(request: Request) -> HTMLResponse:
        return _render(request, request_principal(request))

    @web.post(f"{ONCALL_PATH}/add")
    async def oncall_add(request: Request) -> Response:
        principal, form = await _form(request)
        language = request_language(request)
        group, login = form.get("group", ""), form.get("login", "")
        try:
            start, end = parse_local(form.get("start", "")), parse_local(form.get("end", ""))
        except ValueError:
            reason = TEXT[language]["refused"].format(reason=TEXT[language]["bad_time"])
            return _render(request, principal, error=reason, status=400)
        try:
            with ctx.db.unit_of_work() as session:
                routing.add_shift(
                    session,
                    group_code=group,
                    login=login,
                    start_at=start,
                    end_at=end,
                    subspecialty=form.get("subspecialty", ""),
                    principal=principal,
                )
        except AccessDenied:
            return _denied(request, principal)
        except routing.ScheduleError as exc:
            return _render(request, principal, error=refusal(exc, language, login), status=400)
        return _redirect(request, "added")

    @web.post(f"{ONCALL_PATH}/{{shift_id}}/remove")
    async def oncall_remove(request: Request, shift_id: RowId) -> Response:
        principal, _ = await _form(request)
        language = request_language(request)
        try:
            with ctx.db.unit_of_work() as session:
                routing.remove_shift(session, shift_id, principal=principal)
        except AccessDenied:
            return _denied(request, principal)
        except routing.ScheduleError as exc:
            return _render(request, principal, error=refusal(exc, language), status=404)
        return _redirect(request, "removed")
