"""Fuzz STOW-RS (PS3.18 §10.5) through the real ASGI application: the request's Content-Type
(``multipart/related`` parameters, RFC 2387) and its body, streamed in chunks, parsed by
``dicomweb.multipart.PartSpooler`` and each part ingested by ``dicomweb.stow``. The request is
handed to the application as an ASGI server does (scope, ``http.request`` messages), on one event
loop kept between inputs: no test client thread and portal hop per chunk.

Input: the Content-Type value, a line feed, then the body; the chunk size the body arrives in is
derived from the input (so a replay is the same request).
Expected: 200 / 202 / 409 with the PS3.18 response (Referenced / Failed SOP Sequence), 400 for a
malformed or empty body, 415 for another media type; never 500, no error logged, no part file
left in the store's scratch folder, no descriptor left open.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Iterator
from typing import Any

from fuzz import harness

with harness.instrumented(__name__):
    from simral.web.app import create_web_app

NAME = "stow"
MAX_LEN = 32 * 1024
ANSWERS = {200, 202, 400, 409, 415}

_site = harness.SiteHolder(renew_every=10000)
_oracle = harness.Oracle()
_apps: dict[int, Any] = {}
_loop: list[asyncio.AbstractEventLoop] = []


def setup() -> None:
    _oracle.install()


def teardown() -> None:
    _oracle.uninstall()
    _apps.clear()
    while _loop:
        _loop.pop().close()
    _site.close()


def _app(site: harness.Site) -> Any:
    app = _apps.get(id(site))
    if app is None:
        _apps.clear()
        app = _apps[id(site)] = create_web_app(site.ctx)
    return app


async def _post(app: Any, path: str, headers: dict[bytes, bytes], chunks: list[bytes]) -> tuple[int, bytes]:
    """One HTTP/1.1 request as an ASGI server hands it over (body in ``chunks``, the client
    waiting for the whole answer); the status and body. An exception of the application
    propagates (the test client's ``raise_server_exceptions``)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"transfer-encoding", b"chunked"),
            *((k.lower(), v) for k, v in headers.items()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    pending = list(chunks) or [b""]
    answered = asyncio.Event()
    status, body = 0, bytearray()

    async def receive() -> dict[str, Any]:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)
    return status, bytes(body)


def split(data: bytes) -> tuple[bytes, bytes, int]:
    """(Content-Type, body, chunk size) of an input."""
    head, _, body = data.partition(b"\n")
    chunk = 1 + zlib.crc32(data) % 8192
    return head.strip().replace(b"\r", b""), body, chunk


def _chunks(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_one_input(data: bytes) -> None:
    site = _site.get()
    app = _app(site)
    if not _loop:
        _loop.append(asyncio.new_event_loop())
    content_type, body, chunk = split(data)
    headers = {b"Authorization": f"Bearer {site.token}".encode(), b"Accept": b"application/dicom+json"}
    if content_type:
        headers[b"Content-Type"] = content_type
    with _oracle.watching(scratch=site.scratch):
        status, text = _loop[0].run_until_complete(
            _post(app, "/dicom-web/studies", headers, list(_chunks(body, chunk)))
        )
    if status not in ANSWERS:
        raise harness.Bug(f"STOW-RS answered {status}: {text[:200]!r}")
    if status in (200, 202, 409):
        answer = json.loads(text)
        if "00081199" not in answer and "00081198" not in answer:
            raise harness.Bug(f"STOW-RS {status} without Referenced/Failed SOP Sequence")


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
