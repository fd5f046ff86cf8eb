"""The teleradiology turnaround dashboard page and its JSON (issue 6 item 7)."""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from simral.access.policy import AccessDenied
from simral.context import AppContext
from simral.reading.dashboard import turnaround
from simral.web.auth import request_principal
from simral.web.layout import Language, page, request_language, table

PERIODS = (1, 7, 30, 90, 365)

TEXT: dict[Language, dict[str, str]] = {
    "fr": {
        "title": "Délais de téléradiologie",
        "period": "Période : {days} derniers jours",
        "other_periods": "Autres périodes :",
        "days": "{days} j",
        "none": "Aucune demande ni lecture sur la période.",
        "denied": "Vous n'avez pas accès à ce tableau de bord.",
        "site": "Site demandeur",
        "group": "Groupe de lecture",
        "modality": "Modalité",
        "priority": "Priorité",
        "requests": "Demandes (acceptées / refusées)",
        "answer": "Réponse (médiane / 90e centile)",
        "reported": "Comptes rendus signés",
        "ready": "Images complètes → CR",
        "whole": "Demande → CR",
        "late": "Hors délai (signés / en cours)",
        "escalated": "Alertes",
        "backlog": "En attente",
        "urgent": "urgent",
        "routine": "standard",
        "minutes": "{value} min",
        "hours": "{value} h",
        "help": "Durées en médiane / 90e centile. « Hors délai » : comptes rendus signés après "
        "l'échéance, et lectures en attente dont l'échéance est passée.",
    },
    "en": {
        "title": "Teleradiology turnaround",
        "period": "Period: last {days} days",
        "other_periods": "Other periods:",
        "days": "{days} d",
        "none": "No request and no reading in the period.",
        "denied": "You have no access to this dashboard.",
        "site": "Requesting site",
        "group": "Reading group",
        "modality": "Modality",
        "priority": "Priority",
        "requests": "Requests (accepted / refused)",
        "answer": "Answer (median / 90th pct.)",
        "reported": "Signed reports",
        "ready": "Images complete → report",
        "whole": "Request → report",
        "late": "Late (signed / pending)",
        "escalated": "Alerts",
        "backlog": "Backlog",
        "urgent": "urgent",
        "routine": "routine",
        "minutes": "{value} min",
        "hours": "{value} h",
        "help": "Durations as median / 90th percentile. “Late”: reports signed after the deadline, "
        "and pending readings whose deadline has passed.",
    },
}


def _duration(minutes: float | None, text: dict[str, str]) -> str:
    if minutes is None:
        return "—"
    if minutes >= 120:
        return text["hours"].format(value=f"{minutes / 60:.1f}")
    return text["minutes"].format(value=f"{minutes:.0f}")


def _pair(row: dict[str, Any], name: str, text: dict[str, str]) -> str:
    """Median / 90th percentile, kept on one line."""
    pair = f"{_duration(row[f'{name}_median'], text)} / {_duration(row[f'{name}_p90'], text)}"
    return f'<span class="nowrap">{escape(pair)}</span>'


def _days(request: Request) -> int:
    try:
        days = int(request.query_params.get("days", "30"))
    except ValueError:
        return 30
    return days if days in PERIODS else 30


def mount_dashboard(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /reading/dashboard`` and ``GET /api/reading/dashboard`` to ``web``."""

    @web.get("/api/reading/dashboard")
    def dashboard_json(request: Request) -> Response:
        principal = request_principal(request)
        try:
            with ctx.db.reading() as session:
                rows = turnaround(session, principal=principal, days=_days(request))
        except AccessDenied:
            return JSONResponse({"error": "forbidden"}, status_code=403)
        return JSONResponse({"days": _days(request), "rows": rows})

    @web.get("/reading/dashboard", response_class=HTMLResponse)
    def dashboard_page(request: Request) -> Response:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        days = _days(request)
        try:
            with ctx.db.reading() as session:
                rows = turnaround(session, principal=principal, days=days)
        except AccessDenied:
            return page(
                request, text["title"], f"<p>{escape(text['denied'])}</p>", principal=principal, status=403
            )
        lang = f"&lang={language}" if request.query_params.get("lang") else ""
        periods = " ".join(
            f'<a href="/reading/dashboard?days={n}{lang}"{" aria-current=page" if n == days else ""}>'
            f"{escape(text['days'].format(days=n))}</a>"
            for n in PERIODS
        )
        body = (
            f"<p>{escape(text['period'].format(days=days))} — {escape(text['other_periods'])} {periods}</p>"
        )
        if not rows:
            body += f"<p>{escape(text['none'])}</p>"
        else:
            html_rows = []
            for row in rows:
                late = "late" if row["reported_late"] + row["late_now"] else ""
                cells = [
                    escape(row["site"]),
                    escape(row["group"] or "—"),
                    escape(row["modality"] or "—"),
                    escape(text.get(row["priority"], row["priority"])),
                    f"{row['requests']} ({row['accepted']} / {row['refused']})",
                    _pair(row, "answer_minutes", text),
                    str(row["reported"]),
                    _pair(row, "ready_to_report_minutes", text),
                    _pair(row, "request_to_report_minutes", text),
                    f'<span class="{late}">{row["reported_late"]} / {row["late_now"]}</span>',
                    str(row["escalated"]),
                    str(row["backlog"]),
                ]
                attributes = f' data-site="{escape(row["site"])}" data-priority="{escape(row["priority"])}"'
                html_rows.append(
                    f"<tr{attributes}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
                )
            headings = [
                text[k]
                for k in (
                    "site",
                    "group",
                    "modality",
                    "priority",
                    "requests",
                    "answer",
                    "reported",
                    "ready",
                    "whole",
                    "late",
                    "escalated",
                    "backlog",
                )
            ]
            body += table(headings, html_rows) + f'<p class="hint">{escape(text["help"])}</p>'
        return page(request, text["title"], body, principal=principal)
