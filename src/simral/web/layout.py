"""Page layout shared by the portal's pages: language choice, header, navigation, stylesheet.

French first; English with ``?lang=en`` or a browser preferring English (RFC 9110 §12.5.4). Styles
live in ``/static/simral.css`` (no inline styles: the Content-Security-Policy forbids them).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from typing import Literal
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Request
from fastapi.responses import HTMLResponse

from simral.access.policy import (
    Principal,
    dashboard_scope,
    may_manage,
    may_manage_identities,
    may_read_audit,
    may_request_exam,
    may_review_requests,
    may_share,
    may_store,
)

Language = Literal["fr", "en"]
LANGUAGES: tuple[Language, ...] = ("fr", "en")


def explicit_language(request: Request) -> Language | None:
    """The language asked for with ``?lang=fr|en``, if any."""
    value = request.query_params.get("lang", "").strip().lower()[:2]
    return value if value in LANGUAGES else None  # type: ignore[return-value]


def request_language(request: Request) -> Language:
    """``?lang=``, else the preferred of French/English in Accept-Language (RFC 9110 §12.5.4), else French."""
    explicit = explicit_language(request)
    if explicit is not None:
        return explicit
    best: tuple[float, Language] = (0.0, "fr")
    for item in request.headers.get("accept-language", "").split(","):
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in LANGUAGES:
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > best[0]:
            best = (quality, primary)  # type: ignore[assignment]
    return best[1]


NAV_TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "studies": "Examens",
        "shares": "Partages",
        "import": "Importer",
        "turnaround": "Délais",
        "requests": "Demandes",
        "reading": "Lecture",
        "dmp": "DMP",
        "audit": "Traçabilité",
        "vigilance": "Identitovigilance",
        "admin": "Administration",
        "account": "Mon compte",
        "logout": "Se déconnecter",
        "other_language": "English",
        "act_for": "Agir pour",
        "switch": "Changer",
    },
    "en": {
        "studies": "Studies",
        "shares": "Shares",
        "import": "Import",
        "turnaround": "Turnaround",
        "requests": "Requests",
        "reading": "Reading",
        "dmp": "DMP",
        "audit": "Audit trail",
        "vigilance": "Identity vigilance",
        "admin": "Administration",
        "account": "My account",
        "logout": "Log out",
        "other_language": "Français",
        "act_for": "Acting for",
        "switch": "Switch",
    },
}

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1a1a1a}
h1{font-size:1.5rem;margin:0 0 1rem}h2{font-size:1.15rem}
header{display:flex;justify-content:space-between;align-items:baseline;gap:1rem;flex-wrap:wrap}
nav{display:flex;gap:1rem;align-items:baseline}
form{display:flex;gap:.75rem;flex-wrap:wrap;align-items:end;margin-bottom:1rem}
form.stack{flex-direction:column;align-items:flex-start;max-width:28rem}
label{display:flex;flex-direction:column;font-size:.85rem;gap:.2rem}
input,textarea,select{padding:.3rem .4rem;font-size:1rem}
textarea{width:26rem;min-height:5rem}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.4rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-size:.85rem}
td.num{text-align:right}
tbody tr:hover{background:#f8fafc}
.message{padding:.5rem .75rem;background:#fff7e6;border:1px solid #f0c36d}
.error{padding:.5rem .75rem;background:#fdecea;border:1px solid #e0a19b}
.thumbs{display:flex;gap:.5rem;flex-wrap:wrap}.thumbs img{width:96px;height:96px;background:#000}
form.inline{margin:0}
nav label{flex-direction:row;align-items:baseline;gap:.4rem}
button.link{background:none;border:none;color:#0645ad;text-decoration:underline;cursor:pointer;font-size:1rem}
section.case{border:1px solid #cbd5e1;border-radius:4px;padding:.75rem 1rem;margin:0 0 1.25rem}
section.case h2{margin:0 0 .25rem}.case-no{font-weight:normal;color:#4b5563;font-size:1rem}
p.meta{margin:0 0 .75rem;color:#374151;font-size:.9rem}
table.compare{width:auto;min-width:44rem;margin-bottom:.75rem}
table.compare th[scope=row]{background:none;font-weight:600;width:16rem}
table.compare.single td{min-width:18rem}
tr.differs th,tr.differs td{background:#fff4d6}
mark{background:#fde68a;color:#1a1a1a;padding:0 .15rem}
.flag{display:block;font-weight:normal;color:#92400e;font-size:.8rem}
form.decision{flex-direction:column;align-items:flex-start;margin:0}
fieldset{border:1px solid #cbd5e1;padding:.4rem .75rem;display:flex;gap:1.25rem}
legend{font-size:.85rem;padding:0 .25rem}
label.choice{flex-direction:row;align-items:center;font-size:1rem;gap:.35rem}
.buttons{display:flex;gap:.5rem;flex-wrap:wrap}
p.hint{margin:0;font-size:.9rem;color:#374151}
form.undo{display:flex;gap:.4rem;align-items:end;flex-wrap:nowrap}
tr.undone td{color:#4b5563}
td.nowrap{white-space:nowrap}
form.media-import label.check{flex-direction:row;align-items:center;gap:.4rem}
form.media-import input[type=text]{max-width:20rem}form.media-import progress{width:20rem}
.priority{display:inline-block;padding:.05rem .45rem;border-radius:3px;font-size:.85rem;font-weight:600}
.priority.urgent{background:#b91c1c;color:#fff}.priority.routine{background:#e5e7eb;color:#1f2937}
tr.request.waiting td{font-weight:500}
.request-columns{display:flex;gap:2rem;flex-wrap:wrap;align-items:flex-start}
.request-columns table.compare{min-width:0;width:34rem;max-width:100%}
section.answer{border-top:1px solid #cbd5e1;margin-top:1.25rem;padding-top:.25rem}
section.answer textarea{width:40rem;max-width:90vw}
form.request-form{flex-direction:column;align-items:stretch;max-width:60rem}
form.request-form fieldset{flex-wrap:wrap;align-items:end}
form.request-form fieldset.clinical{flex-direction:column;align-items:flex-start;gap:.75rem}
form.request-form fieldset.clinical textarea{width:36rem;max-width:85vw}
form.request-form select{min-width:9rem}form.request-form button{align-self:flex-start}
div.measures{display:flex;gap:1.25rem;align-items:end}div.measures input{width:7rem}
button.secondary{background:#fff;border:1px solid #9ca3af}
button.primary{background:#1d4ed8;color:#fff;border:1px solid #1d4ed8;padding:.4rem .9rem;font-size:1rem}
span.nowrap{white-space:nowrap}
a.button{display:inline-block;padding:.35rem .8rem;background:#1d4ed8;color:#fff;text-decoration:none}
table.reading td{vertical-align:middle}.sub{display:block;font-size:.8rem;color:#4b5563}
.late{color:#b91c1c;font-weight:600}.left{font-weight:600}.sub.alerted{color:#92400e}
tr.overdue td{background:#fff1f2}tr.due-soon td{background:#fffbeb}.left.soon{color:#92400e}
form.assign label{flex-direction:row;align-items:center;gap:.3rem}
table.reading .buttons{align-items:center}
table.reading button,table.reading a.button{padding:.35rem .8rem;font-size:.95rem}
"""


def lang_param(request: Request) -> str:
    """The explicit ``lang`` query parameter, to carry over to a redirect."""
    value = request.query_params.get("lang", "")
    return value if value in ("fr", "en") else ""


def csrf_field(request: Request) -> str:
    """The hidden field carrying the session's CSRF token in a form posted with the session cookie."""
    token = escape(getattr(request.state, "csrf_token", ""))
    return f'<input type="hidden" name="csrf_token" value="{token}">'


def post_button(request: Request, action: str, label: str, *, aria_label: str = "", css: str = "") -> str:
    """A one-button form posting to ``action`` (logout, revoke, retry...), with the CSRF field."""
    described = f' aria-label="{escape(aria_label)}"' if aria_label else ""
    klass = f' class="{css}"' if css else ""
    return (
        f'<form class="inline" method="post" action="{escape(action)}">{csrf_field(request)}'
        f'<button{klass} type="submit"{described}>{escape(label)}</button></form>'
    )


def table(headings: list[str], rows: list[str]) -> str:
    """A table with column headings and rows already rendered as ``<tr>`` HTML."""
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def text_rows(rows: list[list[str]]) -> list[str]:
    """Rows of plain-text cells as escaped ``<tr>`` HTML."""
    return ["<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]


try:
    #: The time zone of the region's sites: timestamps are shown in it.
    LOCAL_TIME = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - systems without tzdata
    LOCAL_TIME = ZoneInfo("UTC")


def display_time(value: datetime | None, language: Language) -> str:
    """A timestamp in Paris time: DD/MM/YYYY HH:MM in French, YYYY-MM-DD HH:MM in English (naive:
    UTC, as the index stores them)."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    local = value.astimezone(LOCAL_TIME)
    return local.strftime("%d/%m/%Y %H:%M" if language == "fr" else "%Y-%m-%d %H:%M")


def display_date(value: str, language: Language) -> str:
    """A DICOM DA (YYYYMMDD) as a reader expects it: DD/MM/YYYY in French, YYYY-MM-DD in English."""
    if len(value) != 8 or not value.isdigit():
        return value
    year, month, day = value[:4], value[4:6], value[6:]
    return f"{day}/{month}/{year}" if language == "fr" else f"{year}-{month}-{day}"


def page(
    request: Request,
    title: str,
    body: str,
    *,
    principal: Principal | None = None,
    status: int = 200,
) -> HTMLResponse:
    """One portal page: header with navigation for ``principal``, then ``body``."""
    language = request_language(request)
    text = NAV_TEXT[language]
    other = "en" if language == "fr" else "fr"
    switch = request.url.path + "?" + urlencode({**dict(request.query_params), "lang": other})
    nav = ""
    if principal is not None:
        links = [f'<a href="/">{escape(text["studies"])}</a>']
        if may_share(principal):
            links.append(f'<a href="/shares">{escape(text["shares"])}</a>')
        if principal.kind == "user" and may_store(principal):
            links.append(f'<a href="/import">{escape(text["import"])}</a>')
        if principal.kind == "user" and (
            may_review_requests(principal, principal.organisation)
            or may_request_exam(principal, principal.organisation)
        ):
            links.append(f'<a href="/requests">{escape(text["requests"])}</a>')
        if principal.kind == "user" and may_review_requests(principal, principal.organisation):
            links.append(f'<a href="/reading">{escape(text["reading"])}</a>')
        if principal.kind == "user" and may_request_exam(principal, principal.organisation):
            links.append(f'<a href="/dmp">{escape(text["dmp"])}</a>')
        if principal.kind == "user" and dashboard_scope(principal) != (frozenset(), frozenset()):
            links.append(f'<a href="/reading/dashboard">{escape(text["turnaround"])}</a>')
        if may_read_audit(principal):
            links.append(f'<a href="/audit">{escape(text["audit"])}</a>')
        if may_manage_identities(principal):
            links.append(f'<a href="/identities/vigilance">{escape(text["vigilance"])}</a>')
        if may_manage(principal) or any(r == "site-admin" for _, r in principal.memberships):
            links.append(f'<a href="/admin">{escape(text["admin"])}</a>')
        who = escape(f"{principal.display_name or principal.name} — {principal.organisation}")
        links.append(
            f'<a href="/account" title="{escape(text["account"])}">{who}</a>'
            + post_button(request, "/logout", text["logout"], css="link")
        )
        organisations = sorted({code for code, _ in principal.memberships})
        if len(organisations) > 1:
            options = "".join(
                f'<option value="{escape(code)}"{" selected" if code == principal.organisation else ""}>'
                f"{escape(code)}</option>"
                for code in organisations
            )
            links.append(
                f'<form class="inline" method="post" action="/session/organisation">{csrf_field(request)}'
                f'<label>{escape(text["act_for"])} <select name="organisation">{options}</select></label>'
                f'<button type="submit">{escape(text["switch"])}</button></form>'
            )
        nav = "<nav>" + "".join(links) + "</nav>"
    html = (
        f'<!doctype html><html lang="{language}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} — simral</title>"
        '<link rel="stylesheet" href="/static/simral.css"></head><body>'
        f'<header><h1>{escape(title)}</h1>{nav}<a href="{escape(switch)}" hreflang="{other}">'
        f"{escape(text['other_language'])}</a></header><main>{body}</main></body></html>"
    )
    return HTMLResponse(
        html, status_code=status, headers={"Cache-Control": "no-store", "Content-Language": language}
    )
