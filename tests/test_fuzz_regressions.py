"""The short form of the fuzzing campaign (``fuzz/``, ``make hardening`` for the long one): every
harness replays its seed corpus and the inputs that once broke simral (``fuzz/regressions``)
against a real in-process site, with the harness's own oracle (the protocol's answer, no error
logged, no thread failure, no descriptor or scratch file left behind); then the fixes are checked
on their own terms.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fuzz import harness
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid
from tests.conftest import run_python

HARNESSES = ("ingest", "hl7", "stow", "import", "dimse")
#: The DIMSE harness runs a ``DimseService``, which sets process-wide state for a server process
#: (pynetdicom patches, the temporary folder, the receive mode): it runs in a child process, never in
#: the pytest worker whose later test files use pynetdicom as a client.
IN_PROCESS = tuple(name for name in HARNESSES if name != "dimse")
CASES = [
    pytest.param(name, path, id=f"{name}:{path.parent.name}/{path.name}")
    for name in IN_PROCESS
    for path in harness.corpus_files(name) + harness.regression_files(name)
]


_loaded: dict[str, ModuleType] = {}


@pytest.fixture(scope="module", autouse=True)
def _harnesses() -> Iterator[None]:
    yield
    for module in _loaded.values():
        module.teardown()


def _harness(name: str) -> ModuleType:
    module = _loaded.get(name)
    if module is None:
        module = importlib.import_module(f"fuzz.fuzz_{name}")
        module.setup()
        _loaded[name] = module
    return module


def test_every_harness_has_seeds() -> None:
    for name in HARNESSES:
        assert len(harness.corpus_files(name)) >= 4, name
    size = sum(p.stat().st_size for p in harness.CORPUS_DIR.rglob("*") if p.is_file())
    assert size < 1024 * 1024


def test_replay_dimse_in_a_child_process() -> None:
    """Every DIMSE seed and regression input holds the harness's oracle (``fuzz.replay``)."""
    inputs = [str(p) for p in harness.corpus_files("dimse") + harness.regression_files("dimse")]
    replayed = run_python("-m", "fuzz.replay", "dimse", *inputs)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"{len(inputs)} inputs replayed, 0 failed" in replayed.stdout


@pytest.mark.parametrize(("name", "path"), CASES)
def test_replay(name: str, path: Path) -> None:
    """The harness's oracle holds for the input (a failure raises :class:`fuzz.harness.Bug`)."""
    _harness(name).test_one_input(path.read_bytes())


# -------------------------------------------------------------------- the fixes, one by one


def _ingest_site() -> harness.Site:
    site = _harness("ingest")._site.get()
    assert isinstance(site, harness.Site)
    return site


@pytest.mark.parametrize(
    ("regression", "reason"),
    [
        ("truncated-deflate.dcm", "unreadable DICOM data: error"),
        ("odd-length-group-length.dcm", "unreadable DICOM data: BytesLengthException"),
        ("unknown-vr-in-file-meta.dcm", "unreadable DICOM data: NotImplementedError"),
        ("unknown-transfer-syntax.dcm", "not a transfer syntax known to simral"),
        ("item-without-tag.dcm", "malformed data: OSError"),
    ],
)
def test_damaged_headers_are_refused_at_step_one(regression: str, reason: str, tmp_path: Path) -> None:
    """PS3.4 B.2.3: refused with status C000 and a reason, not an exception out of the ingest."""
    from simral.dicom.header import RejectedInstance, read_header

    path = tmp_path / regression
    shutil.copy(harness.REGRESSIONS_DIR / "ingest" / regression, path)
    with pytest.raises(RejectedInstance) as refused:
        read_header(path)
    assert reason in refused.value.reason
    assert refused.value.status == 0xC000


def test_damaged_zip_members_are_counted_not_raised(tmp_path: Path) -> None:
    from simral.archive.importing import import_paths

    site = _ingest_site()
    principal = _harness("import").IMPORTER
    for regression in harness.regression_files("import"):
        if not regression.name.startswith("zip-"):
            continue
        upload = tmp_path / regression.stem
        upload.mkdir()
        (upload / "upload.zip").write_bytes(regression.read_bytes()[1:])
        descriptors = len(os.listdir("/proc/self/fd"))
        summary = import_paths(site.ctx, [upload], principal=principal)
        if regression.name == "zip-member-without-name.bin":  # skipped; its other members refused
            assert all(reason for _name, reason in summary.rejected)
        else:
            assert summary.outcomes["rejected"] == 1, regression.name
            assert summary.rejected[0][1].startswith("unreadable"), summary.rejected
        assert len(os.listdir("/proc/self/fd")) == descriptors
    assert not [p for p in site.scratch.iterdir() if p.name.startswith(".tmp-import-")]


def test_a_zip_spanning_disks_is_refused_not_raised(tmp_path: Path) -> None:
    """``zipfile.is_zipfile`` itself raised BadZipFile on a Zip64 end locator naming several disks
    (fuzz_import, after 873 841 executions): ``simral import`` and the portal upload stopped there."""
    from simral.archive.importing import import_paths

    site = _ingest_site()
    archive = tmp_path / "spanned.zip"
    archive.write_bytes(
        (harness.REGRESSIONS_DIR / "import" / "zip-zip64-end-record-spanning-disks.bin").read_bytes()[1:]
    )
    beside = tmp_path / "beside.dcm"
    shutil.copy(harness.CORPUS_DIR / "ingest" / "synthetic-explicit-le.dcm", beside)

    # Given itself (simral import FILE) and found in a folder (the portal upload, simral import DIR).
    for paths in ([archive, beside], [tmp_path]):
        summary = import_paths(site.ctx, paths, principal=_harness("import").IMPORTER)
        assert summary.rejected == [
            (str(archive), "unreadable ZIP: BadZipFile: zipfiles that span multiple disks are not supported")
        ]
        assert summary.outcomes["rejected"] == 1
        assert summary.outcomes["stored"] + summary.outcomes["duplicate"] == 1  # the file beside it


def test_dicomdir_records_cannot_name_files_outside_the_media(tmp_path: Path) -> None:
    """PS3.10 §8.5 file IDs: a record naming ``../OUTSIDE/IM1`` is not followed by ``simral import
    DICOMDIR`` (the instance beside the media stays out of the archive)."""
    from simral.archive.importing import import_paths

    site = _ingest_site()
    media = tmp_path / "media"
    instance = dcmread(harness.CORPUS_DIR / "ingest" / "synthetic-explicit-le.dcm")
    instance.SOPInstanceUID = instance.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    fileset = FileSet()
    fileset.add(instance)
    fileset.write(media)
    dicomdir = dcmread(media / "DICOMDIR")
    record = next(r for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r)
    inside = media.joinpath(*record.ReferencedFileID)
    outside = tmp_path / "OUTSIDE" / "IM1"
    outside.parent.mkdir()
    inside.rename(outside)
    record.ReferencedFileID = ["..", "OUTSIDE", "IM1"]
    dicomdir.save_as(media / "DICOMDIR")
    summary = import_paths(site.ctx, [media / "DICOMDIR"], principal=_harness("import").IMPORTER)
    assert sum(summary.outcomes.values()) == 0
    with site.ctx.db.reading() as session:
        from simral.archive.service import existing_blob

        assert existing_blob(session, str(instance.SOPInstanceUID)) is None


def acceptor_contexts_copy_check() -> None:
    """Run in a child process by the test below (it builds a ``DimseService``)."""
    from fuzz import fuzz_ingest

    from simral.dimse.server import DimseService

    fuzz_ingest.setup()
    try:
        site = fuzz_ingest._site.get()
        assert isinstance(site, harness.Site)
        service = DimseService(site.ctx)
        server = service.start("127.0.0.1", 0)
        try:
            copied = copy.deepcopy(server.contexts)
            assert [c.abstract_syntax for c in copied] == [c.abstract_syntax for c in server.contexts]
            first, original = copied[0], server.contexts[0]
            assert first is not original and first.transfer_syntax == original.transfer_syntax
            assert first.transfer_syntax[0] is original.transfer_syntax[0]
            first.transfer_syntax = first.transfer_syntax[:1]
            assert len(original.transfer_syntax) > 1
        finally:
            service.stop()
    finally:
        fuzz_ingest.teardown()


def test_acceptor_contexts_copy_shares_their_uids() -> None:
    """pynetdicom deep-copies the supported contexts for every connection: the copy must not
    rebuild (and re-validate) the thousands of transfer syntax UIDs (some 200 ms per connection)."""
    checked = run_python(
        "-c", "from tests.test_fuzz_regressions import acceptor_contexts_copy_check as c; c()"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def malformed_association_request_check() -> None:
    """Run in a child process by the test below (it builds a ``DimseService``)."""
    import socket
    import time

    from fuzz import fuzz_ingest

    from simral.dimse.server import DimseService

    fuzz_ingest.setup()
    try:
        site = fuzz_ingest._site.get()
        assert isinstance(site, harness.Site)
        service = DimseService(site.ctx)
        assert service.ae.acse_timeout >= 30
        port = service.start("127.0.0.1", 0).server_address[1]
        try:
            started = time.monotonic()
            for request in (b"\x01\x00\x00\x00\x00\x0a" + bytes(10), b"\x01\x00\x00\x00"):
                for _ in range(3):  # a malformed A-ASSOCIATE-RQ, a connection closed inside one
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        sock.sendall(request)
                        sock.shutdown(socket.SHUT_WR)
                        sock.settimeout(5)
                        while sock.recv(4096):
                            pass
            # A request pynetdicom decodes but cannot turn into its primitive (an even presentation
            # context ID) or negotiate (a context without abstract or transfer syntax) gets an
            # A-ABORT (provider, invalid PDU parameter value).
            for name in (
                "associate-rq-even-context-id.bin",
                "associate-rq-context-without-abstract-syntax.bin",
                "associate-rq-context-without-transfer-syntax.bin",
            ):
                data = (harness.REGRESSIONS_DIR / "dimse" / name).read_bytes()
                request = data[: 6 + int.from_bytes(data[2:6], "big")]  # the A-ASSOCIATE-RQ
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(request)
                    sock.settimeout(5)
                    assert sock.recv(10) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06]), name
            while service.ae.active_associations and time.monotonic() - started < 5:
                time.sleep(0.01)
            assert not service.ae.active_associations, "associations held after their connection closed"
        finally:
            service.stop()
    finally:
        fuzz_ingest.teardown()


def test_a_malformed_association_request_frees_its_slot_at_once() -> None:
    """pynetdicom's acceptor waited ``acse_timeout`` (30 s) for an A-ASSOCIATE-RQ after its
    connection had closed: a malformed request (or a connection closed inside one) held one of
    the ``maximum_associations`` slots that long; a few such connections a second kept every node
    out. Found by the DIMSE harness as its 100 ms per input (its acse_timeout). A request with an
    even presentation context ID (``regressions/dimse/associate-rq-even-context-id.bin``) killed
    pynetdicom's reader thread and held the connection open that long, unanswered; one with a
    presentation context without abstract syntax
    (``regressions/dimse/associate-rq-context-without-abstract-syntax.bin``) killed the
    association thread, with the same effect, as did one without transfer syntaxes
    (``associate-rq-context-without-transfer-syntax.bin``)."""
    checked = run_python(
        "-c", "from tests.test_fuzz_regressions import malformed_association_request_check as c; c()"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_multipart_boundary_the_parser_can_take() -> None:
    """A boundary python-multipart cannot take (over 256 characters) made STOW-RS answer 500; it is
    now refused as a malformed request (415), as are control characters. Longer-than-RFC-2046
    boundaries of real peers (Orthanc's DICOMweb plugin) are accepted."""
    from simral.dicomweb.multipart import MultipartError, request_boundary

    assert (
        request_boundary(f'multipart/related; type="application/dicom"; boundary={"b" * 70}')[1] == "b" * 70
    )
    assert request_boundary(f"multipart/related; boundary={'b' * 71}")[1] == "b" * 71
    assert request_boundary('multipart/related; boundary="a b:c"') == ("", "a b:c")
    for boundary in ("b" * 257, "B" * 300, '"ends with space "', '"tab\there"'):
        with pytest.raises(MultipartError):
            request_boundary(f"multipart/related; boundary={boundary}")


def test_content_type_parameters_the_standard_library_cannot_decode() -> None:
    """RFC 2231 continuations mixed with an unnumbered part (``type*5=...; type*=...``) made the
    standard library raise TypeError while reading the boundary: STOW-RS answered 500. Refused as a
    malformed request (415) now; well-formed RFC 2231 parameters still read."""
    from simral.dicomweb.multipart import MultipartError, request_boundary

    crash = (harness.REGRESSIONS_DIR / "stow" / "content-type-rfc2231-continuations-mixed.txt").read_bytes()
    content_type = crash.split(b"\n", 1)[0].decode("latin-1")
    with pytest.raises(MultipartError, match="malformed Content-Type parameters"):
        request_boundary(content_type)
    with pytest.raises(MultipartError, match="malformed Content-Type parameters"):
        request_boundary('multipart/related; type*5="a"; type*="b"; boundary=x')
    assert request_boundary(
        'multipart/related; type*0="application/"; type*1="dicom"; boundary*=\'\'simral'
    ) == ("application/dicom", "simral")


def test_pdq_quantity_and_birth_date_read_ascii_digits_only() -> None:
    """An RCP-2 quantity of digits str.isdigit accepts but int() refuses ("³0", from a Latin-1
    message) made the PDQ answer an "internal error" (ERR 207 with a traceback); such a quantity
    is no limit, and only ASCII digits make a birth date."""
    from simral.hl7.adt import Encoding
    from simral.hl7.pdq import read_query

    qpd = "QPD|IHE PDQ Query|Q-1|@PID.5.1.1^PAT~@PID.7^1979\u00b303\u00b328"
    query = read_query(qpd, "RCP|I|\u00b30^RD", Encoding())
    assert query.limit > 1 and query.criteria.birth_date == "19790328"
    assert read_query(qpd, "RCP|I|2^RD", Encoding()).limit == 2


def test_hl7_date_times_that_are_no_date_times_are_ignored() -> None:
    """An ORC-7 / TQ1 date/time whose offset is not digits, or falls outside a day, was an
    "application internal error" (ERR 207 with a traceback); HL7 v2.5.1 §2.A.22 DTM: no value."""
    from simral.hl7.orders import _timestamp

    assert str(_timestamp("20260106184418.123-0500")) == "2026-01-06 23:44:18+00:00"
    assert str(_timestamp("20260106184418")) == "2026-01-06 17:44:18+00:00"  # Europe/Paris
    not_ascii = "20260106184418+0\u00b300"  # "³" is a digit to str.isdigit, not to int()
    for value in (
        "2026010720+zz",
        "20260106184418+9999",
        "20260106184418+12345",
        "99991231235959-1400",
        not_ascii,
    ):
        assert _timestamp(value) is None, value


def test_adt_feed_of_hl7_v2_3_is_applied_without_pid_32() -> None:
    """hl7apy's v2.3 PID has no field 32 (Identity Reliability Code, v2.4+): reading it was an
    "application internal error"; an older feed's A28 is now applied with no identity status."""
    from simral.hl7 import adt

    site = _harness("hl7")._site.get()
    seed = (harness.CORPUS_DIR / "hl7" / "adt-a28.hl7").read_bytes().strip(b"\x0b\x1c\r")
    message = seed.replace(b"|P|2.5|", b"|P|2.3|").replace(b"|A28-1|", b"|A28-V23|")
    message = message.replace(b"IPP-1^^^", b"IPP-V23^^^").rsplit(b"|", 1)[0]  # no PID-32
    handled = adt.handle(site.ctx, message, peer="127.0.0.1")
    assert handled.code == "AA", handled.ack


def test_an_order_whose_placer_authority_is_too_long_is_refused_every_time() -> None:
    """An ORC-2.3 over 64 characters was stored cut to 64, so the same order sent again missed the
    duplicate check (full value) and its INSERT broke the unique key: "internal error" (ERR 207).
    It is now refused at once, each time, as a data type error (HL7 v2.5.1 table 0357: 102)."""
    from simral.hl7 import adt

    site = _harness("hl7")._site.get()
    sent = (harness.REGRESSIONS_DIR / "hl7" / "orm-placer-authority-over-64-sent-twice.hl7").read_bytes()
    order = sent.split(b"\x1c", 1)[0].lstrip(b"\x0b")
    assert b"|ORM^O01^ORM_O01|" in order
    for _ in range(2):
        handled = adt.handle(site.ctx, order, peer="127.0.0.1")
        assert handled.code == "AE", handled.ack
        assert b"|102^" in handled.ack and b"ORC-2.3" in handled.ack, handled.ack
        _harness("hl7").test_one_input(sent)  # the oracle: no error logged, an acknowledgement
