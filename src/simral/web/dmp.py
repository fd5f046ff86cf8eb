"""DMP publication as the sites see it (DESIGN.md §8).

- The wording of a document entry's state: every state a :class:`~simral.dmp.models.DmpDocument`
  can take (:data:`~simral.dmp.models.DMP_STATES`) in French and English, used by the request page
  (``/requests/{id}``) and ``/dmp``; a state this module would not know is shown as it is rather
  than breaking the page.
- ``/dmp`` — the organisation acted for: all its DMP entries (reports signed in simral or received
  from its RIS, with or without an imaging request, and manifests) with their state and reason,
  dates, patient and exam (:func:`simral.dmp.views.site_documents`: its clinical members only, the
  patients shown audited); ``?state=`` one state. French first, English with ``?lang=en``.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from simral.access.policy import AccessDenied
from simral.context import AppContext
from simral.dmp import views
from simral.dmp.models import DMP_STATES
from simral.dmp.service import DocumentStatus
from simral.dmp.views import SiteDocument
from simral.web.auth import request_principal
from simral.web.layout import Language, display_date, display_time, lang_param, page, request_language, table

DMP_PATH = "/dmp"

#: The state of a document entry; ``{when}``: the publication (published) or the withdrawal date.
STATE_TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "pending": "en attente d'envoi",
        "waiting": "en attente",
        "published": "publié le {when}",
        "failed": "échec",
        "replaced": "remplacé par une version plus récente",
        "deleted": "retiré du DMP le {when} (suppression logique)",
        "masked": "masqué aux professionnels de santé le {when}",
    },
    "en": {
        "pending": "queued",
        "waiting": "waiting",
        "published": "published on {when}",
        "failed": "failed",
        "replaced": "replaced by a newer version",
        "deleted": "withdrawn from the DMP on {when} (logically deleted)",
        "masked": "masked to health professionals on {when}",
    },
}

#: The states as the filter names them.
SHORT_STATE_TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "pending": "en attente d'envoi",
        "waiting": "en attente",
        "published": "publié",
        "failed": "échec",
        "replaced": "remplacé",
        "deleted": "retiré (supprimé)",
        "masked": "masqué aux professionnels",
    },
    "en": {
        "pending": "queued",
        "waiting": "waiting",
        "published": "published",
        "failed": "failed",
        "replaced": "replaced",
        "deleted": "withdrawn (deleted)",
        "masked": "masked to professionals",
    },
}


def state_label(row: DocumentStatus, language: Language) -> str:
    """The entry's state in the reader's language (an unknown state as it is)."""
    wording = STATE_TEXT[language].get(row.state)
    if wording is None:
        return row.state
    moment = row.published_at if row.state == "published" else row.updated_at
    return wording.format(when=display_time(moment, language))


# ------------------------------------------------------------------------------- the site's list

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Publications au DMP",
        "intro": (
            "Documents publiés au DMP pour le compte de {organisation} : comptes rendus signés dans "
            "simral ou reçus du RIS, et manifestes d'images (KOS)."
        ),
        "none": "Aucun document publié ni en attente de publication au DMP.",
        "no_access": "Cette page est réservée aux professionnels qui suivent les examens du site.",
        "document": "Document",
        "patient": "Patient",
        "exam": "Examen",
        "source": "Origine",
        "state": "État",
        "created": "Créé le",
        "updated": "Mis à jour le",
        "report": "Compte rendu v{version}",
        "manifest": "Manifeste d'images (KOS) v{version}",
        "from_simral": "signé dans simral",
        "from_ris": "reçu du RIS {name}",
        "request": "demande",
        "all_states": "Tous les états",
        "filter": "Filtrer",
    },
    "en": {
        "title": "DMP publications",
        "intro": (
            "Documents published to the DMP on behalf of {organisation}: reports signed in simral or "
            "received from the RIS, and image manifests (KOS)."
        ),
        "none": "No document published or waiting to be published to the DMP.",
        "no_access": "This page is for the professionals who follow the site's exams.",
        "document": "Document",
        "patient": "Patient",
        "exam": "Exam",
        "source": "Source",
        "state": "State",
        "created": "Created",
        "updated": "Updated",
        "report": "Report v{version}",
        "manifest": "Image manifest (KOS) v{version}",
        "from_simral": "signed in simral",
        "from_ris": "received from the RIS {name}",
        "request": "request",
        "all_states": "All states",
        "filter": "Filter",
    },
}


def _source(item: SiteDocument, text: Mapping[str, str]) -> str:
    status = item.status
    if status.source.startswith("ris:"):
        label = escape(text["from_ris"].format(name=status.source[4:]))
    else:
        label = escape(text["from_simral"])
    if status.request_id is not None:
        label += f' — <a href="/requests/{status.request_id}">{escape(text["request"])}</a>'
    return label


def _row(item: SiteDocument, text: Mapping[str, str], language: Language) -> str:
    status = item.status
    kind = text["report" if status.kind == "report" else "manifest"].format(version=status.version)
    patient = escape(item.patient_name)
    if item.patient_id:
        patient += f" <small>({escape(item.patient_id)})</small>"
    exam = " — ".join(
        escape(part)
        for part in (item.accession_number, display_date(item.study_date, language), item.study_description)
        if part
    )
    exam += f'<br><small class="uid">{escape(status.study_uid)}</small>'
    state = escape(state_label(status, language))
    if status.reason:
        state += f" — {escape(status.reason)}"
    cells = [
        escape(kind),
        patient,
        exam,
        _source(item, text),
        f'<span class="state">{state}</span>',
        f'<span class="nowrap">{escape(display_time(item.created_at, language))}</span>',
        f'<span class="nowrap">{escape(display_time(status.updated_at, language))}</span>',
    ]
    return (
        f'<tr data-dmp="{status.id}" data-state="{escape(status.state)}">'
        + "".join(f"<td>{cell}</td>" for cell in cells)
        + "</tr>"
    )


def _filter(request: Request, text: Mapping[str, str], language: Language, chosen: str) -> str:
    options = [f'<option value="">{escape(text["all_states"])}</option>']
    for state in DMP_STATES:
        label = SHORT_STATE_TEXT[language].get(state, state)
        selected = " selected" if state == chosen else ""
        options.append(f'<option value="{state}"{selected}>{escape(label)}</option>')
    lang = lang_param(request)
    hidden = f'<input type="hidden" name="lang" value="{escape(lang)}">' if lang else ""
    return (
        f'<form method="get" action="{DMP_PATH}" class="filter"><label>{escape(text["state"])} '
        f'<select name="state">{"".join(options)}</select></label>{hidden}'
        f'<button type="submit">{escape(text["filter"])}</button></form>'
    )


def mount_dmp(web: FastAPI, ctx: AppContext) -> None:
    """Add the site's DMP publications page (``/dmp``) to ``web``."""

    @web.get(DMP_PATH, response_class=HTMLResponse)
    def dmp_page(request: Request) -> HTMLResponse:
        """The organisation acted for: its DMP entries, newest first (``?state=`` one state)."""
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        organisation = principal.organisation
        chosen = request.query_params.get("state", "").strip()[:16]
        try:
            with ctx.db.unit_of_work() as session:  # the patients shown are audited
                items = views.site_documents(
                    session, principal=principal, organisation=organisation, state=chosen or None
                )
        except AccessDenied:
            body = f'<p class="error" role="alert">{escape(text["no_access"])}</p>'
            return page(request, text["title"], body, principal=principal, status=403)
        body = f"<p>{escape(text['intro'].format(organisation=organisation))}</p>"
        body += _filter(request, text, language, chosen)
        if not items:
            body += f'<p class="empty">{escape(text["none"])}</p>'
        else:
            headings = [
                text["document"],
                text["patient"],
                text["exam"],
                text["source"],
                text["state"],
                text["created"],
                text["updated"],
            ]
            body += table(headings, [_row(item, text, language) for item in items]).replace(
                "<table>", '<table class="dmp">', 1
            )
        return page(request, text["title"], body, principal=principal)
