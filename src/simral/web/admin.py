"""Administration pages: alerts, organisations, accounts, DICOM nodes; the user's own account page.

Regional administrators manage everything; a site administrator manages their organisation's
accounts and nodes. The services decide (they raise :class:`AccessDenied`); these pages only show
the forms a principal can use. Every form carries the session's CSRF token. A new account gets a
one-time password shown once to the administrator; a new API token is shown once to its holder.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from html import escape

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.context import AppContext
from simral.identity import service as identity
from simral.identity.models import ORGANISATION_KINDS, ROLES
from simral.nodes import service as nodes
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import Language, csrf_field, page, request_language, table, text_rows

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "admin": "Administration",
        "account": "Mon compte",
        "alerts": "Alertes",
        "organisations": "Structures",
        "users": "Comptes",
        "nodes": "Modalités et PACS (nœuds DICOM)",
        "add": "Ajouter",
        "code": "Code",
        "name": "Nom",
        "kind": "Type",
        "finess": "FINESS",
        "patient_id_oid": "OID des IPP",
        "login": "Identifiant",
        "rpps": "RPPS",
        "organisation": "Structure",
        "role": "Rôle",
        "ae": "Titre AE",
        "host": "Hôte",
        "port": "Port",
        "created_user": "Compte {login} créé. Mot de passe à usage unique (à transmettre de façon sûre) : ",
        "token": "Jeton d'accès (API DICOMweb)",
        "token_label": "Usage",
        "token_lifetime": "Durée",
        "token_created": "Votre jeton (affiché une seule fois) :",
        "denied": "Accès refusé.",
        "roles": "Rôles",
        "national_id": "Identifiant national",
        "exchange": "Échanges : règles de routage et file des transferts",
        "monitoring": "Supervision : activité, files, stockage, intégrité",
        "retention": "Conservation des dossiers : lots de suppression à valider, gels juridiques",
    },
    "en": {
        "admin": "Administration",
        "account": "My account",
        "alerts": "Alerts",
        "organisations": "Organisations",
        "users": "Accounts",
        "nodes": "Modalities and PACS (DICOM nodes)",
        "add": "Add",
        "code": "Code",
        "name": "Name",
        "kind": "Kind",
        "finess": "FINESS",
        "patient_id_oid": "Patient ID OID",
        "login": "Login",
        "rpps": "RPPS",
        "organisation": "Organisation",
        "role": "Role",
        "ae": "AE title",
        "host": "Host",
        "port": "Port",
        "created_user": "Account {login} created. One-time password (hand it over securely): ",
        "token": "Access token (DICOMweb API)",
        "token_label": "Purpose",
        "token_lifetime": "Lifetime",
        "token_created": "Your token (shown once):",
        "denied": "Access denied.",
        "roles": "Roles",
        "national_id": "National id",
        "exchange": "Exchange: routing rules and the transfer queue",
        "monitoring": "Monitoring: activity, queues, storage, integrity",
        "retention": "Record retention: deletion batches to approve, legal holds",
    },
}


def managed_organisations(principal: Principal) -> frozenset[str] | None:
    """Organisations ``principal`` administers; None means all (regional administrators)."""
    if may_manage(principal):
        return None
    return frozenset(org for org, role in principal.memberships if role == "site-admin")


def _table(headings: list[str], rows: list[list[str]]) -> str:
    return table(headings, text_rows(rows))


def _field(label: str, name: str, kind: str = "text", required: bool = True) -> str:
    flag = " required" if required else ""
    return f'<label>{escape(label)}<input type="{kind}" name="{name}"{flag}></label>'


def _select(label: str, name: str, options: list[str]) -> str:
    items = "".join(f'<option value="{escape(o)}">{escape(o)}</option>' for o in options)
    return f'<label>{escape(label)}<select name="{name}">{items}</select></label>'


def _form(request: Request, action: str, fields: str, button: str) -> str:
    return (
        f'<form method="post" action="{action}">{csrf_field(request)}'
        f'{fields}<button type="submit">{escape(button)}</button></form>'
    )


def mount_admin(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/admin`` (and its forms) and ``/account`` to ``web``."""

    def render_admin(
        request: Request, principal: Principal, notice: str = "", status: int = 200
    ) -> HTMLResponse:
        text = TEXT[request_language(request)]
        managed = managed_organisations(principal)
        if managed is not None and not managed:
            return page(
                request,
                text["admin"],
                f'<p class="error">{escape(text["denied"])}</p>',
                principal=principal,
                status=403,
            )
        with ctx.db.reading() as session:
            alerts = identity.alerts_for(session, managed)
            organisations = [
                o for o in identity.list_organisations(session) if managed is None or o.code in managed
            ]
            users = [
                [
                    p.login,
                    p.display_name,
                    p.national_id,
                    ", ".join(sorted(f"{m.role}@{m.organisation.code}" for m in p.memberships)),
                ]
                for p in identity.list_professionals(session)
                if managed is None or any(m.organisation.code in managed for m in p.memberships)
            ]
            node_rows = [
                [
                    n.name,
                    n.ae_title,
                    f"{n.host}:{n.port}",
                    n.organisation or "(archive-wide)",
                    "TLS" if n.tls else "",
                ]
                for n in nodes.list_all(session)
                if managed is None or n.organisation in managed
            ]
        codes = [o.code for o in organisations]
        roles = [r for r in ROLES if managed is None or r != "regional-admin"]
        body = notice
        if managed is None:
            body += f'<p><a href="/admin/jobs">{escape(text["exchange"])}</a></p>'
            body += f'<p><a href="/admin/metrics">{escape(text["monitoring"])}</a></p>'
        body += f'<p><a href="/admin/retention">{escape(text["retention"])}</a></p>'
        body += f"<h2>{escape(text['alerts'])}</h2>" + _table(
            ["", text["organisation"], "", "", ""],
            [
                [a.created_at.strftime("%Y-%m-%d %H:%M"), a.organisation_code, a.kind, a.message, a.study_uid]
                for a in alerts
            ],
        )
        body += f"<h2>{escape(text['organisations'])}</h2>" + _table(
            [text["code"], text["name"], text["kind"], text["finess"], text["patient_id_oid"]],
            [[o.code, o.name, o.kind, o.finess, o.patient_id_oid] for o in organisations],
        )
        if managed is None:
            body += _form(
                request,
                "/admin/organisations",
                _field(text["code"], "code")
                + _field(text["name"], "name")
                + _select(text["kind"], "kind", list(ORGANISATION_KINDS))
                + _field(text["finess"], "finess", required=False)
                + _field(text["patient_id_oid"], "patient_id_oid", required=False),
                text["add"],
            )
        body += f"<h2>{escape(text['users'])}</h2>" + _table(
            [text["login"], text["name"], text["national_id"], text["roles"]], users
        )
        body += _form(
            request,
            "/admin/users",
            _field(text["login"], "login")
            + _field(text["name"], "name", required=False)
            + _field(text["rpps"], "rpps", required=False)
            + _select(text["organisation"], "organisation", codes)
            + _select(text["role"], "role", roles),
            text["add"],
        )
        body += f"<h2>{escape(text['nodes'])}</h2>" + _table(
            [text["name"], text["ae"], text["host"], text["organisation"], ""], node_rows
        )
        body += _form(
            request,
            "/admin/nodes",
            _field(text["name"], "name")
            + _field(text["ae"], "ae")
            + _field(text["host"], "host")
            + _field(text["port"], "port", "number")
            + _select(text["organisation"], "organisation", codes),
            text["add"],
        )
        return page(request, text["admin"], body, principal=principal, status=status)

    @web.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request) -> HTMLResponse:
        return render_admin(request, request_principal(request))

    async def _posted(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:200] for k, v in form.items() if isinstance(v, str)}

    def _error(request: Request, principal: Principal, exc: Exception) -> HTMLResponse:
        status = 403 if isinstance(exc, AccessDenied) else 400
        return render_admin(
            request, principal, f'<p class="error" role="alert">{escape(str(exc))}</p>', status
        )

    @web.post("/admin/organisations")
    async def add_organisation(request: Request) -> Response:
        principal, form = await _posted(request)
        try:
            with ctx.db.unit_of_work() as session:
                identity.create_organisation(
                    session,
                    code=form.get("code", ""),
                    name=form.get("name", ""),
                    kind=form.get("kind", "hospital"),
                    finess=form.get("finess", ""),
                    patient_id_oid=form.get("patient_id_oid", ""),
                    principal=principal,
                )
        except (identity.IdentityError, AccessDenied) as exc:
            return _error(request, principal, exc)
        return render_admin(request, principal, '<p class="message" role="status">✓</p>')

    @web.post("/admin/users")
    async def add_user(request: Request) -> Response:
        principal, form = await _posted(request)
        text = TEXT[request_language(request)]
        login = form.get("login", "")
        rpps = form.get("rpps", "")
        password = "-".join(secrets.token_urlsafe(6) for _ in range(3)) + "-A1"
        try:
            if rpps and not (rpps.isdigit() and len(rpps) == 11):
                raise identity.IdentityError("RPPS: 11 digits")
            with ctx.db.unit_of_work() as session:
                identity.create_professional(
                    session,
                    login=login,
                    organisation=form.get("organisation", ""),
                    role=form.get("role", ""),
                    password=password,
                    display_name=form.get("name", ""),
                    national_id=f"8{rpps}" if rpps else "",
                    principal=principal,
                )
        except (identity.IdentityError, AccessDenied) as exc:
            return _error(request, principal, exc)
        notice = (
            f'<p class="message" role="status">{escape(text["created_user"].format(login=login))}'
            f'<code id="one-time-password">{escape(password)}</code></p>'
        )
        return render_admin(request, principal, notice)

    @web.post("/admin/nodes")
    async def add_node(request: Request) -> Response:
        principal, form = await _posted(request)
        try:
            port = int(form.get("port", "0") or 0)
            with ctx.db.unit_of_work() as session:
                nodes.create(
                    session,
                    name=form.get("name", ""),
                    ae_title=form.get("ae", ""),
                    host=form.get("host", ""),
                    port=port,
                    organisation=form.get("organisation", ""),
                    principal=principal,
                )
        except (nodes.NodeError, AccessDenied, ValueError) as exc:
            return _error(request, principal, exc)
        return render_admin(request, principal, '<p class="message" role="status">✓</p>')

    # ------------------------------------------------------------------ own account

    def render_account(
        request: Request, principal: Principal, notice: str = "", status: int = 200
    ) -> HTMLResponse:
        text = TEXT[request_language(request)]
        roles = ", ".join(sorted(f"{role}@{org}" for org, role in principal.memberships))
        body = notice + _table(
            [text["login"], text["national_id"], text["organisation"], text["roles"]],
            [[principal.name, principal.national_id, principal.organisation, roles]],
        )
        body += f"<h2>{escape(text['token'])}</h2>" + _form(
            request,
            "/account/tokens",
            _field(text["token_label"], "label", required=False)
            + _select(text["token_lifetime"], "lifetime", ["1h", "8h", "7d", "30d"]),
            text["add"],
        )
        return page(request, text["account"], body, principal=principal, status=status)

    @web.get("/account", response_class=HTMLResponse)
    def account_page(request: Request) -> HTMLResponse:
        return render_account(request, request_principal(request))

    @web.post("/account/tokens")
    async def create_own_token(request: Request) -> Response:
        principal, form = await _posted(request)
        text = TEXT[request_language(request)]
        try:
            lifetime = identity.parse_duration(form.get("lifetime", "1h"))
            with ctx.db.unit_of_work() as session:
                professional = identity.get_professional(session, principal.name)
                if professional is None:
                    raise identity.IdentityError("no such account")
                token = identity.issue_token(
                    session,
                    professional=professional,
                    organisation=principal.organisation,
                    lifetime=lifetime,
                    label=form.get("label", ""),
                    principal=principal,
                )
        except (identity.IdentityError, AccessDenied) as exc:
            status = 403 if isinstance(exc, AccessDenied) else 400
            return render_account(
                request, principal, f'<p class="error" role="alert">{escape(str(exc))}</p>', status
            )
        notice = (
            f'<p class="message" role="status">{escape(text["token_created"])} '
            f'<code id="token">{escape(token)}</code></p>'
        )
        return render_account(request, principal, notice)
