"""Fuzz the one ingest path (DESIGN.md §3) with Part 10 files: ``archive.service.ingest_file``.

Expected: an :class:`~simral.archive.service.IngestResult`, stored / duplicate or rejected with a
C-STORE status (PS3.4 B.2.3) and a reason; nothing else (no exception, no error logged, no
staged or scratch file left behind, no descriptor left open).
"""

from __future__ import annotations

from pathlib import Path

from fuzz import harness

with harness.instrumented(__name__):
    from simral.access.policy import Principal
    from simral.archive.service import ingest_file

NAME = "ingest"
MAX_LEN = 64 * 1024
#: Statuses a refusal may carry (PS3.4 B.2.3; A700 out of resources, A900 identifier mismatch...).
REFUSAL_STATUSES = {0xA700, 0xA900, 0xC000, 0x0111, 0x0122}
NODE = Principal(kind="dicom-node", name=harness.SCU_AE, organisation=harness.SITE, via="ae-title")

_site = harness.SiteHolder()
_oracle = harness.Oracle()


def setup() -> None:
    _oracle.install()


def teardown() -> None:
    _oracle.uninstall()
    _site.close()


def test_one_input(data: bytes) -> None:
    site = _site.get()
    scratch = site.scratch
    path = Path(scratch, "fuzz-input.dcm")
    path.write_bytes(data)
    try:
        with _oracle.watching(scratch=scratch):
            result = ingest_file(site.ctx, path, principal=NODE, source="fuzz")
    finally:
        path.unlink(missing_ok=True)
    if result.outcome == "rejected":
        if result.status not in REFUSAL_STATUSES or not result.reason:
            raise harness.Bug(f"refusal without a status or reason: {result}")
    elif result.status not in (0x0000, 0xB006, 0xB000, 0xB007):
        raise harness.Bug(f"{result.outcome} answered with status {result.status:04X}")


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
