"""Fuzz STOW-RS (PS3.18 §10.5) through the real ASGI application: the request's Content-Type
(``multipart/related`` parameters, RFC 2387) and its body, streamed in chunks, parsed by
``dicomweb.multipart.PartSpooler`` and each part ingested by ``dicomweb.stow``.

Input: the Content-Type value, a line feed, then the body; the chunk size the body arrives in is
derived from the input (so a replay is the same request).
Expected: 200 / 202 / 409 with the PS3.18 response (Referenced / Failed SOP Sequence), 400 for a
malformed or empty body, 415 for another media type; never 500, no error logged, no part file
left in the store's scratch folder, no descriptor left open.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from fuzz import harness

with harness.instrumented(__name__):
    from starlette.testclient import TestClient

    from simral.web.app import create_web_app

NAME = "stow"
MAX_LEN = 32 * 1024
ANSWERS = {200, 202, 400, 409, 415}

_site = harness.SiteHolder(renew_every=10000)
_oracle = harness.Oracle()
_clients: dict[int, TestClient] = {}


def setup() -> None:
    _oracle.install()


def teardown() -> None:
    _oracle.uninstall()
    for client in _clients.values():
        client.close()
    _clients.clear()
    _site.close()


def _client(site: harness.Site) -> TestClient:
    client = _clients.get(id(site))
    if client is None:
        for old in _clients.values():
            old.close()
        _clients.clear()
        client = TestClient(create_web_app(site.ctx), raise_server_exceptions=True)
        _clients[id(site)] = client
    return client


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
    client = _client(site)
    content_type, body, chunk = split(data)
    headers = {b"Authorization": f"Bearer {site.token}".encode(), b"Accept": b"application/dicom+json"}
    if content_type:
        headers[b"Content-Type"] = content_type
    with _oracle.watching(scratch=site.scratch):
        response = client.post("/dicom-web/studies", content=_chunks(body, chunk), headers=headers)
    if response.status_code not in ANSWERS:
        raise harness.Bug(f"STOW-RS answered {response.status_code}: {response.text[:200]}")
    if response.status_code in (200, 202, 409):
        answer = response.json()
        if "00081199" not in answer and "00081198" not in answer:
            raise harness.Bug(f"STOW-RS {response.status_code} without Referenced/Failed SOP Sequence")


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
