"""Server-rendered pages: the study list ("Examens") at ``/``.

Studies come from the archive's query service (PS3.4 C.6.2.1 Study Root, STUDY level), filtered by
the access policy for the request's principal, exactly as a C-FIND or QIDO-RS query would be.
Wording is French first; English with ``?lang=en`` or a browser preferring English (RFC 9110
§12.5.4 Accept-Language).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from html import escape
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydicom.dataset import Dataset

from simral.access.policy import AccessDenied
from simral.archive import query
from simral.context import AppContext
from simral.web.auth import request_principal
from simral.web.layout import Language, display_date, explicit_language, page, request_language

#: Rows shown on the study list; a narrower search finds the others.
STUDY_LIST_LIMIT = 200


TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Examens",
        "name": "Nom du patient",
        "patient_id": "IPP",
        "date_from": "Du",
        "date_to": "Au",
        "search": "Rechercher",
        "reset": "Effacer",
        "date": "Date",
        "modalities": "Modalités",
        "description": "Description",
        "accession": "N° d'accession",
        "series": "Séries",
        "instances": "Images",
        "none": "Aucun examen ne correspond à la recherche.",
        "truncated": "Seuls les {n} examens les plus récents sont affichés : affinez la recherche.",
        "bad_date": "Date invalide : {value} (format attendu AAAA-MM-JJ).",
        "open": "Ouvrir dans le visualiseur",
        "other_language": "English",
        "denied": "Accès refusé.",
        "bad_query": "Recherche invalide.",
    },
    "en": {
        "title": "Studies",
        "name": "Patient name",
        "patient_id": "Patient ID",
        "date_from": "From",
        "date_to": "To",
        "search": "Search",
        "reset": "Clear",
        "date": "Date",
        "modalities": "Modalities",
        "description": "Description",
        "accession": "Accession number",
        "series": "Series",
        "instances": "Instances",
        "none": "No study matches the search.",
        "truncated": "Only the {n} most recent studies are shown: narrow the search.",
        "bad_date": "Invalid date: {value} (expected YYYY-MM-DD).",
        "open": "Open in the viewer",
        "other_language": "Français",
        "denied": "Access denied.",
        "bad_query": "Invalid search.",
    },
}


def _person_name(value: str) -> str:
    """A DICOM PN (PS3.5 §6.2.1) for display: components joined by spaces, groups by " / "."""
    groups = [" ".join(c for c in group.split("^") if c).strip() for group in value.split("=")]
    return " / ".join(g for g in groups if g)


def _display_time(value: str) -> str:
    digits = value.split(".")[0]
    return f"{digits[:2]}:{digits[2:4]}" if len(digits) >= 4 and digits[:4].isdigit() else ""


def _dicom_date(value: str) -> str:
    """``YYYY-MM-DD`` (HTML date input) or ``YYYYMMDD`` as a DICOM DA; raises ValueError otherwise."""
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        value = f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return dt.date.fromisoformat(value).strftime("%Y%m%d")


def study_identifier(
    *, name: str = "", patient_id: str = "", date_from: str = "", date_to: str = ""
) -> Dataset:
    """The Study Root STUDY-level identifier for the list's search (PS3.4 C.6.2.1.2 keys).

    ``name`` matches anywhere in the patient name, case-insensitively (words become ``*``);
    ``patient_id`` exactly unless it holds ``*``/``?``; dates are ``YYYY-MM-DD`` bounds of a range.
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    words = name.split()
    identifier.PatientName = "*" + "*".join(words) + "*" if words else ""
    identifier.PatientID = patient_id.strip()
    low = _dicom_date(date_from) if date_from.strip() else ""
    high = _dicom_date(date_to) if date_to.strip() else ""
    identifier.StudyDate = f"{low}-{high}" if low or high else ""
    for keyword in (
        "StudyTime",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ):
        setattr(identifier, keyword, "")
    return identifier


def viewer_url(study_uid: str, language: Language | None = None, *, priors: Sequence[str] = ()) -> str:
    """The OHIF viewer's URL for a study and, beside it, earlier studies of the patient
    (``/viewer/viewer?StudyInstanceUIDs=current,prior1,...``)."""
    params = {"StudyInstanceUIDs": ",".join([study_uid, *priors])}
    if language is not None:
        params["lang"] = language
    return "/viewer/viewer?" + urlencode(params)


def mount_pages(web: FastAPI, ctx: AppContext) -> None:
    """Add the server-rendered pages to ``web``."""

    @web.get("/", response_class=HTMLResponse)
    def study_list(
        request: Request, name: str = "", patient_id: str = "", date_from: str = "", date_to: str = ""
    ) -> HTMLResponse:
        """The study list, newest first, each study linking to the viewer."""
        language = request_language(request)
        text = TEXT[language]
        explicit = explicit_language(request)
        message = ""
        status = 200
        rows: list[query.Result] = []
        principal = request_principal(request)
        bad_date = next((d for d in (date_from, date_to) if not _valid_date(d)), None)
        if bad_date is not None:
            message, status = text["bad_date"].format(value=bad_date), 400
        else:
            identifier = study_identifier(
                name=name, patient_id=patient_id, date_from=date_from, date_to=date_to
            )
            try:
                with ctx.db.reading() as session:
                    rows = list(
                        query.run(
                            session,
                            query.plan(identifier),
                            principal=principal,
                            limit=STUDY_LIST_LIMIT + 1,
                            newest_first=True,
                        )
                    )
            except query.QueryError:
                message, status = text["bad_query"], 400
            except AccessDenied:
                message, status = text["denied"], 403
        if len(rows) > STUDY_LIST_LIMIT:
            rows = rows[:STUDY_LIST_LIMIT]
            message = text["truncated"].format(n=STUDY_LIST_LIMIT)
        elif not rows and not message:
            message = text["none"]
        body = _render(
            language,
            explicit,
            rows,
            message,
            {"name": name, "patient_id": patient_id, "date_from": date_from, "date_to": date_to},
        )
        response = page(request, text["title"], body, principal=principal, status=status)
        response.headers["Vary"] = "Accept-Language"
        return response


def _valid_date(value: str) -> bool:
    """Whether ``value`` is empty or a date :func:`_dicom_date` reads."""
    try:
        if value.strip():
            _dicom_date(value)
    except ValueError:
        return False
    return True


def _render(
    language: Language,
    explicit: Language | None,
    rows: list[query.Result],
    message: str,
    form: Mapping[str, str],
) -> str:
    text = TEXT[language]
    hidden_lang = f'<input type="hidden" name="lang" value="{escape(explicit)}">' if explicit else ""

    def field(key: str, kind: str = "text") -> str:
        value = escape(form[key])
        return f'<label>{escape(text[key])}<input type="{kind}" name="{key}" value="{value}"></label>'

    body_rows = []
    for result in rows:
        study, patient = result.study, result.patient
        assert study is not None
        link = escape(viewer_url(study.study_uid, explicit))
        when = f"{display_date(study.study_date, language)} {_display_time(study.study_time)}".strip()
        display_name = escape(_person_name(patient.name)) or "?"
        cells = [
            f'<a href="{link}" title="{escape(text["open"])}">{display_name}</a>',
            escape(patient.patient_id),
            escape(when),
            escape(study.modalities.replace("\\", ", ")),
            f'<a href="/studies/{escape(study.study_uid)}">{escape(study.description) or "…"}</a>',
            escape(study.accession_number),
        ]
        counts = [str(study.num_series), str(study.num_instances)]
        body_rows.append(
            "<tr>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "".join(f'<td class="num">{c}</td>' for c in counts)
            + "</tr>"
        )
    headings = ["name", "patient_id", "date", "modalities", "description", "accession", "series", "instances"]
    notice = f'<p class="message" role="status">{escape(message)}</p>' if message else ""
    return (
        f'<form method="get" action="/" role="search">{field("name")}{field("patient_id")}'
        f"{field('date_from', 'date')}{field('date_to', 'date')}{hidden_lang}"
        f'<button type="submit">{escape(text["search"])}</button>'
        f'<a href="/{"?lang=" + explicit if explicit else ""}">{escape(text["reset"])}</a></form>'
        f"{notice}<table><thead><tr>"
        + "".join(f'<th scope="col">{escape(text[h])}</th>' for h in headings)
        + "</tr></thead><tbody>"
        + "".join(body_rows)
        + "</tbody></table>"
    )
