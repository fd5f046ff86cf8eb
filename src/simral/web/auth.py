"""Who an HTTP request acts for: a bearer token (RFC 6750) or a browser session cookie.

- ``Authorization: Bearer <JWT>`` (issued by ``simral tokens create``) for DICOMweb and REST clients;
- the ``simral_session`` cookie (Secure over HTTPS, HttpOnly, SameSite=Strict) for the portal and
  the viewer, valid only once the second factor was checked; state-changing requests with the
  cookie carry the session's CSRF token (``X-CSRF-Token`` header or ``csrf_token`` form field).

Anything else gets 401 (APIs) or a redirect to the login page (pages). Verified principals are
cached per process for :data:`PRINCIPAL_CACHE_SECONDS`, so a revoked token or a closed session
stops working within that time.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import replace
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from simral.access.policy import Principal
from simral.context import AppContext
from simral.identity import service as identity

SESSION_COOKIE = "simral_session"
#: A capability-link visitor's cookie (read-only: the viewer and its DICOMweb/WADO requests only).
SHARE_COOKIE = "simral_link"
SHARE_LINK_PREFIXES = ("/viewer", "/dicom-web", "/wado", "/patient")
PRINCIPAL_CACHE_SECONDS = 15.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Paths answered with 401 rather than a redirect to the login page.
API_PREFIXES = ("/dicom-web", "/wado", "/api/")


class LoginRequired(Exception):
    """No valid credentials on a request that needs them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CsrfFailed(Exception):
    """A state-changing request authenticated by cookie without the session's CSRF token."""


class _PrincipalCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Principal, str]] = {}

    def get(self, key: str) -> tuple[Principal, str] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1], entry[2]

    def put(self, key: str, principal: Principal, csrf: str) -> None:
        with self._lock:
            if len(self._entries) > 5000:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            self._entries[key] = (time.monotonic() + PRINCIPAL_CACHE_SECONDS, principal, csrf)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _ctx(request: Request) -> AppContext:
    return cast(AppContext, request.app.state.ctx)


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _cache(ctx: AppContext) -> _PrincipalCache:
    return cast(_PrincipalCache, ctx.caches.setdefault("http-principals", _PrincipalCache()))


def _token_principal(ctx: AppContext, token: str, address: str) -> Principal:
    key = "t:" + hashlib.sha256(token.encode()).hexdigest()
    cached = _cache(ctx).get(key)
    if cached is not None:
        return _with_address(cached[0], address)
    with ctx.db.reading() as session:
        try:
            professional, organisation = identity.verify_token(session, token)
        except identity.AuthenticationFailed as exc:
            raise LoginRequired(exc.reason) from None
        principal = identity.principal_for(session, professional, organisation=organisation, via="token")
    # Cached with the caller's address: a client's next requests reuse it as it is (no copy).
    principal = _with_address(principal, address)
    _cache(ctx).put(key, principal, "")
    return principal


def _with_address(principal: Principal, address: str) -> Principal:
    if principal.address == address:
        return principal
    return replace(principal, address=address)


def session_principal(ctx: AppContext, secret: str, address: str) -> tuple[Principal, str] | None:
    """The principal and CSRF token of a fully authenticated session cookie, or None."""
    key = "s:" + hashlib.sha256(secret.encode()).hexdigest()
    cached = _cache(ctx).get(key)
    if cached is not None:
        return _with_address(cached[0], address), cached[1]
    with ctx.db.unit_of_work() as session:
        row = identity.find_session(session, secret)
        if row is None or row.stage not in ("mfa", "oidc") or row.professional_id is None:
            return None
        professional = session.get(identity.Professional, row.professional_id)
        if professional is None or not professional.active:
            return None
        identity.touch_session(session, row)
        principal = identity.principal_for(
            session, professional, organisation=row.organisation_code, via="session"
        )
        csrf = row.csrf_token
    principal = _with_address(principal, address)
    _cache(ctx).put(key, principal, csrf)
    return principal, csrf


def share_link_principal(ctx: AppContext, cookie: str, address: str) -> Principal | None:
    """The read-only visitor principal of a capability-link cookie (link active, seal right)."""
    from simral.sharing import service as sharing

    key = "l:" + hashlib.sha256(cookie.encode()).hexdigest()
    cached = _cache(ctx).get(key)
    if cached is not None:
        return _with_address(cached[0], address)
    with ctx.db.reading() as session:
        link = sharing.link_from_cookie(session, cookie)
        if link is None:
            return None
        principal = _with_address(sharing.link_principal(link), address)
    _cache(ctx).put(key, principal, "")
    return principal


def forget_cached_principals(ctx: AppContext) -> None:
    """Drop this process's cached principals (after logout or a break-glass grant changed rights)."""
    _cache(ctx).clear()


def request_principal(request: Request) -> Principal:
    """The principal of ``request``; raises :class:`LoginRequired` or :class:`CsrfFailed`."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cast(Principal, cached)
    ctx = _ctx(request)
    address = client_address(request)
    authorization = request.headers.get("authorization", "")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise LoginRequired("unsupported authorization scheme")
        principal = _token_principal(ctx, token.strip(), address)
    else:
        secret = request.cookies.get(SESSION_COOKIE, "")
        found = session_principal(ctx, secret, address) if secret else None
        if found is None:
            link = request.cookies.get(SHARE_COOKIE, "")
            if link and request.url.path.startswith(SHARE_LINK_PREFIXES) and request.method in SAFE_METHODS:
                visitor = share_link_principal(ctx, link, address)
                if visitor is not None:
                    request.state.principal = visitor
                    return visitor
            raise LoginRequired("no session")
        principal, csrf = found
        request.state.csrf_token = csrf
        if request.method not in SAFE_METHODS:
            sent = request.headers.get("x-csrf-token", "")
            # A portal form carries its token in the body, checked by the route (check_form_csrf);
            # the APIs take no forms, so a form posted there needs the header like any other body.
            form_post = request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"
            ) and not request.url.path.startswith(API_PREFIXES)
            if not form_post and not secrets.compare_digest(sent, csrf):
                raise CsrfFailed()
    request.state.principal = principal
    return principal


def safe_next_path(value: str) -> str:
    """``value`` when it is a path of this site, else ``/`` (no open redirect, CWE-601).

    Refused: absolute and scheme-relative URLs (``//host``), backslashes (``/\\host``, which
    browsers read as ``//host``), and control characters (browsers drop tabs and line breaks from
    URLs, so ``/<TAB>/host`` would become ``//host``; CR/LF would also split a header).
    """
    if (
        not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        return "/"
    return value


def check_form_csrf(request: Request, form_value: str) -> None:
    """Forms posted with the session cookie carry the session's CSRF token (OWASP synchronizer token).

    A bearer-token request carries no ambient credential, so there is nothing to forge.
    """
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.via == "token":
        return
    expected = getattr(request.state, "csrf_token", "")
    if not expected or not secrets.compare_digest(str(form_value), expected):
        raise CsrfFailed()


def check_header_csrf(request: Request) -> None:
    """For a state-changing route that takes no form (an upload sent by script): a session must send
    its CSRF token in ``X-CSRF-Token``, whatever the body's type. Call after :func:`request_principal`."""
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.via != "session":
        return
    expected = getattr(request.state, "csrf_token", "")
    if not expected or not secrets.compare_digest(request.headers.get("x-csrf-token", ""), expected):
        raise CsrfFailed()


def install_auth_handlers(web: FastAPI, ctx: AppContext) -> None:
    """401 with ``WWW-Authenticate: Bearer`` on APIs, a redirect to the login page elsewhere."""
    web.state.ctx = ctx

    @web.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        path = request.url.path
        if path.startswith(API_PREFIXES) or request.method not in SAFE_METHODS:
            return JSONResponse(
                {"detail": "authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="simral"'},
            )
        target = path + (f"?{request.url.query}" if request.url.query else "")
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @web.exception_handler(CsrfFailed)
    async def _csrf_failed(request: Request, exc: CsrfFailed) -> Response:
        return JSONResponse({"detail": "missing or wrong CSRF token"}, status_code=403)


def session_cookie(response: Response, secret: str, *, secure: bool, max_age: int | None = None) -> None:
    """Set the session cookie: HttpOnly, SameSite=Strict, Secure over HTTPS, path /."""
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        httponly=True,
        secure=secure,
        samesite="strict",
        path="/",
        max_age=max_age,
    )


class UnsafeExposure(RuntimeError):
    """The HTTP service would carry passwords and images in clear text beyond this host."""


def check_http_exposure(http_host: str, *, https: bool, behind_tls_proxy: bool) -> None:
    """Refuse plain HTTP on a non-loopback address (DESIGN.md §9: TLS on every external flow),
    unless HTTPS is on or a TLS-terminating reverse proxy is declared."""
    if https or behind_tls_proxy or http_host == "localhost":
        return
    import ipaddress

    try:
        loopback = ipaddress.ip_address(http_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UnsafeExposure(
            f"http_host {http_host!r} is not a loopback address: turn on https (tls_cert_file, tls_key_file) "
            "or set behind_tls_proxy when a TLS-terminating reverse proxy is in front"
        )
