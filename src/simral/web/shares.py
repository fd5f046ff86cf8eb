"""Sharing pages: share a study with a colleague or an organisation, viewer-only links, revocation.

- On a study page, a professional shares the study (or all the patient's studies) with a
  professional or an organisation, with a purpose and an expiry, or makes a viewer-only link for
  someone outside the platform (optionally asking the patient's birth date).
- ``/shares`` lists what was shared with the user ("partagés avec moi") and what they shared, with
  revocation.
- ``/s/{token}`` is the link's landing page: it checks the link (and the birth date), gives the
  visitor a sealed cookie valid only for the viewer and read-only DICOMweb, and opens OHIF on the
  link's studies. Everything is audited by the sharing service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from html import escape
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, is_patient_visitor, may_share
from simral.audit import service as audit
from simral.context import AppContext
from simral.sharing import service as sharing
from simral.web.auth import SHARE_COOKIE, check_form_csrf, forget_cached_principals, request_principal
from simral.web.layout import Language, csrf_field, display_date, page, post_button, request_language, table
from simral.web.params import RowId
from simral.web.viewer import VIEWER_PATH

DURATIONS: Mapping[str, timedelta] = {
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "shares": "Partages",
        "share": "Partager cet examen",
        "grantee_kind": "Avec",
        "user": "un professionnel (identifiant)",
        "organisation": "une structure (code)",
        "grantee": "Destinataire",
        "purpose": "Motif",
        "duration": "Durée",
        "whole_patient": "Tous les examens du patient",
        "do_share": "Partager",
        "link": "Lien de visualisation (hors plateforme)",
        "ask_birth_date": "Demander la date de naissance du patient",
        "do_link": "Créer le lien",
        "link_created": "Lien créé (affiché une seule fois, à transmettre de façon sûre) :",
        "received": "Partagés avec moi",
        "made": "Mes partages",
        "links": "Mes liens de visualisation",
        "study": "Examen",
        "by": "Par",
        "to": "Destinataire",
        "until": "Jusqu'au (UTC)",
        "revoke": "Révoquer",
        "none": "Aucun.",
        "open": "Ouvrir",
        "link_invalid": "Ce lien n'est pas valide : il a expiré, a été révoqué, ou n'existe pas.",
        "birth_date": "Date de naissance du patient",
        "continue": "Voir les images",
        "wrong_birth_date": "Date de naissance incorrecte.",
        "link_title": "Images partagées",
        "patient_link": "Accès du patient à ses images",
        "do_patient_link": "Créer l'accès patient",
        "patient_title": "Mes examens d'imagerie",
        "view": "Voir les images",
        "download": "Télécharger (CD virtuel : ZIP DICOM avec DICOMDIR)",
        "accesses": "Qui a consulté mes images",
        "when": "Date (UTC)",
        "who": "Qui",
        "what": "Action",
        "date": "Date",
        "description": "Examen",
        "1d": "1 jour",
        "7d": "7 jours",
        "30d": "30 jours",
        "90d": "90 jours",
    },
    "en": {
        "shares": "Shares",
        "share": "Share this study",
        "grantee_kind": "With",
        "user": "a professional (login)",
        "organisation": "an organisation (code)",
        "grantee": "Recipient",
        "purpose": "Purpose",
        "duration": "Duration",
        "whole_patient": "All the patient's studies",
        "do_share": "Share",
        "link": "Viewing link (outside the platform)",
        "ask_birth_date": "Ask for the patient's birth date",
        "do_link": "Make the link",
        "link_created": "Link made (shown once, hand it over securely):",
        "received": "Shared with me",
        "made": "My shares",
        "links": "My viewing links",
        "study": "Study",
        "by": "By",
        "to": "Recipient",
        "until": "Until (UTC)",
        "revoke": "Revoke",
        "none": "None.",
        "open": "Open",
        "link_invalid": "This link is not valid: it expired, was revoked, or does not exist.",
        "birth_date": "Patient's birth date",
        "continue": "See the images",
        "wrong_birth_date": "Wrong birth date.",
        "link_title": "Shared images",
        "patient_link": "Patient access to their images",
        "do_patient_link": "Make the patient access",
        "patient_title": "My imaging studies",
        "view": "See the images",
        "download": "Download (virtual CD: DICOM ZIP with DICOMDIR)",
        "accesses": "Who accessed my images",
        "when": "Date (UTC)",
        "who": "Who",
        "what": "Action",
        "date": "Date",
        "description": "Study",
        "1d": "1 day",
        "7d": "7 days",
        "30d": "30 days",
        "90d": "90 days",
    },
}


def _durations(text: Mapping[str, str], choices: tuple[str, ...]) -> str:
    options = "".join(f'<option value="{c}">{escape(text[c])}</option>' for c in choices)
    return f'<label>{escape(text["duration"])}<select name="duration">{options}</select></label>'


def share_forms(request: Request, principal: Principal, study_uid: str) -> str:
    """The share and link forms of a study page (professionals only)."""
    if not may_share(principal):
        return ""
    text = TEXT[request_language(request)]
    uid = escape(study_uid)
    kinds = "".join(f'<option value="{k}">{escape(text[k])}</option>' for k in ("user", "organisation"))
    return (
        f"<h2>{escape(text['share'])}</h2>"
        f'<form method="post" action="/studies/{uid}/shares">{csrf_field(request)}'
        f'<label>{escape(text["grantee_kind"])}<select name="grantee_kind">{kinds}</select></label>'
        f'<label>{escape(text["grantee"])}<input name="grantee" required></label>'
        f'<label>{escape(text["purpose"])}<input name="purpose" required></label>'
        + _durations(text, ("7d", "1d", "30d", "90d"))
        + '<label><span><input type="checkbox" name="whole_patient" value="1"> '
        f"{escape(text['whole_patient'])}</span></label>"
        f'<button type="submit">{escape(text["do_share"])}</button></form>'
        f"<h2>{escape(text['link'])}</h2>"
        f'<form id="link-form" method="post" action="/studies/{uid}/links">{csrf_field(request)}'
        f'<label>{escape(text["purpose"])}<input name="purpose" required></label>'
        + _durations(text, ("7d", "1d", "30d"))
        + f'<label><span><input type="checkbox" name="ask_birth_date" value="1" checked> '
        f"{escape(text['ask_birth_date'])}</span></label>"
        f'<button type="submit">{escape(text["do_link"])}</button></form>'
        f"<h2>{escape(text['patient_link'])}</h2>"
        f'<form id="patient-link-form" method="post" action="/studies/{uid}/links">{csrf_field(request)}'
        '<input type="hidden" name="audience" value="patient">'
        f'<input type="hidden" name="purpose" value="{escape(text["patient_link"])}">'
        + _durations(text, ("30d", "7d"))
        + f'<button type="submit">{escape(text["do_patient_link"])}</button></form>'
    )


def mount_shares(web: FastAPI, ctx: AppContext) -> None:
    """Add the share and link routes and pages to ``web``."""

    async def _form(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:500] for k, v in form.items() if isinstance(v, str)}

    def _error(request: Request, principal: Principal, message: str, status: int) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = f'<p class="error" role="alert">{escape(message)}</p>'
        return page(request, text["shares"], body, principal=principal, status=status)

    @web.post("/studies/{study_uid}/shares")
    async def share_study(request: Request, study_uid: str) -> Response:
        principal, form = await _form(request)
        try:
            with ctx.db.unit_of_work() as session:
                sharing.create_share(
                    session,
                    principal=principal,
                    study_uid=study_uid,
                    grantee_kind=form.get("grantee_kind", ""),
                    grantee=form.get("grantee", ""),
                    purpose=form.get("purpose", ""),
                    lifetime=DURATIONS.get(form.get("duration", ""), timedelta(0)),
                    whole_patient=form.get("whole_patient") == "1",
                )
        except sharing.ShareError as exc:
            return _error(request, principal, str(exc), 400)
        except AccessDenied as exc:
            return _error(request, principal, str(exc), 403)
        forget_cached_principals(ctx)
        return RedirectResponse("/shares", status_code=303)

    @web.post("/studies/{study_uid}/links", response_class=HTMLResponse)
    async def make_link(request: Request, study_uid: str) -> HTMLResponse:
        principal, form = await _form(request)
        text = TEXT[request_language(request)]
        try:
            with ctx.db.unit_of_work() as session:
                link = sharing.create_link(
                    session,
                    principal=principal,
                    study_uids=[study_uid],
                    purpose=form.get("purpose", ""),
                    lifetime=DURATIONS.get(form.get("duration", ""), timedelta(0)),
                    ask_birth_date=form.get("ask_birth_date") == "1",
                    audience=form.get("audience", "colleague"),
                )
        except sharing.ShareError as exc:
            return _error(request, principal, str(exc), 400)
        except AccessDenied as exc:
            return _error(request, principal, str(exc), 403)
        url = f"{request.base_url}s/{link.token}"
        body = (
            f'<p class="message">{escape(text["link_created"])}</p>'
            f'<p><input id="share-link" readonly size="90" value="{escape(url)}" '
            f'aria-label="{escape(text["link"])}"></p>'
            f'<p><a href="/shares">{escape(text["shares"])}</a></p>'
        )
        return page(request, text["link"], body, principal=principal)

    @web.get("/shares", response_class=HTMLResponse)
    def shares_page(request: Request) -> HTMLResponse:
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        with ctx.db.reading() as session:
            made, received = sharing.shares_for(session, principal)
            links = sharing.links_made_by(session, principal)
            rows_received = [
                "<tr>"
                + (
                    f'<td><a href="/studies/{escape(s.study_uid)}">{escape(s.study_uid)}</a></td>'
                    if s.study_uid
                    else f"<td>{escape(text['whole_patient'])}</td>"
                )
                + f"<td>{escape(s.created_by)} ({escape(s.created_by_organisation)})</td>"
                f"<td>{escape(s.purpose)}</td><td>{s.expires_at:%Y-%m-%d %H:%M}</td></tr>"
                for s in received
            ]
            rows_made = [
                f'<tr data-share="{s.id}"><td>{escape(s.study_uid or text["whole_patient"])}</td>'
                f"<td>{escape(s.grantee_kind)}:{escape(s.grantee)}</td><td>{escape(s.purpose)}</td>"
                f"<td>{s.expires_at:%Y-%m-%d %H:%M}</td>"
                f"<td>{post_button(request, f'/shares/{s.id}/revoke', text['revoke'])}</td></tr>"
                for s in made
            ]
            rows_links = [
                f'<tr data-link="{link.id}"><td>{escape(link.study_uids)}</td><td>{escape(link.purpose)}</td>'
                f"<td>{link.expires_at:%Y-%m-%d %H:%M}</td>"
                f"<td>{post_button(request, f'/links/{link.id}/revoke', text['revoke'])}</td></tr>"
                for link in links
            ]
        body = f"<h2>{escape(text['received'])}</h2>" + (
            table([text["study"], text["by"], text["purpose"], text["until"]], rows_received)
            if rows_received
            else f"<p>{escape(text['none'])}</p>"
        )
        body += f"<h2>{escape(text['made'])}</h2>" + (
            table([text["study"], text["to"], text["purpose"], text["until"], ""], rows_made)
            if rows_made
            else f"<p>{escape(text['none'])}</p>"
        )
        body += f"<h2>{escape(text['links'])}</h2>" + (
            table([text["study"], text["purpose"], text["until"], ""], rows_links)
            if rows_links
            else f"<p>{escape(text['none'])}</p>"
        )
        return page(request, text["shares"], body, principal=principal)

    async def _revoke_and_return(request: Request, revoke: Callable[[Session, Principal], None]) -> Response:
        principal, _ = await _form(request)
        try:
            with ctx.db.unit_of_work() as session:
                revoke(session, principal)
        except sharing.ShareError as exc:
            raise HTTPException(404, str(exc)) from None
        except AccessDenied as exc:
            raise HTTPException(403, str(exc)) from None
        forget_cached_principals(ctx)
        return RedirectResponse("/shares", status_code=303)

    @web.post("/shares/{share_id}/revoke")
    async def revoke_share(request: Request, share_id: RowId) -> Response:
        return await _revoke_and_return(
            request,
            lambda session, principal: sharing.revoke_share(session, principal=principal, share_id=share_id),
        )

    @web.post("/links/{link_id}/revoke")
    async def revoke_link(request: Request, link_id: RowId) -> Response:
        return await _revoke_and_return(
            request,
            lambda session, principal: sharing.revoke_link(session, principal=principal, link_id=link_id),
        )

    # ------------------------------------------------------------------ the link's landing page

    def _invalid(request: Request) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = f'<p class="error" role="alert">{escape(text["link_invalid"])}</p>'
        return page(request, text["link_title"], body, status=404)

    def _birth_date_form(request: Request, token: str, error: str = "") -> HTMLResponse:
        text = TEXT[request_language(request)]
        alert = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
        body = (
            f'{alert}<form class="stack" method="post" action="/s/{escape(token)}">'
            f'<label>{escape(text["birth_date"])}<input type="date" name="birth_date" required></label>'
            f'<button type="submit">{escape(text["continue"])}</button></form>'
        )
        return page(request, text["link_title"], body, status=400 if error else 200)

    def _open(request: Request, link: sharing.ShareLink, token: str) -> Response:
        viewer = f"{VIEWER_PATH}/viewer?StudyInstanceUIDs={quote(','.join(link.study_uids.split()))}"
        response = RedirectResponse("/patient" if link.audience == "patient" else viewer, status_code=303)
        response.set_cookie(
            SHARE_COOKIE,
            sharing.visitor_cookie(link, token),
            httponly=True,
            secure=request.url.scheme == "https" or ctx.settings.https,
            samesite="strict",
            path="/",
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    def _audit_open(request: Request, link: sharing.ShareLink, outcome: str) -> None:
        visitor = sharing.link_principal(link, address=request.client.host if request.client else "")
        for study_uid in link.study_uids.split():
            audit.record_now(
                ctx, action="share-link.open", principal=visitor, study_uid=study_uid, outcome=outcome
            )

    @web.get("/s/{token}", response_class=HTMLResponse)
    def open_link(request: Request, token: str) -> Response:
        with ctx.db.reading() as session:
            link = sharing.find_link(session, token)
            if link is not None:
                session.expunge(link)
        if link is None:
            return _invalid(request)
        if link.birth_date_check:
            return _birth_date_form(request, token)
        _audit_open(request, link, "success")
        return _open(request, link, token)

    @web.post("/s/{token}", response_class=HTMLResponse)
    async def check_link(request: Request, token: str) -> Response:
        form = await request.form()
        birth_date = str(form.get("birth_date", ""))[:10]
        with ctx.db.unit_of_work() as session:
            link = sharing.find_link(session, token)
            passed = link is not None and sharing.check_link_birth_date(session, link, birth_date)
            if link is not None:
                session.flush()
                session.expunge(link)
        if link is None:
            return _invalid(request)
        if not passed:
            _audit_open(request, link, "failure")
            return _birth_date_form(request, token, TEXT[request_language(request)]["wrong_birth_date"])
        _audit_open(request, link, "success")
        return _open(request, link, token)


def mount_patient_pages(web: FastAPI, ctx: AppContext) -> None:
    """The patient's page behind a patient link: studies, viewer, media download, and who accessed
    the images (from the audit trail)."""
    from simral.archive import service as archive
    from simral.identity import service as identity
    from simral.sharing.api import export_response
    from simral.web.portal import ACTION_LABELS

    def _patient(request: Request) -> Principal:
        principal = request_principal(request)
        if not is_patient_visitor(principal):
            raise HTTPException(403, "for the patient's own link only")
        return principal

    @web.get("/patient", response_class=HTMLResponse)
    def patient_page(request: Request) -> HTMLResponse:
        principal = _patient(request)
        language = request_language(request)
        text = TEXT[language]
        labels = ACTION_LABELS[language]
        uids = sorted(principal.shared)
        with ctx.db.reading() as session:
            studies = [archive.get_study(session, principal=principal, study_uid=uid) for uid in uids]
            accesses = sharing.accesses_to(session, uids)
            names: dict[str, str] = {}
            for record in accesses:
                kind, _, login = record.actor.partition(":")
                if kind == "user" and login not in names:
                    professional = identity.get_professional(session, login)
                    names[login] = professional.display_name if professional is not None else login
        rows = []
        for summary in studies:
            if summary is None:
                continue
            study = summary.study
            uid = escape(study.study_uid)
            rows.append(
                f"<tr><td>{escape(display_date(study.study_date, language))}</td>"
                f"<td>{escape(study.description)}</td>"
                f"<td>{escape(study.modalities)}</td>"
                f'<td><a href="{VIEWER_PATH}/viewer?StudyInstanceUIDs={uid}">{escape(text["view"])}</a></td>'
                f'<td><a href="/patient/studies/{uid}/export.zip" download>'
                f"{escape(text['download'])}</a></td></tr>"
            )
        body = table([text["date"], text["description"], "", "", ""], rows)
        access_rows = []
        for record in accesses:
            kind, _, who = record.actor.partition(":")
            person = (
                names.get(who, who)
                if kind == "user"
                else {"dicom-node": "Système DICOM", "system": "simral"}.get(
                    kind, "Lien de partage" if language == "fr" else "Sharing link"
                )
            )
            if kind == "dicom-node":
                person = f"{person} {who}"
            access_rows.append(
                f"<tr><td>{record.at:%Y-%m-%d %H:%M}</td><td>{escape(person)}</td>"
                f"<td>{escape(record.actor_organisation)}</td>"
                f"<td>{escape(labels.get(record.action, record.action))}</td></tr>"
            )
        body += f"<h2>{escape(text['accesses'])}</h2>" + table(
            [text["when"], text["who"], "", text["what"]], access_rows
        )
        for uid in uids:
            audit.record_now(
                ctx,
                action="audit.search",
                principal=principal,
                study_uid=uid,
                detail={"by": "patient", "records": len(accesses)},
            )
        return page(request, text["patient_title"], body)

    @web.get("/patient/studies/{study_uid}/export.zip", include_in_schema=False)
    def patient_download(request: Request, study_uid: str) -> Response:
        return export_response(ctx, _patient(request), study_uid)
