"""Login through an OpenID provider: Pro Santé Connect in production (DESIGN.md §6, §9).

``/login/oidc`` starts an authorization-code flow with PKCE (RFC 7636), ``state`` and ``nonce``
kept server-side in a pending session; ``/login/oidc/callback`` completes it
(:func:`simral.identity.oidc.complete_login`), maps the national id to a provisioned account and
opens a full session (an ``eidas1`` login is multi-factor). The pending-login cookie is
``SameSite=Lax``, the only way it comes back on the provider's cross-site redirect; the session
cookie itself stays ``Strict``, so the callback answers a same-site page that moves on.
"""

from __future__ import annotations

import threading
import time
from html import escape
from typing import cast
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from simral.access.policy import Principal
from simral.audit import service as audit
from simral.config import Settings
from simral.context import AppContext
from simral.identity import oidc
from simral.identity import service as identity
from simral.web.auth import client_address, safe_next_path, session_cookie
from simral.web.layout import page, request_language

PENDING_COOKIE = "simral_oidc"
CALLBACK_PATH = "/login/oidc/callback"
DISCOVERY_CACHE_SECONDS = 3600.0

TEXT = {
    "fr": {
        "title": "Connexion",
        "failed": "La connexion par le fournisseur d'identité a échoué. Recommencez.",
        "unknown": "Aucun compte ne correspond à cette identité nationale : contactez votre administrateur.",
        "continue": "Continuer",
    },
    "en": {
        "title": "Log in",
        "failed": "Login through the identity provider failed. Please try again.",
        "unknown": "No account matches this national identity: contact your administrator.",
        "continue": "Continue",
    },
}


def provider_from_settings(settings: Settings, request: Request) -> oidc.OidcProvider | None:
    """The configured provider, or None when OpenID Connect login is off."""
    if not settings.oidc_issuer:
        return None
    base = settings.public_url.rstrip("/") or f"{request.url.scheme}://{request.url.netloc}"
    redirect_uri = settings.oidc_redirect_uri or base + CALLBACK_PATH
    overrides: dict[str, str] = {}
    if settings.oidc_discovery_path:
        overrides["discovery_path"] = settings.oidc_discovery_path
    if settings.oidc_acr_values:
        overrides["acr_values"] = settings.oidc_acr_values
    if settings.oidc_preset == "psc":
        return oidc.OidcProvider.pro_sante_connect(
            settings.oidc_client_id,
            settings.oidc_client_secret,
            redirect_uri,
            issuer=settings.oidc_issuer,
            **overrides,  # type: ignore[arg-type]
        )
    return oidc.OidcProvider(
        issuer=settings.oidc_issuer,
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        redirect_uri=redirect_uri,
        national_id_claim=settings.oidc_national_id_claim,
        **overrides,  # type: ignore[arg-type]
    )


class _DiscoveryCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entry: tuple[float, str, oidc.OidcDiscovery] | None = None

    def get(self, provider: oidc.OidcProvider, http: httpx.Client) -> oidc.OidcDiscovery:
        with self.lock:
            if self.entry and self.entry[1] == provider.issuer and time.monotonic() < self.entry[0]:
                return self.entry[2]
        discovery = oidc.discover(provider, http)
        with self.lock:
            self.entry = (time.monotonic() + DISCOVERY_CACHE_SECONDS, provider.issuer, discovery)
        return discovery


def mount_oidc_login(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/login/oidc`` and its callback to ``web`` (they answer 404 when OIDC is not configured)."""
    cache = cast(_DiscoveryCache, ctx.caches.setdefault("oidc-discovery", _DiscoveryCache()))

    def failure(request: Request, reason: str, *, message_key: str = "failed") -> Response:
        audit.record_now(
            ctx,
            action="login",
            principal=Principal(kind="user", name="(oidc)", address=client_address(request), via="oidc"),
            outcome="failure",
            detail={"step": "oidc", "reason": reason},
        )
        text = TEXT[request_language(request)]
        body = f'<p class="error" role="alert">{escape(text[message_key])}</p><p><a href="/login">↩</a></p>'
        response = page(request, text["title"], body, status=401)
        response.delete_cookie(PENDING_COOKIE, path="/login/oidc")
        return response

    @web.get("/login/oidc")
    def oidc_start(request: Request) -> Response:
        provider = provider_from_settings(ctx.settings, request)
        if provider is None:
            return Response(status_code=404)
        with httpx.Client(timeout=10.0, trust_env=False) as http:
            try:
                discovery = cache.get(provider, http)
            except oidc.OidcError as exc:
                return failure(request, exc.reason)
        url, pending = oidc.begin_login(provider, discovery)
        next_path = safe_next_path(request.query_params.get("next", "/"))
        with ctx.db.unit_of_work() as session:
            secret, _row = identity.open_session(
                session,
                professional=None,
                stage="oidc-pending",
                address=client_address(request),
                pending={**pending.to_dict(), "next": next_path},
            )
        response = RedirectResponse(url, status_code=303)
        response.set_cookie(
            PENDING_COOKIE,
            secret,
            httponly=True,
            secure=request.url.scheme == "https",
            samesite="lax",
            path="/login/oidc",
            max_age=int(provider.max_login_age),
        )
        return response

    @web.get(CALLBACK_PATH)
    def oidc_callback(request: Request) -> Response:
        provider = provider_from_settings(ctx.settings, request)
        if provider is None:
            return Response(status_code=404)
        secret = request.cookies.get(PENDING_COOKIE, "")
        with ctx.db.unit_of_work() as session:
            row = identity.find_session(session, secret)
            if row is None or row.stage != "oidc-pending":
                pending_data = None
            else:
                pending_data = dict(row.pending)
                identity.close_session(row)  # single use, whatever happens next
        if pending_data is None:
            return failure(request, "no pending login")
        pending = oidc.PendingLogin.from_dict(pending_data)
        try:
            with httpx.Client(timeout=10.0, trust_env=False) as http:
                discovery = cache.get(provider, http)
                verified = oidc.complete_login(
                    provider, discovery, pending, dict(request.query_params), http=http
                )
        except oidc.OidcError as exc:
            return failure(request, exc.reason)
        organisation_ids = [
            key for key in (a.organisation_key for a in verified.activities) if key is not None
        ]
        address = client_address(request)
        with ctx.db.unit_of_work() as session:
            try:
                professional, organisation = identity.professional_for_login(
                    session, national_id=verified.national_id, organisation_ids=organisation_ids
                )
            except identity.AuthenticationFailed as exc:
                reason: str | None = exc.reason
            else:
                reason = None
                new_secret, new_row = identity.open_session(
                    session, professional=professional, stage="oidc", address=address
                )
                identity.promote_session(new_row, stage="oidc", organisation=organisation)
                identity.record_success(professional)
                acting = identity.principal_for(
                    session, professional, organisation=organisation, address=address, via="oidc"
                )
                audit.record(
                    session,
                    action="login",
                    principal=acting,
                    detail={"step": "oidc", "issuer": provider.issuer, "acr": verified.acr},
                )
        if reason is not None:
            return failure(request, reason, message_key="unknown")
        text = TEXT[request_language(request)]
        target = quote(str(pending_data.get("next", "/")), safe="/?=&%-._~")
        body = f'<p><a id="continue" href="{escape(target)}">{escape(text["continue"])}</a></p>'
        response = page(request, text["title"], body)
        # A same-site step, so that the Strict session cookie is sent on the next navigation.
        response.headers["Refresh"] = f"0; url={target}"
        session_cookie(response, new_secret, secure=request.url.scheme == "https")
        response.delete_cookie(PENDING_COOKIE, path="/login/oidc")
        return response
