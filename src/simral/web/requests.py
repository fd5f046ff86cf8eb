"""Imaging-request pages of the portal (DESIGN.md §7; ANS Téléradiologie flux 1 to 4).

- ``/requests`` — for a teleradiology group's radiologists (acting for the group): the requests
  routed to it, waiting ones first, urgent first, then by deadline, with the patient, modality,
  anatomy and clinical information; for a site's clinical members: their site's requests with
  their state and answer, and the "Nouvelle demande" form;
- ``/requests/{id}`` — the request's clinical content; the answer forms (accept with the imaging
  protocol, refuse with a reason) for the group's radiologists; cancellation for the site, and,
  once the request is accepted, the post-exam complement form of sites without a RIS (POST
  ``/requests/{id}/complement``: the same :func:`simral.reading.service.record_complement` as flux 4);
- ``/requests/new`` — the request form of sites without a RIS (the same
  :func:`simral.reading.service.receive_request` as flux 1), with its PDF documents (the request
  letter, prior reports) checked and stored by :mod:`simral.reading.documents`;
- ``/requests/{id}/documents/{document_id}`` — one attached document (PDF, ``Content-Disposition``),
  for who may see the request; every read is audited.

Every action is a POST with the session's CSRF token (or a bearer token); the reading service
checks the access policy, makes the change and audits it. French first, English with ``?lang=en``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from simral.access.policy import AccessDenied, Principal, may_request_exam, may_review_requests
from simral.context import AppContext
from simral.dmp import service as dmp
from simral.patients.models import INS_NIA_OID, INS_NIR_OID, INS_TEST_OID
from simral.patients.service import Ins, PatientError, Traits
from simral.reading import documents as request_documents
from simral.reading import reports, routing
from simral.reading import service as reading
from simral.reading.models import (
    PRIORITY_ROUTINE,
    PRIORITY_URGENT,
    PUBLICATION_DONE,
    REQUEST_ACCEPTED,
    REQUEST_PERFORMED,
    REQUEST_RECEIVED,
    REQUEST_REFUSED,
    ImagingRequest,
    RequestDocument,
)
from simral.reading.service import PatientRef, ReadingError, RequestDetails
from simral.reading.templates import dose_line
from simral.storage.base import CHUNK
from simral.web.auth import check_form_csrf, request_principal
from simral.web.dmp import DMP_PATH
from simral.web.dmp import state_label as dmp_state_label
from simral.web.layout import (
    LOCAL_TIME,
    Language,
    csrf_field,
    display_date,
    display_time,
    lang_param,
    page,
    request_language,
    table,
)
from simral.web.params import RowId

#: Modalities offered by the request form (DICOM CS, JDV_modalitedemandeActeImagerie-CISIS).
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "NM", "PT", "XA", "RF")
#: Desired delays offered by the request form (ISO 8601 durations).
DELAYS = ("", "PT1H", "PT4H", "PT24H", "P3D", "P7D")

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "requests": "Demandes d'examen",
        "request": "Demande d'examen",
        "new": "Nouvelle demande",
        "to_review": "Demandes adressées au groupe",
        "site_requests": "Demandes de la structure",
        "none": "Aucune demande.",
        "no_access": "Cette page est réservée aux radiologues d'un groupe de téléradiologie et aux "
        "professionnels d'une structure demandeuse (agissant pour elle).",
        "priority": "Priorité",
        "urgent": "Urgent",
        "routine": "Programmé",
        "due": "Échéance",
        "patient": "Patient",
        "modality": "Modalité",
        "anatomy": "Région anatomique",
        "clinical": "Renseignements cliniques",
        "site": "Structure",
        "state": "État",
        "answer": "Réponse",
        "open": "Ouvrir",
        "placer": "N° de demande",
        "received": "Reçue le",
        "requested_at": "Demandée le",
        "requester": "Médecin demandeur",
        "phone": "Téléphone",
        "desired_delay": "Délai souhaité",
        "appointment": "Rendez-vous",
        "justification": "Justification de la demande",
        "purpose": "Finalité de l'examen",
        "history": "Antécédents",
        "pregnancy": "Grossesse",
        "height": "Taille (cm)",
        "weight": "Poids (kg)",
        "consent": "Consentement du patient à l'interprétation à distance",
        "consent_given": "recueilli",
        "consent_unknown": "non transmis",
        "ins": "INS",
        "ipp": "IPP",
        "birth_date": "Date de naissance",
        "sex": "Sexe",
        "identity_status": "Statut de l'identité",
        "source": "Reçue par",
        "via_ris": "RIS de la structure (HL7)",
        "via_portal": "formulaire du portail",
        "protocol": "Protocole d'imagerie",
        "accept": "Accepter la demande",
        "do_accept": "Accepter et envoyer le protocole",
        "refusal_reason": "Motif du refus",
        "refuse": "Refuser la demande",
        "do_refuse": "Refuser",
        "cancel": "Annuler la demande",
        "cancel_reason": "Motif d'annulation",
        "do_cancel": "Annuler la demande",
        "answered_by": "Répondu par",
        "exam": "Examen réalisé",
        "accession": "N° d'examen (Accession Number)",
        "study_uid": "Study Instance UID",
        "exam_codes": "Actes",
        "viewer": "Visionneuse DRIMbox",
        "products": "Produits administrés",
        "equipment": "Appareil",
        "retention": "Conservation des images (jours)",
        "task": "Tâche de lecture",
        "accepted_notice": "Demande acceptée : le protocole est envoyé à la structure.",
        "refused_notice": "Demande refusée : le motif est envoyé à la structure.",
        "cancelled_notice": "Demande annulée.",
        "created_notice": "Demande enregistrée et adressée au groupe de téléradiologie.",
        "patient_section": "Patient",
        "request_section": "Demande",
        "clinical_section": "Contenu clinique",
        "ipp_hint": "IPP du patient dans la structure",
        "ins_matricule": "INS (matricule NIR/NIA, 15 caractères)",
        "ins_kind": "Type d'INS",
        "birth_name": "Nom de naissance",
        "first_given": "Premier prénom de naissance",
        "given_names": "Prénoms de naissance",
        "used_name": "Nom utilisé",
        "used_given": "Prénom utilisé",
        "birth_place": "Lieu de naissance (code INSEE)",
        "female": "Féminin",
        "male": "Masculin",
        "other": "Indéterminé",
        "yes": "Oui",
        "no": "Non",
        "unknown": "Inconnu",
        "none_selected": "—",
        "anatomy_text": "Région anatomique (libellé)",
        "subspecialty": "Surspécialité",
        "subspecialty_auto": "Déduite de la région anatomique",
        "subspecialty_none": "Aucune (général)",
        "set_subspecialty": "Modifier la surspécialité",
        "subspecialty_notice": "Surspécialité enregistrée.",
        "submit": "Envoyer la demande",
        "hours": "h",
        "PT1H": "1 heure",
        "PT4H": "4 heures",
        "PT24H": "24 heures",
        "P3D": "3 jours",
        "P7D": "7 jours",
        "times": "Heures de Paris.",
        "received_state": "En attente de réponse",
        "accepted_state": "Acceptée",
        "refused_state": "Refusée",
        "cancelled_state": "Annulée",
        "performed_state": "Examen réalisé",
        "reported_state": "Compte rendu envoyé",
        "back": "Retour aux demandes",
        "report_section": "Compte rendu",
        "report_version": "Version {version}",
        "report_addendum": "addendum",
        "report_signed": "signée le {when} par {who}",
        "report_pending": "publication en cours",
        "dmp_section": "Publication au DMP",
        "dmp_report": "Compte rendu v{version}",
        "dmp_manifest": "Manifeste d'images (KOS) v{version}",
        "dmp_all": "Toutes les publications au DMP du site",
        "report_pdf": "PDF",
        "report_cda": "CDA (CR-IMG)",
        "documents": "Documents joints",
        "document_kind": "Type",
        "document_title": "Titre",
        "document_date": "Date",
        "document_size": "Taille",
        "document_open": "Ouvrir (PDF)",
        "demande_document": "Demande d'examen",
        "anteriorite_document": "Antériorité",
        "autre_document": "Autre document",
        "documents_section": "Documents (PDF)",
        "request_document": "Demande d'examen signée (PDF)",
        "prior_documents": "Antériorités : comptes rendus, courriers (PDF, plusieurs possibles)",
        "kilobytes": "Ko",
        "performed_at": "Date et heure de l'examen",
        "dose": "Dose délivrée",
        "complement_origin": "Complément reçu de",
        "origin_ris": "RIS de la structure (HL7)",
        "origin_portal": "formulaire du portail",
        "origin_mpps": "modalité (MPPS)",
        "complement": "Complément post-examen",
        "complement_hint": "Pour une structure sans RIS : les informations de l'examen réalisé. Une fois "
        "le complément enregistré, la demande ne peut plus être annulée.",
        "complement_update": "Les valeurs saisies remplacent celles déjà reçues ; un champ laissé vide "
        "les conserve.",
        "study_uid_hint": "Study Instance UID (facultatif : celui de la liste de travail, ou une étude "
        "de la structure pour ce patient)",
        "equipment_model": "Appareil (fabricant, modèle)",
        "equipment_udi": "Identifiant de l'appareil (IUD), facultatif",
        "product_type": "Produit administré (nom ou code ATC)",
        "product_lot": "N° de lot",
        "product_quantity": "Quantité",
        "product_unit": "Unité",
        "ctdivol": "IDSV / CTDIvol (mGy)",
        "dlp": "PDL / DLP (mGy·cm)",
        "dap": "PDS / DAP (Gy·cm²)",
        "fluoro": "Durée de scopie (s)",
        "do_complement": "Enregistrer le complément",
        "complement_from_ris": "Cette demande vient du RIS de la structure : son complément post-examen "
        "arrive du RIS (flux 4) ou de la modalité (MPPS), pas du portail.",
        "complement_notice": "Complément post-examen enregistré : la demande ne peut plus être annulée.",
        "cancel_refused": "Annulation impossible : l'examen a été réalisé et son complément post-examen "
        "reçu le {when}. La demande {placer} reste « Examen réalisé ».",
    },
    "en": {
        "requests": "Imaging requests",
        "request": "Imaging request",
        "new": "New request",
        "to_review": "Requests sent to the group",
        "site_requests": "The site's requests",
        "none": "No request.",
        "no_access": "This page is for the radiologists of a teleradiology group and the professionals "
        "of a requesting site (acting for it).",
        "priority": "Priority",
        "urgent": "Urgent",
        "routine": "Routine",
        "due": "Due",
        "patient": "Patient",
        "modality": "Modality",
        "anatomy": "Anatomy",
        "clinical": "Clinical information",
        "site": "Site",
        "state": "State",
        "answer": "Answer",
        "open": "Open",
        "placer": "Request number",
        "received": "Received",
        "requested_at": "Requested",
        "requester": "Requesting physician",
        "phone": "Phone",
        "desired_delay": "Desired delay",
        "appointment": "Appointment",
        "justification": "Reason for the request",
        "purpose": "Purpose of the exam",
        "history": "History",
        "pregnancy": "Pregnancy",
        "height": "Height (cm)",
        "weight": "Weight (kg)",
        "consent": "Patient's consent to remote interpretation",
        "consent_given": "obtained",
        "consent_unknown": "not sent",
        "ins": "INS",
        "ipp": "IPP",
        "birth_date": "Birth date",
        "sex": "Sex",
        "identity_status": "Identity status",
        "source": "Received through",
        "via_ris": "the site's RIS (HL7)",
        "via_portal": "the portal form",
        "protocol": "Imaging protocol",
        "accept": "Accept the request",
        "do_accept": "Accept and send the protocol",
        "refusal_reason": "Reason for refusal",
        "refuse": "Refuse the request",
        "do_refuse": "Refuse",
        "cancel": "Cancel the request",
        "cancel_reason": "Reason for cancellation",
        "do_cancel": "Cancel the request",
        "answered_by": "Answered by",
        "exam": "Exam performed",
        "accession": "Accession Number",
        "study_uid": "Study Instance UID",
        "exam_codes": "Procedures",
        "viewer": "DRIMbox viewer",
        "products": "Administered products",
        "equipment": "Equipment",
        "retention": "Image retention (days)",
        "task": "Reading task",
        "accepted_notice": "Request accepted: the protocol is sent to the site.",
        "refused_notice": "Request refused: the reason is sent to the site.",
        "cancelled_notice": "Request cancelled.",
        "created_notice": "Request recorded and sent to the teleradiology group.",
        "patient_section": "Patient",
        "request_section": "Request",
        "clinical_section": "Clinical content",
        "ipp_hint": "The patient's IPP at the site",
        "ins_matricule": "INS (NIR/NIA, 15 characters)",
        "ins_kind": "INS kind",
        "birth_name": "Birth name",
        "first_given": "First birth given name",
        "given_names": "Birth given names",
        "used_name": "Used name",
        "used_given": "Used given name",
        "birth_place": "Birth place (INSEE code)",
        "female": "Female",
        "male": "Male",
        "other": "Unknown",
        "yes": "Yes",
        "no": "No",
        "unknown": "Unknown",
        "none_selected": "—",
        "anatomy_text": "Anatomy (label)",
        "subspecialty": "Subspecialty",
        "subspecialty_auto": "From the anatomy",
        "subspecialty_none": "None (general)",
        "set_subspecialty": "Change the subspecialty",
        "subspecialty_notice": "Subspecialty saved.",
        "submit": "Send the request",
        "hours": "h",
        "PT1H": "1 hour",
        "PT4H": "4 hours",
        "PT24H": "24 hours",
        "P3D": "3 days",
        "P7D": "7 days",
        "times": "Paris time.",
        "received_state": "Waiting for an answer",
        "accepted_state": "Accepted",
        "refused_state": "Refused",
        "cancelled_state": "Cancelled",
        "performed_state": "Exam performed",
        "reported_state": "Report sent",
        "back": "Back to the requests",
        "report_section": "Report",
        "report_version": "Version {version}",
        "report_addendum": "addendum",
        "report_signed": "signed {when} by {who}",
        "report_pending": "being published",
        "dmp_section": "DMP publication",
        "dmp_report": "Report v{version}",
        "dmp_manifest": "Image manifest (KOS) v{version}",
        "dmp_all": "All the site's DMP publications",
        "report_pdf": "PDF",
        "report_cda": "CDA (CR-IMG)",
        "documents": "Attached documents",
        "document_kind": "Kind",
        "document_title": "Title",
        "document_date": "Date",
        "document_size": "Size",
        "document_open": "Open (PDF)",
        "demande_document": "Request",
        "anteriorite_document": "Prior document",
        "autre_document": "Other document",
        "documents_section": "Documents (PDF)",
        "request_document": "Signed request (PDF)",
        "prior_documents": "Prior reports and letters (PDF, several allowed)",
        "kilobytes": "kB",
        "performed_at": "Exam date and time",
        "dose": "Dose delivered",
        "complement_origin": "Complement received from",
        "origin_ris": "the site's RIS (HL7)",
        "origin_portal": "the portal form",
        "origin_mpps": "the modality (MPPS)",
        "complement": "Post-exam complement",
        "complement_hint": "For a site without a RIS: the exam as performed. Once the complement is "
        "recorded the request can no longer be cancelled.",
        "complement_update": "The values entered replace those received; a field left empty keeps them.",
        "study_uid_hint": "Study Instance UID (optional: the worklist's, or a study of this patient "
        "held by the site)",
        "equipment_model": "Equipment (manufacturer, model)",
        "equipment_udi": "Device identifier (UDI), optional",
        "product_type": "Administered product (name or ATC code)",
        "product_lot": "Lot number",
        "product_quantity": "Quantity",
        "product_unit": "Unit",
        "ctdivol": "CTDIvol (mGy)",
        "dlp": "DLP (mGy·cm)",
        "dap": "DAP (Gy·cm²)",
        "fluoro": "Fluoroscopy time (s)",
        "do_complement": "Record the complement",
        "complement_from_ris": "This request came from the site's RIS: its post-exam complement comes "
        "from the RIS (flux 4) or the modality (MPPS), not from the portal.",
        "complement_notice": "Post-exam complement recorded: the request can no longer be cancelled.",
        "cancel_refused": "Cannot cancel: the exam was performed and its post-exam complement received "
        "on {when}. Request {placer} stays 'Exam performed'.",
    },
}

NOTICES = ("accepted", "refused", "cancelled", "created", "subspecialty", "complement")
#: The reading service's refusals (:attr:`ReadingError.reason`) the page words itself (TEXT keys).
WORDED_REASONS = ("complement_from_ris",)


def _patient_name(patient: Mapping[str, Any], language: Language) -> str:
    name = " ".join(
        part for part in (patient.get("birth_name", ""), patient.get("first_birth_given_name", "")) if part
    )
    if patient.get("used_name") and patient.get("used_name") != patient.get("birth_name"):
        name += f" ({patient['used_name']})"
    born = display_date(str(patient.get("birth_date", "")), language)
    return f"{name}, {born}" if born else name


def _anatomy(request: ImagingRequest) -> str:
    return ", ".join(str(item.get("display") or item.get("code", "")) for item in request.anatomy or [])


def _state(text: Mapping[str, str], state: str) -> str:
    return text.get(f"{state}_state", state)


def _priority(text: Mapping[str, str], priority: str) -> str:
    label = text["urgent"] if priority == PRIORITY_URGENT else text["routine"]
    css = "urgent" if priority == PRIORITY_URGENT else "routine"
    return f'<span class="priority {css}">{escape(label)}</span>'


def _short(value: str, limit: int = 140) -> str:
    flat = " ".join(value.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _rows(pairs: list[tuple[str, str]]) -> str:
    """A two-column table of label / value (values already escaped HTML)."""
    body = "".join(f'<tr><th scope="row">{escape(label)}</th><td>{value}</td></tr>' for label, value in pairs)
    return f'<table class="compare single"><tbody>{body}</tbody></table>'


def _multiline(value: str) -> str:
    return "<br>".join(escape(line) for line in value.splitlines()) if value else ""


def _local_datetime(value: str) -> datetime | None:
    """An ``<input type=datetime-local>`` value (Paris time) in UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ReadingError(f"unreadable date and time {value!r}", code="102") from None
    return parsed.replace(tzinfo=LOCAL_TIME).astimezone(UTC)


def _number(value: str) -> float | None:
    if not value:
        return None
    try:
        return float(value.replace(",", "."))
    except ValueError:
        raise ReadingError(f"not a number: {value!r}", code="102") from None


def _report_versions(ctx: AppContext, request_id: int, text: Mapping[str, str], language: Language) -> str:
    """The signed versions of the request's report with their documents (ANS flux 5)."""
    with ctx.db.reading() as session:
        versions = reports.signed_for_request(session, request_id)
        rows = []
        for report in versions:
            label = text["report_version"].format(version=report.version)
            if report.version > 1:
                label += f" ({text['report_addendum']})"
            signed = text["report_signed"].format(
                when=display_time(report.signed_at, language), who=report.author_name or report.author
            )
            if report.publication_state == PUBLICATION_DONE:
                links = (
                    f'<a href="/reports/{report.id}/report.pdf">{escape(text["report_pdf"])}</a> · '
                    f'<a href="/reports/{report.id}/report.xml">{escape(text["report_cda"])}</a>'
                )
            else:
                links = escape(text["report_pending"])
            rows.append(
                f'<tr data-report="{report.id}"><th scope="row">{escape(label)}</th>'
                f"<td>{escape(signed)}</td><td>{links}</td></tr>"
            )
    if not rows:
        return ""
    return f'<h2>{escape(text["report_section"])}</h2><table class="reports">{"".join(rows)}</table>'


def _dmp_publications(
    ctx: AppContext, request_id: int, text: Mapping[str, str], language: Language, *, site_member: bool
) -> str:
    """Where the DMP publication of the request's documents stands (DESIGN.md §8), with the reason
    when a document waits or failed; for the site's members, the link to all the site's (``/dmp``)."""
    with ctx.db.reading() as session:
        rows = dmp.statuses(session, request_id=request_id)
    if not rows:
        return ""
    items = []
    for row in reversed(rows):
        label = text["dmp_report" if row.kind == "report" else "dmp_manifest"].format(version=row.version)
        state = dmp_state_label(row, language)
        reason = f" — {escape(row.reason)}" if row.reason else ""
        items.append(
            f'<tr data-dmp="{row.id}" data-state="{escape(row.state)}"><th scope="row">{escape(label)}</th>'
            f"<td>{escape(state)}{reason}</td></tr>"
        )
    more = f'<p><a href="{DMP_PATH}">{escape(text["dmp_all"])}</a></p>' if site_member else ""
    return f'<h2>{escape(text["dmp_section"])}</h2><table class="dmp">{"".join(items)}</table>{more}'


def _documents(ctx: AppContext, request_id: int, text: Mapping[str, str], language: Language) -> str:
    """The request's attached documents with their links (the read of each is audited)."""
    with ctx.db.reading() as session:
        rows = request_documents.list_documents(session, request_id)
    if not rows:
        return ""
    lines = []
    for row in rows:
        when = display_time(row.document_date, language)[:10] if row.document_date else ""
        size = f"{max(1, round(row.size / 1024))} {text['kilobytes']}"
        link = f"/requests/{request_id}/documents/{row.id}"
        lines.append(
            f'<tr data-document="{row.id}"><td>{escape(text.get(row.kind + "_document", row.kind))}</td>'
            f"<td>{escape(row.title)}</td><td>{escape(when)}</td><td>{escape(size)}</td>"
            f'<td><a href="{link}" target="_blank" rel="noopener">'
            f"{escape(text['document_open'])}</a></td></tr>"
        )
    headings = "".join(
        f'<th scope="col">{escape(text[key])}</th>'
        for key in ("document_kind", "document_title", "document_date", "document_size")
    )
    return (
        f'<h2>{escape(text["documents"])}</h2><table class="documents"><thead><tr>{headings}<th></th>'
        f"</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    )


def _download_name(document: RequestDocument) -> str:
    """``Content-Disposition`` for a document: an ASCII name and the title (RFC 6266, RFC 5987)."""
    fallback = f"{document.kind}-{document.id}.pdf"
    title = re.sub(r"[\\/:*?\"<>|\x00-\x1f]+", " ", document.title).strip()[:120]
    if not title:
        return f'inline; filename="{fallback}"'
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{quote(title + '.pdf')}"


def mount_requests(web: FastAPI, ctx: AppContext) -> None:
    """Add the imaging-request pages to ``web``."""

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:4000] for k, v in form.items() if isinstance(v, str)}

    def _error(request: Request, principal: Principal, message: str, status: int) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = (
            f'<p class="error" role="alert">{escape(message)}</p>'
            f'<p><a href="/requests">{escape(text["back"])}</a></p>'
        )
        return page(request, text["requests"], body, principal=principal, status=status)

    def _redirect(path: str, request: Request, notice: str) -> RedirectResponse:
        lang = lang_param(request)
        query = f"?done={notice}" + (f"&lang={lang}" if lang else "")
        return RedirectResponse(path + query, status_code=303)

    def _failure(request: Request, principal: Principal, exc: Exception) -> HTMLResponse:
        if isinstance(exc, AccessDenied):
            return _error(request, principal, str(exc), 403)
        if isinstance(exc, ReadingError) and exc.code == "204":
            return _error(request, principal, str(exc), 404)
        if isinstance(exc, ReadingError) and exc.code == "206":  # HL7 0357: record locked
            return _error(request, principal, str(exc), 409)
        if isinstance(exc, ReadingError) and exc.reason in WORDED_REASONS:
            return _error(request, principal, TEXT[request_language(request)][exc.reason], 400)
        return _error(request, principal, str(exc), 400)

    def _notice(request: Request, text: Mapping[str, str]) -> str:
        done = request.query_params.get("done", "")
        if done not in NOTICES:
            return ""
        return f'<p class="message" role="status">{escape(text[done + "_notice"])}</p>'

    # ------------------------------------------------------------------------ the list

    @web.get("/requests", response_class=HTMLResponse)
    def requests_page(request: Request) -> HTMLResponse:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        with ctx.db.reading() as session:
            role = reading.workspace(session, principal)
            items = reading.list_requests(session, principal=principal)
        if not role:
            body = f'<p class="error" role="alert">{escape(text["no_access"])}</p>'
            return page(request, text["requests"], body, principal=principal, status=403)
        reviewer = role == reading.WORKSPACE_GROUP
        rows = []
        for item in items:
            link = f'<a href="/requests/{item.id}">{escape(_patient_name(item.patient or {}, language))}</a>'
            waiting = " waiting" if item.state == REQUEST_RECEIVED else ""
            if reviewer:
                cells = [
                    _priority(text, item.priority),
                    f'<span class="nowrap">{escape(display_time(item.due_at, language))}</span>',
                    f'<span class="nowrap">{escape(display_time(item.created_at, language))}</span>',
                    link,
                    escape(item.modality),
                    escape(_anatomy(item)),
                    escape(_short(item.justification or item.clinical_history)),
                    escape(item.site_code),
                    escape(_state(text, item.state)),
                ]
            else:
                answer = item.protocol if item.state != REQUEST_REFUSED else item.refusal_reason
                cells = [
                    escape(item.placer_number),
                    link,
                    escape(item.modality),
                    _priority(text, item.priority),
                    escape(_state(text, item.state)),
                    escape(_short(answer, 100)),
                    f'<span class="nowrap">{escape(display_time(item.due_at, language))}</span>',
                ]
            rows.append(
                f'<tr class="request{waiting}" data-request="{item.id}">'
                + "".join(f"<td>{cell}</td>" for cell in cells)
                + "</tr>"
            )
        if reviewer:
            headings = [
                text["priority"],
                text["due"],
                text["received"],
                text["patient"],
                text["modality"],
                text["anatomy"],
                text["clinical"],
                text["site"],
                text["state"],
            ]
            title = text["to_review"]
        else:
            headings = [
                text["placer"],
                text["patient"],
                text["modality"],
                text["priority"],
                text["state"],
                text["answer"],
                text["due"],
            ]
            title = text["site_requests"]
        body = _notice(request, text)
        if role == reading.WORKSPACE_SITE:
            body += f'<p><a class="button" href="/requests/new">{escape(text["new"])}</a></p>'
        body += f"<h2>{escape(title)} — {escape(principal.organisation)}</h2>"
        body += table(headings, rows) if rows else f"<p>{escape(text['none'])}</p>"
        body += f'<p class="hint">{escape(text["times"])}</p>'
        return page(request, text["requests"], body, principal=principal)

    # ------------------------------------------------------------------- one request

    def _answer_forms(request: Request, item: ImagingRequest, text: Mapping[str, str]) -> str:
        return (
            f'<section class="answer"><h2>{escape(text["accept"])}</h2>'
            f'<form class="stack" method="post" action="/requests/{item.id}/accept">{csrf_field(request)}'
            f"<label>{escape(text['protocol'])}"
            '<textarea name="protocol" rows="8" required></textarea></label>'
            f'<button type="submit" class="primary">{escape(text["do_accept"])}</button></form>'
            f"<h2>{escape(text['refuse'])}</h2>"
            f'<form class="stack" method="post" action="/requests/{item.id}/refuse">{csrf_field(request)}'
            f"<label>{escape(text['refusal_reason'])}"
            '<textarea name="reason" rows="3" required></textarea></label>'
            f'<button type="submit" class="secondary">{escape(text["do_refuse"])}</button></form></section>'
        )

    def _subspecialty_options(request: Request) -> list[tuple[str, str]]:
        language = request_language(request)
        return [(code, routing.subspecialty_label(code, language)) for code in routing.SUBSPECIALTIES]

    def _subspecialty_form(request: Request, item: ImagingRequest, text: Mapping[str, str]) -> str:
        """The reviewing radiologist corrects the subspecialty (routing of the reading task)."""
        options = "".join(
            f'<option value="{escape(code)}"{" selected" if code == item.subspecialty else ""}>'
            f"{escape(label)}</option>"
            for code, label in [("", text["subspecialty_none"]), *_subspecialty_options(request)]
        )
        return (
            f'<section class="answer"><h2>{escape(text["set_subspecialty"])}</h2>'
            f'<form class="stack" method="post" action="/requests/{item.id}/subspecialty">'
            f"{csrf_field(request)}"
            f'<label>{escape(text["subspecialty"])}<select name="subspecialty">{options}</select></label>'
            f'<button type="submit" class="secondary">{escape(text["set_subspecialty"])}</button>'
            "</form></section>"
        )

    def _cancel_form(request: Request, item: ImagingRequest, text: Mapping[str, str]) -> str:
        return (
            f'<section class="answer"><h2>{escape(text["cancel"])}</h2>'
            f'<form class="stack" method="post" action="/requests/{item.id}/cancel">{csrf_field(request)}'
            f'<label>{escape(text["cancel_reason"])}<input name="reason" required></label>'
            f'<button type="submit" class="secondary">{escape(text["do_cancel"])}</button></form></section>'
        )

    def _complement_rows(item: ImagingRequest, text: Mapping[str, str], language: Language) -> str:
        complement = item.complement or {}
        codes = ", ".join(
            f"{c.get('display') or c.get('code', '')} ({c.get('code', '')})"
            for c in complement.get("exam_codes", [])
        )
        products = "; ".join(
            " ".join(str(p.get(k, "")) for k in ("type", "lot", "quantity", "unit") if p.get(k))
            for p in complement.get("products", [])
        )
        equipment = "; ".join(
            " — ".join(str(e.get(k, "")) for k in ("udi", "model", "station") if e.get(k))
            for e in complement.get("equipment", [])
        )
        performed = complement.get("performed_at") or ""
        when = display_time(datetime.fromisoformat(performed), language) if performed else ""
        dose = dose_line(dict(complement.get("dose") or {}), language)
        dose = dose.split(":", 1)[1].strip() if ":" in dose else dose
        origins = ", ".join(text.get(f"origin_{o}", o) for o in complement.get("origins") or [])
        pairs = [
            (text["accession"], escape(item.accession_number)),
            (text["study_uid"], f"<code>{escape(item.study_uid)}</code>"),
            (text["performed_at"], escape(when)),
            (text["exam_codes"], escape(codes)),
            (text["products"], escape(products)),
            (text["equipment"], escape(equipment)),
            (text["dose"], escape(dose)),
            (text["retention"], escape(str(complement.get("retention_days") or ""))),
            (text["viewer"], escape(str(complement.get("viewer_url", "")))),
            (text["complement_origin"], escape(origins)),
        ]
        return (
            f'<h2>{escape(text["exam"])}</h2><div class="complement">'
            + _rows([p for p in pairs if p[1]])
            + "</div>"
        )

    def _complement_form(
        request: Request,
        item: ImagingRequest,
        text: Mapping[str, str],
        principal: Principal,
    ) -> str:
        """The post-exam complement form of a site without a RIS (ANS flux 4 by hand)."""
        with ctx.db.reading() as session:
            step = reading.scheduled_procedure(session, item)
            studies = reading.site_studies(session, item, principal=principal)
        accession = item.accession_number or (step.accession_number if step is not None else "")
        study_uid = item.study_uid or (step.study_uid if step is not None else "")
        options = "".join(
            f'<option value="{escape(study.study_uid)}" label="'
            + escape(
                " ".join(
                    part
                    for part in (
                        display_date(study.study_date, request_language(request)),
                        study.modalities.replace("\\", "/"),
                        study.description,
                        study.accession_number,
                    )
                    if part
                )
            )
            + '"></option>'
            for study in studies
        )

        def field(label: str, name: str, kind: str = "text", value: str = "", extra: str = "") -> str:
            shown = f' value="{escape(value)}"' if value else ""
            return f'<label>{escape(label)}<input type="{kind}" name="{name}"{shown}{extra}></label>'

        number = ' inputmode="decimal" pattern="[0-9]+([.,][0-9]+)?"'
        hint = text["complement_update"] if item.state == REQUEST_PERFORMED else text["complement_hint"]
        return (
            f'<section class="answer complement-form"><h2>{escape(text["complement"])}</h2>'
            f"<p>{escape(hint)}</p>"
            f'<form class="stack" method="post" action="/requests/{item.id}/complement">'
            f"{csrf_field(request)}"
            + field(text["accession"], "accession_number", value=accession, extra=' maxlength="16" required')
            + field(
                text["study_uid_hint"],
                "study_uid",
                value=study_uid,
                extra=' maxlength="64" pattern="[0-9]+(\\.[0-9]+)*" list="site-studies"',
            )
            + f'<datalist id="site-studies">{options}</datalist>'
            + field(
                text["performed_at"],
                "performed_at",
                "datetime-local",
                extra="" if item.state == REQUEST_PERFORMED else " required",
            )
            + field(text["equipment_model"], "equipment_model", extra=' maxlength="128"')
            + field(text["equipment_udi"], "equipment_udi", extra=' maxlength="128"')
            + '<div class="measures">'
            + field(text["product_type"], "product_type", extra=' maxlength="128"')
            + field(text["product_lot"], "product_lot", extra=' maxlength="64"')
            + field(text["product_quantity"], "product_quantity", extra=number)
            + field(text["product_unit"], "product_unit", extra=' maxlength="16"')
            + "</div>"
            + '<div class="measures">'
            + field(text["ctdivol"], "ctdivol_mgy", extra=number)
            + field(text["dlp"], "dlp_mgycm", extra=number)
            + field(text["dap"], "dap_gycm2", extra=number)
            + field(text["fluoro"], "fluoro_seconds", extra=number)
            + "</div>"
            + f'<button type="submit" class="primary">{escape(text["do_complement"])}</button>'
            + "</form></section>"
        )

    @web.get("/requests/new", response_class=HTMLResponse)
    def new_request_page(request: Request) -> HTMLResponse:
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        with ctx.db.reading() as session:
            role = reading.workspace(session, principal)
        if role != reading.WORKSPACE_SITE:
            body = f'<p class="error" role="alert">{escape(text["no_access"])}</p>'
            return page(request, text["new"], body, principal=principal, status=403)
        return page(request, text["new"], _request_form(request, text), principal=principal)

    def _request_form(request: Request, text: Mapping[str, str]) -> str:
        def field(label: str, name: str, kind: str = "text", required: bool = False, extra: str = "") -> str:
            star = " required" if required else ""
            return f'<label>{escape(label)}<input type="{kind}" name="{name}"{star}{extra}></label>'

        def select(label: str, name: str, options: list[tuple[str, str]]) -> str:
            items = "".join(f'<option value="{escape(v)}">{escape(lbl)}</option>' for v, lbl in options)
            return f'<label>{escape(label)}<select name="{name}">{items}</select></label>'

        ins_kinds = [("NIR", "NIR"), ("NIA", "NIA")]
        if ctx.settings.ins_test_oids_allowed:
            ins_kinds.append(("TEST", "NIR (test)"))
        return (
            f'<form class="request-form" method="post" action="/requests" enctype="multipart/form-data">'
            f"{csrf_field(request)}"
            f"<fieldset><legend>{escape(text['patient_section'])}</legend>"
            + field(text["ipp_hint"], "ipp", required=True)
            + field(text["birth_name"], "birth_name", required=True)
            + field(text["first_given"], "first_birth_given_name", required=True)
            + field(text["given_names"], "birth_given_names")
            + field(text["used_name"], "used_name")
            + field(text["used_given"], "used_given_name")
            + select(text["sex"], "sex", [("F", text["female"]), ("M", text["male"]), ("U", text["other"])])
            + field(text["birth_date"], "birth_date", "date", required=True)
            + field(text["birth_place"], "birth_place_code", extra=' pattern="[0-9AB]{5}"')
            + field(text["ins_matricule"], "ins", extra=' pattern="[0-9AB]{15}"')
            + select(text["ins_kind"], "ins_kind", ins_kinds)
            + "</fieldset>"
            f"<fieldset><legend>{escape(text['request_section'])}</legend>"
            + select(text["modality"], "modality", [(m, m) for m in MODALITIES])
            + field(text["anatomy_text"], "anatomy", required=True)
            + select(
                text["subspecialty"],
                "subspecialty",
                [("", text["subspecialty_auto"]), *_subspecialty_options(request)],
            )
            + select(
                text["priority"],
                "priority",
                [(PRIORITY_ROUTINE, text["routine"]), (PRIORITY_URGENT, text["urgent"])],
            )
            + select(
                text["desired_delay"],
                "desired_delay",
                [(d, text[d] if d else text["none_selected"]) for d in DELAYS],
            )
            + field(text["appointment"], "appointment_at", "datetime-local")
            + "</fieldset>"
            f'<fieldset class="clinical"><legend>{escape(text["clinical_section"])}</legend>'
            f"<label>{escape(text['justification'])}"
            '<textarea name="justification" required></textarea></label>'
            f'<label>{escape(text["purpose"])}<textarea name="purpose"></textarea></label>'
            f'<label>{escape(text["history"])}<textarea name="clinical_history"></textarea></label>'
            '<div class="measures">'
            + select(
                text["pregnancy"],
                "pregnancy",
                [
                    ("", text["none_selected"]),
                    ("N", text["no"]),
                    ("Y", text["yes"]),
                    ("UNK", text["unknown"]),
                ],
            )
            + field(text["height"], "height_cm", "number", extra=' min="20" max="250"')
            + field(text["weight"], "weight_kg", "number", extra=' min="0.5" max="400" step="0.1"')
            + "</div>"
            + f'<label class="choice"><input type="checkbox" name="consent" value="1" required> '
            f"{escape(text['consent'])}</label>"
            "</fieldset>"
            f'<fieldset class="documents"><legend>{escape(text["documents_section"])}</legend>'
            + field(
                text["request_document"], "request_document", "file", extra=' accept="application/pdf,.pdf"'
            )
            + field(
                text["prior_documents"],
                "prior_documents",
                "file",
                extra=' accept="application/pdf,.pdf" multiple',
            )
            + "</fieldset>"
            f'<button type="submit" class="primary">{escape(text["submit"])}</button></form>'
        )

    async def _uploads(request: Request) -> list[request_documents.DocumentUpload]:
        """The request form's PDF files, checked (:func:`simral.reading.documents.read_document`)."""
        limit = ctx.settings.request_document_max_bytes
        found = []
        for name, value in (await request.form()).multi_items():
            if not isinstance(value, UploadFile) or not value.filename:
                continue
            if name not in ("request_document", "prior_documents"):
                continue
            data = await value.read(limit + 1)
            found.append(
                request_documents.read_document(
                    data,
                    max_bytes=limit,
                    label=value.filename,
                    kind=request_documents.KIND_REQUEST
                    if name == "request_document"
                    else request_documents.KIND_PRIOR,
                    title=value.filename.rsplit(".", 1)[0] if "." in value.filename else value.filename,
                )
            )
        return found

    @web.post("/requests")
    async def create_request(request: Request) -> Response:
        principal, form = await _form(request)
        ins_oids = {"NIR": INS_NIR_OID, "NIA": INS_NIA_OID, "TEST": INS_TEST_OID}
        try:
            matricule = form.get("ins", "").upper()
            ins = (
                Ins(matricule, ins_oids.get(form.get("ins_kind", "NIR"), INS_NIR_OID)) if matricule else None
            )
            anatomy_label = form.get("anatomy", "")
            patient = PatientRef(
                traits=Traits(
                    birth_name=form.get("birth_name", ""),
                    birth_given_names=form.get("birth_given_names", "")
                    or form.get("first_birth_given_name", ""),
                    first_birth_given_name=form.get("first_birth_given_name", ""),
                    sex=form.get("sex", ""),
                    birth_date=form.get("birth_date", "").replace("-", ""),
                    birth_place_code=form.get("birth_place_code", ""),
                    used_name=form.get("used_name", ""),
                    used_given_name=form.get("used_given_name", ""),
                ),
                ipp=form.get("ipp", ""),
                ins=ins,
            )
            details = RequestDetails(
                placer_number=f"W{datetime.now(UTC):%y%m%d}{secrets.token_hex(4).upper()}",
                requested_at=datetime.now(UTC),
                priority=form.get("priority", PRIORITY_ROUTINE),
                desired_delay=form.get("desired_delay", ""),
                justification=form.get("justification", ""),
                clinical_history=form.get("clinical_history", ""),
                purpose=form.get("purpose", ""),
                modality=form.get("modality", ""),
                anatomy=[{"code": "", "system": "", "display": anatomy_label}] if anatomy_label else [],
                subspecialty=form.get("subspecialty", ""),
                pregnancy=form.get("pregnancy", ""),
                height_cm=_number(form.get("height_cm", "")),
                weight_kg=_number(form.get("weight_kg", "")),
                consent=form.get("consent") == "1",
                appointment_at=_local_datetime(form.get("appointment_at", "")),
                requester={
                    key: value
                    for key, value in (
                        ("id", principal.national_id),
                        ("family", principal.display_name or principal.name),
                        ("facility", principal.organisation),
                    )
                    if value
                },
            )
            if not details.consent:
                raise ReadingError("the patient's consent to remote interpretation is required", code="101")
            uploads = await _uploads(request)
            with ctx.db.unit_of_work() as session:
                created = reading.receive_request(
                    session,
                    site_code=principal.organisation,
                    patient=patient,
                    details=details,
                    principal=principal,
                    source=reading.PORTAL_SOURCE,
                    allow_test_ins=ctx.settings.ins_test_oids_allowed,
                )
                request_documents.attach_documents(
                    session, ctx.store, created, uploads, principal=principal, source=reading.PORTAL_SOURCE
                )
                request_id = created.id
        except (ReadingError, AccessDenied, PatientError) as exc:
            return _failure(request, principal, exc)
        return _redirect(f"/requests/{request_id}", request, "created")

    @web.get("/requests/{request_id}", response_class=HTMLResponse)
    def request_page(request: Request, request_id: RowId) -> HTMLResponse:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        try:
            with ctx.db.unit_of_work() as session:
                item = reading.get_request(session, request_id, principal=principal)
                session.expunge(item)
        except (ReadingError, AccessDenied) as exc:
            return _failure(request, principal, exc)
        patient = item.patient or {}
        requester = item.requester or {}
        ins = f"{patient.get('ins', '')} ({patient.get('ins_oid', '')})" if patient.get("ins") else ""
        patient_rows = [
            (text["patient"], escape(_patient_name(patient, language))),
            (text["sex"], escape(str(patient.get("sex", "")))),
            (text["ins"], escape(ins)),
            (text["ipp"], escape(str(patient.get("ipp", "")))),
            (text["identity_status"], escape(str(patient.get("status", "")))),
        ]
        pregnancy = {"Y": text["yes"], "N": text["no"], "UNK": text["unknown"]}.get(
            item.pregnancy, item.pregnancy
        )
        doctor = " ".join(
            str(requester.get(k, "")) for k in ("prefix", "family", "given") if requester.get(k)
        )
        if requester.get("id"):
            doctor += f" ({requester['id']})"
        request_rows = [
            (text["placer"], escape(item.placer_number)),
            (text["site"], escape(item.site_code)),
            (text["priority"], _priority(text, item.priority)),
            (text["due"], escape(display_time(item.due_at, language))),
            (text["desired_delay"], escape(text.get(item.desired_delay, item.desired_delay))),
            (text["appointment"], escape(display_time(item.appointment_at, language))),
            (text["requested_at"], escape(display_time(item.requested_at, language))),
            (text["received"], escape(display_time(item.created_at, language))),
            (text["requester"], escape(doctor)),
            (text["phone"], escape(str(requester.get("phone", "")))),
            (
                text["source"],
                escape(text["via_portal"] if item.source == reading.PORTAL_SOURCE else text["via_ris"]),
            ),
            (text["state"], f'<strong class="state">{escape(_state(text, item.state))}</strong>'),
        ]
        clinical_rows = [
            (text["modality"], escape(item.modality)),
            (text["anatomy"], escape(_anatomy(item))),
            (text["subspecialty"], escape(routing.subspecialty_label(item.subspecialty, language))),
            (text["justification"], _multiline(item.justification)),
            (text["purpose"], _multiline(item.purpose)),
            (text["history"], _multiline(item.clinical_history)),
            (text["pregnancy"], escape(pregnancy)),
            (text["height"], escape(f"{item.height_cm:g}") if item.height_cm is not None else ""),
            (text["weight"], escape(f"{item.weight_kg:g}") if item.weight_kg is not None else ""),
        ]
        if item.source == reading.PORTAL_SOURCE:
            clinical_rows.append(
                (text["consent"], escape(text["consent_given"] if item.consent else text["consent_unknown"]))
            )
        body = _notice(request, text)
        body += f'<div class="request-columns"><section><h2>{escape(text["clinical_section"])}</h2>'
        body += _rows([p for p in clinical_rows if p[1]])
        body += f"</section><section><h2>{escape(text['patient_section'])}</h2>"
        body += _rows([p for p in patient_rows if p[1]])
        body += f"<h2>{escape(text['request_section'])}</h2>" + _rows([p for p in request_rows if p[1]])
        body += "</section></div>"
        body += _documents(ctx, item.id, text, language)
        if item.state != REQUEST_RECEIVED and (item.protocol or item.refusal_reason):
            answer_rows = [
                (text["protocol"], _multiline(item.protocol)),
                (text["refusal_reason"], _multiline(item.refusal_reason)),
                (
                    text["answered_by"],
                    escape(f"{item.answered_by} — {display_time(item.answered_at, language)}"),
                ),
            ]
            body += f"<h2>{escape(text['answer'])}</h2>" + _rows([p for p in answer_rows if p[1]])
        if item.accession_number and item.complement:
            body += _complement_rows(item, text, language)
        body += _report_versions(ctx, item.id, text, language)
        body += _dmp_publications(
            ctx, item.id, text, language, site_member=may_request_exam(principal, item.site_code)
        )
        if item.state == REQUEST_RECEIVED and may_review_requests(principal, item.group_code):
            body += _answer_forms(request, item, text)
        if item.state in (REQUEST_RECEIVED, REQUEST_ACCEPTED, REQUEST_PERFORMED) and may_review_requests(
            principal, item.group_code
        ):
            body += _subspecialty_form(request, item, text)
        if (
            item.source == reading.PORTAL_SOURCE  # a RIS sends its own (flux 4)
            and item.state in (REQUEST_ACCEPTED, REQUEST_PERFORMED)
            and may_request_exam(principal, item.site_code)
        ):
            body += _complement_form(request, item, text, principal)
        if item.state in (REQUEST_RECEIVED, REQUEST_ACCEPTED, REQUEST_REFUSED) and may_request_exam(
            principal, item.site_code
        ):
            body += _cancel_form(request, item, text)
        body += f'<p><a href="/requests">{escape(text["back"])}</a></p>'
        title = f"{text['request']} {item.placer_number}"
        return page(request, title, body, principal=principal)

    @web.get("/requests/{request_id}/documents/{document_id}")
    def request_document(request: Request, request_id: RowId, document_id: RowId) -> Response:
        principal = request_principal(request)
        try:
            with ctx.db.unit_of_work() as session:
                _item, document = request_documents.get_document(
                    session, request_id, document_id, principal=principal
                )
                session.expunge(document)
        except (ReadingError, AccessDenied) as exc:
            return _failure(request, principal, exc)
        stream = request_documents.open_document(ctx.store, document)

        def chunks() -> Iterator[bytes]:
            with stream:
                while chunk := stream.read(CHUNK):
                    yield chunk

        return StreamingResponse(
            chunks(),
            media_type=document.media_type,
            headers={
                "Content-Disposition": _download_name(document),
                "Content-Length": str(document.size),
                "Cache-Control": "private, no-store",
            },
        )

    # ------------------------------------------------------------------------ actions

    async def _act(
        request: Request,
        request_id: int,
        notice: str,
        change: Callable[[Session, Principal, dict[str, str]], object],
    ) -> Response:
        """A reviewer's or the site's form action on one request, in one unit of work."""
        principal, form = await _form(request)
        try:
            with ctx.db.unit_of_work() as session:
                change(session, principal, form)
        except (ReadingError, AccessDenied) as exc:
            return _failure(request, principal, exc)
        return _redirect(f"/requests/{request_id}", request, notice)

    @web.post("/requests/{request_id}/accept")
    async def accept(request: Request, request_id: RowId) -> Response:
        return await _act(
            request,
            request_id,
            "accepted",
            lambda session, principal, form: reading.accept_request(
                session, request_id, protocol=form.get("protocol", ""), principal=principal
            ),
        )

    @web.post("/requests/{request_id}/refuse")
    async def refuse(request: Request, request_id: RowId) -> Response:
        return await _act(
            request,
            request_id,
            "refused",
            lambda session, principal, form: reading.refuse_request(
                session, request_id, reason=form.get("reason", ""), principal=principal
            ),
        )

    @web.post("/requests/{request_id}/subspecialty")
    async def subspecialty(request: Request, request_id: RowId) -> Response:
        return await _act(
            request,
            request_id,
            "subspecialty",
            lambda session, principal, form: reading.set_subspecialty(
                session, request_id, subspecialty=form.get("subspecialty", ""), principal=principal
            ),
        )

    @web.post("/requests/{request_id}/cancel")
    async def cancel(request: Request, request_id: RowId) -> Response:
        language = request_language(request)

        def change(session: Session, principal: Principal, form: dict[str, str]) -> None:
            item = reading.get_request(session, request_id, principal=principal, audited=False)
            try:
                reading.cancel_request(session, item, reason=form.get("reason", ""), principal=principal)
            except ReadingError as exc:
                if exc.code != "206":
                    raise
                received = str((item.complement or {}).get("received_at") or "")
                when = display_time(datetime.fromisoformat(received), language) if received else "?"
                message = TEXT[language]["cancel_refused"].format(when=when, placer=item.placer_number)
                raise ReadingError(message, code="206") from exc

        return await _act(request, request_id, "cancelled", change)

    @web.post("/requests/{request_id}/complement")
    async def complement(request: Request, request_id: RowId) -> Response:
        """The post-exam complement entered by the site (ANS flux 4 for sites without a RIS): the
        form translated to a :class:`reading.Complement`; the service refuses it for a request
        that came from the site's RIS and defaults what the form leaves empty."""

        def decimal(form: dict[str, str], key: str) -> str:
            value = _number(form.get(key, ""))
            if value is not None and value < 0:
                raise ReadingError(f"not a positive number: {form.get(key)!r}", code="102")
            return f"{value:g}" if value is not None else ""

        def change(session: Session, principal: Principal, form: dict[str, str]) -> None:
            item = reading.get_request(session, request_id, principal=principal, audited=False)
            product = {
                "type": form.get("product_type", "")[:128],
                "lot": form.get("product_lot", "")[:64],
                "quantity": decimal(form, "product_quantity"),
                "unit": form.get("product_unit", "")[:16],
            }
            device = {
                "udi": form.get("equipment_udi", "")[:128],
                "model": form.get("equipment_model", "")[:128],
            }
            given = reading.Complement(
                accession_number=form.get("accession_number", ""),
                study_uid=form.get("study_uid", ""),
                performed_at=_local_datetime(form.get("performed_at", "")),
                modality=item.modality,
                products=[{k: v for k, v in product.items() if v}] if product["type"] else [],
                equipment=[{k: v for k, v in device.items() if v}] if any(device.values()) else [],
                dose={key: decimal(form, key) for key in reading.DOSE_KEYS if form.get(key)},
            )
            reading.record_complement(
                session, item, given, principal=principal, origin=reading.COMPLEMENT_PORTAL
            )

        return await _act(request, request_id, "complement", change)
