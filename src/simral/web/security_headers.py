"""Security headers on every HTTP response (DESIGN.md §9), as a pure ASGI middleware.

Only the ``http.response.start`` message is touched, so streamed bodies (WADO-RS multipart,
STOW-RS answers) pass through unbuffered. A header a route sets itself is kept.

- ``Content-Security-Policy`` (CSP Level 3): same-origin everything, no framing, no plugins; the
  OHIF viewer under ``/viewer`` gets its own policy: its ``index.html`` carries inline scripts,
  its codecs are WebAssembly (``'wasm-unsafe-eval'``), its image decoders run in blob workers and
  its components use inline styles.
- ``Strict-Transport-Security`` (RFC 6797) only when simral itself serves HTTPS.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simral.web.viewer import VIEWER_PATH

_COMMON = "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
CSP = f"default-src 'self'; img-src 'self' data: blob:; {_COMMON}"
VIEWER_CSP = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; "
    "font-src 'self' data:; "
    "connect-src 'self' data: blob:; "
    "media-src 'self' data: blob:; "
    "worker-src 'self' blob:; "
    f"{_COMMON}"
)
_OTHERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
)


class SecurityHeaders:
    """Add CSP, ``nosniff``, ``no-referrer``, ``DENY`` framing, COOP and (over HTTPS) HSTS."""

    def __init__(self, app: ASGIApp, *, https: bool = False, hsts_max_age: int = 31536000) -> None:
        self.app = app
        common = list(_OTHERS)
        if https:
            common.append(("strict-transport-security", f"max-age={hsts_max_age}"))
        self.default = [("content-security-policy", CSP), *common]
        self.viewer = [("content-security-policy", VIEWER_CSP), *common]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        wanted = self.viewer if path == VIEWER_PATH or path.startswith(VIEWER_PATH + "/") else self.default

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in wanted:
                    if name not in headers:
                        headers.append(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
