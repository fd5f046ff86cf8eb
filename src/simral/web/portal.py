"""The portal's account, study, break-glass, audit and administration pages (server-rendered).

Login is two steps (DESIGN.md §9, PGSSI-S): the password, then a TOTP code (RFC 6238); a
professional without a second factor enrols one at first login (QR code of the ``otpauth://`` URI).
Forms carry the session's CSRF token; the login form, which has no session yet, a double-submit
cookie. Wording is French first, English with ``?lang=en``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

import segno
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from simral.access.policy import (
    Principal,
    audit_scope,
    may_break_glass,
    may_read_audit,
)
from simral.archive import service as archive
from simral.audit import service as audit
from simral.context import AppContext
from simral.identity import service as identity
from simral.web.auth import (
    SESSION_COOKIE,
    check_form_csrf,
    client_address,
    forget_cached_principals,
    request_principal,
    safe_next_path,
    session_cookie,
)
from simral.web.layout import STYLE, Language, csrf_field, lang_param, page, request_language
from simral.web.pages import viewer_url
from simral.web.shares import share_forms

LOGIN_CSRF_COOKIE = "simral_login_csrf"

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "login": "Connexion",
        "psc": "Se connecter avec Pro Santé Connect (e-CPS ou carte CPS)",
        "oidc": "Se connecter avec le fournisseur d'identité",
        "user": "Identifiant",
        "password": "Mot de passe",
        "submit": "Se connecter",
        "bad_login": "Identifiant ou mot de passe incorrect, ou compte verrouillé.",
        "totp": "Code de vérification",
        "totp_help": "Saisissez le code à 6 chiffres de votre application d'authentification.",
        "bad_totp": "Code incorrect.",
        "verify": "Vérifier",
        "enrol": "Activer la double authentification",
        "enrol_help": "Scannez ce code avec votre application d'authentification (ou saisissez la clé), "
        "puis saisissez le code affiché.",
        "key": "Clé",
        "logout": "Se déconnecter",
        "studies": "Examens",
        "study": "Examen",
        "patient": "Patient",
        "series": "Séries",
        "modality": "Modalité",
        "description": "Description",
        "images": "Images",
        "open": "Ouvrir dans le visualiseur",
        "download": "Télécharger (ZIP DICOM avec DICOMDIR)",
        "not_found": "Cet examen n'existe pas ou vous n'y avez pas accès.",
        "break_glass": "Accès d'urgence (bris de glace)",
        "break_glass_help": "Motivez l'accès. Il est limité dans le temps, tracé, et les administrateurs "
        "de l'établissement détenteur sont alertés.",
        "reason": "Motif",
        "duration": "Durée",
        "open_access": "Ouvrir l'accès d'urgence",
        "audit": "Traçabilité",
        "audit_patient": "IPP",
        "audit_actor": "Utilisateur (identifiant ou n° national)",
        "search": "Rechercher",
        "when": "Date (UTC)",
        "action": "Action",
        "actor": "Acteur",
        "organisation": "Structure",
        "outcome": "Résultat",
        "from": "Origine",
        "admin": "Administration",
        "alerts": "Alertes",
        "users": "Utilisateurs",
        "organisations": "Structures",
        "denied": "Accès refusé.",
        "other_language": "English",
    },
    "en": {
        "login": "Log in",
        "psc": "Log in with Pro Santé Connect (e-CPS or CPS card)",
        "oidc": "Log in with the identity provider",
        "user": "Login",
        "password": "Password",
        "submit": "Log in",
        "bad_login": "Wrong login or password, or account locked.",
        "totp": "Verification code",
        "totp_help": "Enter the 6-digit code of your authenticator app.",
        "bad_totp": "Wrong code.",
        "verify": "Verify",
        "enrol": "Turn on two-factor authentication",
        "enrol_help": "Scan this code with your authenticator app (or type the key), "
        "then enter the code it shows.",
        "key": "Key",
        "logout": "Log out",
        "studies": "Studies",
        "study": "Study",
        "patient": "Patient",
        "series": "Series",
        "modality": "Modality",
        "description": "Description",
        "images": "Images",
        "open": "Open in the viewer",
        "download": "Download (DICOM ZIP with DICOMDIR)",
        "not_found": "This study does not exist or you have no access to it.",
        "break_glass": "Emergency access (break-glass)",
        "break_glass_help": "State the reason. Access is time-limited, audited, "
        "and the administrators of the "
        "organisation holding the study are alerted.",
        "reason": "Reason",
        "duration": "Duration",
        "open_access": "Open emergency access",
        "audit": "Audit trail",
        "audit_patient": "Patient ID",
        "audit_actor": "User (login or national id)",
        "search": "Search",
        "when": "Time (UTC)",
        "action": "Action",
        "actor": "Actor",
        "organisation": "Organisation",
        "outcome": "Outcome",
        "from": "From",
        "admin": "Administration",
        "alerts": "Alerts",
        "users": "Users",
        "organisations": "Organisations",
        "denied": "Access denied.",
        "other_language": "Français",
    },
}


#: How the audit page names the recorded actions (the code stays visible in the title attribute).
ACTION_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "login": "Connexion",
        "logout": "Déconnexion",
        "study.read": "Consultation d'examen",
        "study.retrieve": "Récupération DICOM (C-MOVE/C-GET)",
        "query": "Recherche",
        "instance.store": "Réception d'image",
        "break-glass.open": "Accès d'urgence (bris de glace)",
        "audit.search": "Consultation de la traçabilité",
        "node.create": "Ajout d'une modalité ou d'un PACS",
        "node.delete": "Retrait d'une modalité ou d'un PACS",
        "organisation.create": "Création d'une structure",
        "user.create": "Création d'un compte",
        "user.role-add": "Attribution d'un rôle",
        "user.password-set": "Changement de mot de passe",
        "token.create": "Émission d'un jeton d'accès",
        "token.revoke": "Révocation d'un jeton d'accès",
        "session.switch-organisation": "Changement de structure d'exercice",
        "association.refused": "Association DICOM refusée",
        "share.create": "Partage d'examen",
        "share.revoke": "Fin de partage",
        "share-link.create": "Création d'un lien de consultation",
        "share-link.open": "Consultation par lien",
        "share-link.revoke": "Révocation d'un lien de consultation",
        "study.export": "Export (CD virtuel)",
        "study.forward": "Transfert vers un autre site",
        "route.create": "Ajout d'une règle de routage",
        "route.delete": "Retrait d'une règle de routage",
        "job.retry": "Relance d'un transfert",
        "job.cancel": "Annulation d'un transfert",
        "dicomweb-peer.create": "Ajout d'un serveur DICOMweb",
        "patient.identity-create": "Création d'une identité patient",
        "patient.identity-update": "Mise à jour d'une identité patient",
        "patient.status-change": "Changement de statut d'identité",
        "patient.vigilance-case": "Cas d'identitovigilance ouvert",
        "patient.vigilance-resolve": "Cas d'identitovigilance traité",
        "patient.merge": "Fusion d'identités",
        "patient.link": "Lien entre identités",
        "patient.unlink": "Suppression d'un lien entre identités",
        "patient.change-identifier": "Changement d'IPP",
        "patient.undo-merge": "Annulation d'une fusion",
        "patient.undo-link": "Annulation d'un lien",
        "patient.undo-unlink": "Annulation d'une suppression de lien",
        "patient.undo-change-id": "Annulation d'un changement d'IPP",
    },
    "en": {
        "login": "Login",
        "logout": "Logout",
        "study.read": "Study viewed",
        "study.retrieve": "DICOM retrieve (C-MOVE/C-GET)",
        "query": "Query",
        "instance.store": "Image received",
        "break-glass.open": "Emergency access (break-glass)",
        "audit.search": "Audit trail searched",
        "node.create": "Node added",
        "node.delete": "Node removed",
        "organisation.create": "Organisation created",
        "user.create": "Account created",
        "user.role-add": "Role granted",
        "user.password-set": "Password changed",
        "token.create": "Access token issued",
        "token.revoke": "Access token revoked",
        "session.switch-organisation": "Acting organisation changed",
        "association.refused": "DICOM association refused",
        "share.create": "Study shared",
        "share.revoke": "Share ended",
        "share-link.create": "Viewing link made",
        "share-link.open": "Viewed through a link",
        "share-link.revoke": "Viewing link revoked",
        "study.export": "Export (virtual CD)",
        "study.forward": "Sent to another site",
        "route.create": "Routing rule added",
        "route.delete": "Routing rule removed",
        "job.retry": "Transfer retried",
        "job.cancel": "Transfer cancelled",
        "dicomweb-peer.create": "DICOMweb server added",
        "patient.identity-create": "Patient identity created",
        "patient.identity-update": "Patient identity updated",
        "patient.status-change": "Identity status changed",
        "patient.vigilance-case": "Identity-vigilance case opened",
        "patient.vigilance-resolve": "Identity-vigilance case resolved",
        "patient.merge": "Identities merged",
        "patient.link": "Identities linked",
        "patient.unlink": "Identities unlinked",
        "patient.change-identifier": "Patient ID changed",
        "patient.undo-merge": "Merge undone",
        "patient.undo-link": "Link undone",
        "patient.undo-unlink": "Unlink undone",
        "patient.undo-change-id": "Change of patient ID undone",
    },
}


def _safe_next(value: str) -> str:
    """Only same-site paths (no open redirect, CWE-601)."""
    return safe_next_path(value)


def _secure(ctx: AppContext, request: Request) -> bool:
    return request.url.scheme == "https" or ctx.settings.https


def mount_portal(web: FastAPI, ctx: AppContext) -> None:
    """Add login, study, break-glass, audit and administration pages to ``web``."""

    @web.get("/static/simral.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(STYLE, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ login

    def login_form(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
        text = TEXT[request_language(request)]
        token = secrets.token_urlsafe(24)
        next_path = escape(_safe_next(request.query_params.get("next", "/")))
        error = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
        body = (
            f"{error}"
            f'<form class="stack" method="post" action="/login?{escape(urlencode(request.query_params))}">'
            f'<input type="hidden" name="csrf_token" value="{token}">'
            f'<input type="hidden" name="next" value="{next_path}">'
            f"<label>{escape(text['user'])}"
            '<input name="login" autocomplete="username" required autofocus></label>'
            f'<label>{escape(text["password"])}<input type="password" name="password" '
            f'autocomplete="current-password" required></label>'
            f'<button type="submit">{escape(text["submit"])}</button></form>'
        )
        if ctx.settings.oidc_issuer:
            label = text["psc"] if ctx.settings.oidc_preset == "psc" else text["oidc"]
            start = "/login/oidc?next=" + quote(_safe_next(request.query_params.get("next", "/")), safe="")
            body += f'<p><a id="oidc-login" href="{escape(start)}">{escape(label)}</a></p>'
        response = page(request, text["login"], body, status=status)
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=_secure(ctx, request),
            path="/login",
        )
        return response

    @web.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return login_form(request)

    @web.post("/login")
    async def login_submit(request: Request) -> Response:
        form = await request.form()
        text = TEXT[request_language(request)]
        sent = str(form.get("csrf_token", ""))
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not secrets.compare_digest(sent, expected):
            return login_form(request, text["bad_login"], 403)
        login = str(form.get("login", ""))[:64]
        password = str(form.get("password", ""))[:1024]
        address = client_address(request)
        with ctx.db.unit_of_work() as session:
            try:
                professional = identity.check_password(session, login=login, password=password)
            except identity.AuthenticationFailed as exc:
                failure: str | None = exc.reason
            else:
                failure = None
                stage = "password" if professional.totp_enrolled_at else "enrol"
                secret, _row = identity.open_session(
                    session,
                    professional=professional,
                    stage=stage,
                    address=address,
                    pending={"next": _safe_next(str(form.get("next", "/")))},
                )
        if failure is not None:
            audit.record_now(
                ctx,
                action="login",
                principal=Principal(kind="user", name=login, address=address, via="password"),
                outcome="failure",
                detail={"step": "password", "reason": failure},
            )
            return login_form(request, text["bad_login"], 401)
        target = "/login/totp" if stage == "password" else "/login/enrol"
        lang = lang_param(request)
        response = RedirectResponse(target + (f"?lang={lang}" if lang else ""), status_code=303)
        session_cookie(response, secret, secure=_secure(ctx, request))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    def pending_session(request: Request, stage: str) -> Any:
        with ctx.db.reading() as session:
            row = identity.find_session(session, request.cookies.get(SESSION_COOKIE, ""))
            if row is None or row.stage != stage or row.professional_id is None:
                return None
            return row

    def second_factor_form(request: Request, row: Any, message: str = "", status: int = 200) -> HTMLResponse:
        text = TEXT[request_language(request)]
        enrol = row.stage == "enrol"
        error = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
        intro = ""
        if enrol:
            with ctx.db.unit_of_work() as session:
                professional = session.get(identity.Professional, row.professional_id)
                assert professional is not None
                if not professional.totp_secret or professional.totp_enrolled_at is None:
                    if not professional.totp_secret:
                        identity.start_totp_enrolment(professional)
                    uri = identity.totp_uri(professional)
                    key = professional.totp_secret
            qr = segno.make(uri, error="m").svg_data_uri(scale=5)
            intro = (
                f"<p>{escape(text['enrol_help'])}</p>"
                f'<img src="{qr}" alt="QR code" width="200" height="200">'
                f'<p>{escape(text["key"])} : <code id="totp-secret">{escape(key)}</code></p>'
            )
        else:
            intro = f"<p>{escape(text['totp_help'])}</p>"
        body = (
            f"{error}{intro}"
            f'<form class="stack" method="post" action="{escape(request.url.path)}">'
            f'<input type="hidden" name="csrf_token" value="{escape(row.csrf_token)}">'
            f'<label>{escape(text["totp"])}<input name="code" inputmode="numeric" pattern="[0-9 ]*" '
            f'autocomplete="one-time-code" required autofocus></label>'
            f'<button type="submit">{escape(text["verify"])}</button></form>'
        )
        return page(request, text["enrol"] if enrol else text["totp"], body, status=status)

    async def second_factor_submit(request: Request, stage: str) -> Response:
        row = pending_session(request, stage)
        if row is None:
            return RedirectResponse("/login", status_code=303)
        form = await request.form()
        if not secrets.compare_digest(str(form.get("csrf_token", "")), row.csrf_token):
            return second_factor_form(request, row, TEXT[request_language(request)]["bad_totp"], 403)
        code = str(form.get("code", ""))[:16]
        address = client_address(request)
        with ctx.db.unit_of_work() as session:
            live = session.get(identity.WebSession, row.id)
            professional = session.get(identity.Professional, row.professional_id)
            assert live is not None and professional is not None
            accepted = not identity.is_locked(professional) and (
                identity.confirm_totp_enrolment(professional, code)
                if stage == "enrol"
                else identity.check_totp(professional, code)
            )
            if accepted:
                acting = identity.principal_for(session, professional, address=address, via="password+totp")
                next_path = _safe_next(str(row.pending.get("next", "/")))
                secret, _fresh = identity.renew_session(
                    session, live, stage="mfa", organisation=acting.organisation
                )
            else:
                identity.record_failure(professional)
                if identity.is_locked(professional):
                    identity.close_session(live)
            audit.record(
                session,
                action="login",
                principal=acting
                if accepted
                else Principal(
                    kind="user",
                    name=professional.login,
                    national_id=professional.national_id,
                    address=address,
                ),
                outcome="success" if accepted else "failure",
                detail={"step": "totp-enrolment" if stage == "enrol" else "totp"},
            )
            if accepted:
                identity.record_success(professional)
        if not accepted:
            fresh = pending_session(request, stage)
            if fresh is None:
                return RedirectResponse("/login", status_code=303)
            return second_factor_form(request, fresh, TEXT[request_language(request)]["bad_totp"], 401)
        response = RedirectResponse(next_path, status_code=303)
        session_cookie(response, secret, secure=_secure(ctx, request))
        return response

    @web.get("/login/totp", response_class=HTMLResponse)
    def totp_page(request: Request) -> Response:
        row = pending_session(request, "password")
        return second_factor_form(request, row) if row else RedirectResponse("/login", status_code=303)

    @web.post("/login/totp")
    async def totp_submit(request: Request) -> Response:
        return await second_factor_submit(request, "password")

    @web.get("/login/enrol", response_class=HTMLResponse)
    def enrol_page(request: Request) -> Response:
        row = pending_session(request, "enrol")
        return second_factor_form(request, row) if row else RedirectResponse("/login", status_code=303)

    @web.post("/login/enrol")
    async def enrol_submit(request: Request) -> Response:
        return await second_factor_submit(request, "enrol")

    @web.post("/logout")
    async def logout(request: Request) -> Response:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        with ctx.db.unit_of_work() as session:
            row = identity.find_session(session, request.cookies.get(SESSION_COOKIE, ""))
            if row is not None:
                identity.close_session(row)
            audit.record(session, action="logout", principal=principal)
        forget_cached_principals(ctx)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @web.post("/session/organisation")
    async def switch_organisation(request: Request) -> Response:
        """Act for another organisation the professional belongs to (session logins only)."""
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        organisation = str(form.get("organisation", ""))
        with ctx.db.unit_of_work() as session:
            row = identity.find_session(session, request.cookies.get(SESSION_COOKIE, ""))
            professional = identity.get_professional(session, principal.name) if row is not None else None
            if row is None or professional is None or principal.via == "token":
                raise HTTPException(400, "only a portal session can change organisation")
            try:
                identity.switch_session_organisation(
                    session, row, professional, organisation=organisation, principal=principal
                )
            except identity.IdentityError:
                raise HTTPException(403, "not a member of this organisation") from None
        forget_cached_principals(ctx)
        return RedirectResponse("/", status_code=303)

    # ------------------------------------------------------------------ study page + break-glass

    @web.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        with ctx.db.reading() as session:
            summary = archive.get_study(session, principal=principal, study_uid=study_uid)
        if summary is None:
            archive.audit_reads(ctx, principal, [study_uid[:64]], outcome="failure", detail={"via": "portal"})
            body = f'<p class="error" role="alert">{escape(text["not_found"])}</p>'
            if may_break_glass(principal):
                body += (
                    f"<h2>{escape(text['break_glass'])}</h2><p>{escape(text['break_glass_help'])}</p>"
                    f'<form class="stack" method="post" action="/studies/{quote(study_uid)}/break-glass">'
                    + csrf_field(request)
                    + f"<label>{escape(text['reason'])}"
                    '<textarea name="reason" required minlength="10"></textarea></label>'
                    f'<label>{escape(text["duration"])}<select name="duration">'
                    '<option value="30m">30 min</option><option value="1h" selected>1 h</option>'
                    '<option value="4h">4 h</option></select></label>'
                    f'<button type="submit">{escape(text["open_access"])}</button></form>'
                )
            return page(request, text["study"], body, principal=principal, status=404)
        study, patient, series = summary.study, summary.patient, summary.series
        archive.audit_reads(ctx, principal, [study.study_uid], detail={"via": "portal"})
        thumbs = "".join(
            f'<figure><img loading="lazy" alt="{escape(s.modality)} {escape(s.description)}" '
            f'src="/dicom-web/studies/{quote(study.study_uid)}/series/{quote(s.series_uid)}/thumbnail?viewport=96,96">'
            f"<figcaption>{escape(s.modality)} — {escape(s.description)} ({s.num_instances})"
            "</figcaption></figure>"
            for s in series
        )
        body = (
            f"<p><strong>{escape(text['patient'])}</strong> : {escape(patient.name.replace('^', ' '))} "
            f"({escape(patient.patient_id)})</p>"
            f"<p>{escape(study.description)} — {escape(study.study_date)} — "
            f"{escape(study.accession_number)}</p>"
            f'<p><a href="{escape(viewer_url(study.study_uid))}">{escape(text["open"])}</a> · '
            f'<a href="/studies/{escape(study.study_uid)}/export.zip" download>'
            f"{escape(text['download'])}</a></p>"
            f'<h2>{escape(text["series"])}</h2><div class="thumbs">{thumbs}</div>'
            + share_forms(request, principal, study.study_uid)
        )
        return page(request, text["study"], body, principal=principal)

    @web.post("/studies/{study_uid}/break-glass")
    async def break_glass(request: Request, study_uid: str) -> Response:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        text = TEXT[request_language(request)]
        reason = str(form.get("reason", ""))
        with ctx.db.reading() as session:
            found = archive.study_holders(session, study_uid)
        if found is None:
            return page(
                request,
                text["study"],
                f'<p class="error">{escape(text["not_found"])}</p>',
                principal=principal,
                status=404,
            )
        try:
            duration = identity.parse_duration(str(form.get("duration", "1h")))
            with ctx.db.unit_of_work() as session:
                identity.open_break_glass(
                    session,
                    principal=principal,
                    study_uid=study_uid,
                    reason=reason,
                    duration=duration,
                    holders=found[1],
                    patient_id=found[0],
                )
        except identity.IdentityError as exc:
            return page(
                request,
                text["break_glass"],
                f'<p class="error" role="alert">{escape(str(exc))}</p>',
                principal=principal,
                status=400,
            )
        forget_cached_principals(ctx)
        return RedirectResponse(f"/studies/{quote(study_uid)}", status_code=303)

    # ------------------------------------------------------------------ audit search

    @web.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, patient_id: str = "", actor: str = "", study: str = "") -> HTMLResponse:
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        if not may_read_audit(principal):
            return page(
                request,
                text["audit"],
                f'<p class="error">{escape(text["denied"])}</p>',
                principal=principal,
                status=403,
            )
        with ctx.db.reading() as session:
            rows = audit.search(
                session,
                organisations=audit_scope(principal),
                patient_id=patient_id.strip(),
                actor=actor.strip(),
                study_uid=study.strip(),
            )
        with ctx.db.unit_of_work() as session:
            audit.record(
                session,
                action="audit.search",
                principal=principal,
                patient_id=patient_id.strip()[:64],
                detail={"actor": actor, "study": study, "results": len(rows)},
            )
        labels = ACTION_LABELS[request_language(request)]
        table_rows = "".join(
            "<tr>"
            + f"<td>{escape(r.at.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
            + f'<td title="{escape(r.action)}">{escape(labels.get(r.action, r.action))}</td>'
            + "".join(
                f"<td>{escape(str(v))}</td>"
                for v in (
                    r.actor + (f" ({r.actor_national_id})" if r.actor_national_id else ""),
                    r.actor_organisation,
                    r.outcome,
                    r.source_address,
                    r.patient_id,
                    r.study_uid,
                    r.detail.get("reason", "") if isinstance(r.detail, dict) else "",
                )
            )
            + "</tr>"
            for r in rows
        )
        heads = (
            "when",
            "action",
            "actor",
            "organisation",
            "outcome",
            "from",
            "audit_patient",
            "study",
            "reason",
        )
        body = (
            '<form method="get" action="/audit" role="search">'
            f"<label>{escape(text['audit_patient'])}"
            f'<input name="patient_id" value="{escape(patient_id)}"></label>'
            f'<label>{escape(text["audit_actor"])}<input name="actor" value="{escape(actor)}"></label>'
            f'<label>{escape(text["study"])}<input name="study" value="{escape(study)}"></label>'
            f'<button type="submit">{escape(text["search"])}</button></form>'
            "<table><thead><tr>"
            + "".join(f'<th scope="col">{escape(text[h])}</th>' for h in heads)
            + f"</tr></thead><tbody>{table_rows}</tbody></table>"
        )
        return page(request, text["audit"], body, principal=principal)
