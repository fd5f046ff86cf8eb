"""``tools/pin_audit.py`` (``make audit-pins``), the dependency audit where ``pip-audit`` cannot ask
PyPI for a version's document: against a loopback index serving PyPI's JSON API documents."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tools import pin_audit

ADVISORY = {
    "id": "PYSEC-2026-1",
    "aliases": ["CVE-2026-0001"],
    "fixed_in": ["1.1"],
    "withdrawn": None,
}
WITHDRAWN = {"id": "PYSEC-2026-2", "aliases": [], "fixed_in": [], "withdrawn": "2026-05-01T00:00:00Z"}

#: What the index serves, by path. The version documents of ``mirrored`` and ``stale`` are missing,
#: as on a mirror that serves project documents only.
DOCUMENTS = {
    "/pypi/served/2.0/json": {"info": {"version": "2.0"}, "vulnerabilities": [WITHDRAWN]},
    "/pypi/served-vulnerable/0.9/json": {"info": {"version": "0.9"}, "vulnerabilities": [ADVISORY]},
    "/pypi/mirrored/json": {"info": {"version": "1.0"}, "vulnerabilities": [ADVISORY, WITHDRAWN]},
    "/pypi/stale/json": {"info": {"version": "3.1"}, "vulnerabilities": []},
    "/pypi/clean/json": {"info": {"version": "5.0"}, "vulnerabilities": [WITHDRAWN]},
}


class _Index(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        document = DOCUMENTS.get(self.path)
        if document is None:
            self.send_error(404)
            return
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def index() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    server.shutdown()
    server.server_close()


def test_the_pins_are_read_as_pip_reads_them(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# via uv\n--index-url https://example.invalid\nFoo_Bar==1.2.3\n    # via x\n"
        "extra[one]==2.0 ; python_version >= '3.8'\nranged>=1.0\n"
    )
    assert [(p.name, p.version) for p in pin_audit.read_pins(lock)] == [
        ("foo-bar", "1.2.3"),
        ("extra", "2.0"),
    ]


@pytest.mark.parametrize(
    ("pins", "exit_code", "printed", "not_printed"),
    [
        pytest.param(
            "served-vulnerable==0.9\nmirrored==1.0\nserved==2.0\n",
            1,
            [
                "VULNERABLE served-vulnerable==0.9: PYSEC-2026-1 (CVE-2026-0001) fixed in: 1.1",
                "VULNERABLE mirrored==1.0: PYSEC-2026-1",
                "3 pins: 2 checked by their version's document, 1 by the project's",
            ],
            ["PYSEC-2026-2"],  # withdrawn
            id="vulnerable-by-version-or-latest-document",
        ),
        pytest.param(
            "clean==5.0\nstale==3.0\nabsent==1.0\n",
            1,
            [
                "NOT CHECKED stale==3.0: the index serves no document for 3.0 and the project's"
                " speaks for 3.1",
                "NOT CHECKED absent==1.0: not on the index",
            ],
            ["VULNERABLE"],
            id="a-pin-no-document-speaks-for-fails",
        ),
        pytest.param(
            "clean==5.0\nserved==2.0\n",
            0,
            ["no known vulnerability"],
            ["VULNERABLE", "NOT CHECKED"],
            id="clean",
        ),
    ],
)
def test_the_audit_answer(
    tmp_path: Path,
    index: str,
    capsys: pytest.CaptureFixture[str],
    pins: str,
    exit_code: int,
    printed: list[str],
    not_printed: list[str],
) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(pins)

    assert pin_audit.main(["--requirements", str(lock), "--index", index]) == exit_code
    out = capsys.readouterr().out
    for line in printed:
        assert line in out
    for text in not_printed:
        assert text not in out
