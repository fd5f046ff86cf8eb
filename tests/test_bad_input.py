"""Bad input over DIMSE and through ``simral import``: refused with a reason, nothing partial stored.

* broken instances sent with C-STORE get a failure status (or an abort), never success; the index, the
  blob store and the staging folder are unchanged and the serve log says why (DESIGN.md §3 step 1);
* garbage on the wire (random bytes, malformed P-DATA, absurd PDU lengths, a data set cut off midway, peers
  that stall inside a PDU) never stops the server from serving other associations;
* unknown calling AE titles get an A-ASSOCIATE-RJ (PS3.8 §9.3.4, reason 3; DESIGN.md §9);
* ``simral import`` of the same files exits 1 and lists every rejected file with its reason.

The DIMSE traffic is made with pynetdicom (``send_c_store`` of a file streams its data set bytes as they
are) or, below the DIMSE layer, as raw PDUs (PS3.8 §9.3), because the point is to test the server: a
well-behaved SCU such as dcmsend refuses to send most of these files in the first place.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification
from tests.conftest import BACKENDS, backend_env
from tests.corpus import bad_inputs, ct_series
from tests.dicomcmp import dataset_bytes
from tests.peers import SeaweedS3
from tests.simral_proc import SimralProcess

SCU = "BADSCU"
NETWORK_TIMEOUT = 5  # SIMRAL_NETWORK_TIMEOUT of the servers started here (seconds)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


# ---------------------------------------------------------------------------------------------------------
# Fixture: one server per backend, a supply of good instances, the bad files


@dataclass
class Setup:
    backend: str
    simral: SimralProcess
    bad: dict[str, Path]
    good: list[Path]
    work: Path
    s3: SeaweedS3 | None = None
    bucket: str = ""
    _next_good: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def good_instance(self) -> Path:
        """A good instance, each in turn (after a full cycle they come again, as identical duplicates)."""
        with self._lock:
            path = self.good[self._next_good % len(self.good)]
            self._next_good += 1
        return path

    def spool_files(self) -> set[str]:
        """Files in the staging folder (where C-STORE data sets are spooled while received)."""
        return {name for name in self.stored_files() if name.startswith((".scratch/", "tmp/"))}

    def stored_files(self) -> set[str]:
        """Every file of the blob store and of its staging folder."""
        data = self.simral.data_dir
        if self.s3 is None:
            root = data / "blobs"
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        keys = set()
        for page in self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys.update(f"s3:{item['Key']}" for item in page.get("Contents", []))
        scratch = data / "tmp"
        return keys | {f"tmp/{p.name}" for p in scratch.iterdir() if p.is_file()}


@pytest.fixture(autouse=True)
def _chunked_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    # send_c_store(path) streams the file's data set bytes as they are, broken or not.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module", params=BACKENDS)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    bad = bad_inputs(work / "bad")
    good = ct_series(work / "good", slices=150, rows=32, cols=32, patient_id="GOODPROBE", seed=11)
    env = backend_env(request.param, request)
    simral = SimralProcess(
        work / "data",
        env=env,
        extra_env={"COLUMNS": "200", "SIMRAL_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT)},
    )
    simral.add_node("bad-scu", SCU, 104)
    s3 = request.getfixturevalue("seaweed") if env.get("SIMRAL_STORAGE") == "s3" else None
    with simral:
        yield Setup(request.param, simral, bad, good, work, s3, env.get("SIMRAL_S3_BUCKET", ""))


# ---------------------------------------------------------------------------------------------------------
# Helpers: pynetdicom SCU, C-FIND counts, the serve log


def _ae(*contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title=SCU)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae


def _count(simral: SimralProcess, **keys: str) -> int:
    """Number of IMAGE-level C-FIND matches for ``keys``."""
    ae = _ae((StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", simral.dicom_port, ae_title=simral.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    query.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    try:
        return sum(
            1
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        )
    finally:
        assoc.release()


def _probe(setup: Setup) -> str | None:
    """C-ECHO then C-STORE of a good instance on a fresh association; None when both succeed."""
    ae = _ae((Verification, [ExplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian]))
    try:
        assoc = ae.associate("127.0.0.1", setup.simral.dicom_port, ae_title=setup.simral.ae_title)
    except Exception as exc:
        return f"associate: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        return "association not established (rejected or aborted)"
    try:
        echo = assoc.send_c_echo()
        if echo.get("Status") != 0x0000:
            return f"C-ECHO status {echo.get('Status')}"
        store = assoc.send_c_store(setup.good_instance())
        if store.get("Status") != 0x0000:
            return f"C-STORE status {store.get('Status')}"
    finally:
        if assoc.is_established:
            assoc.release()
    return None


class _Log:
    """What the serve log gained since the mark."""

    def __init__(self, simral: SimralProcess) -> None:
        self.path = simral.log_path
        self.offset = self.path.stat().st_size

    def new(self) -> str:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")


def _check_clean(simral: SimralProcess) -> None:
    result = simral.cli("check", check=False)
    assert result.returncode == 0 and "consistent" in result.stdout, (
        f"simral check: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )


def _is_failure(status: int) -> bool:
    """PS3.4 B.2.3 / PS3.7 C: failures, as opposed to success (0000) and warnings (0001, Bxxx)."""
    return status not in (0x0000, 0x0001) and not 0xB000 <= status <= 0xBFFF


# ---------------------------------------------------------------------------------------------------------
# Broken instances over C-STORE


def _part10(path: Path, raw: bytes, *, sop_class: str, sop_instance: str, syntax: str) -> Path:
    """A Part 10 file whose file meta announces ``syntax`` and whose data set is ``raw``, unchanged.

    ``send_c_store(path)`` puts exactly ``raw`` on the wire as the data set of a C-STORE request with
    these Affected SOP Class / Instance UIDs, in the presentation context of ``syntax``.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(raw)
    return path


@dataclass(frozen=True)
class BadCase:
    """What to send, how to find it in the index afterwards, and the reason expected in the log."""

    path: Path
    find: dict[str, str]
    reason: str = ""  # expected in the serve log ('' = any "instance rejected" line)


def _bad_case(setup: Setup, kind: str, work: Path) -> BadCase:
    bad = setup.bad
    if kind in {"truncated", "missing_study_uid", "missing_sop_uid", "absurd_length"}:
        reasons = {
            "truncated": "cut short",
            "missing_study_uid": "missing StudyInstanceUID",
            "missing_sop_uid": "missing SOPInstanceUID",
            "absurd_length": "claims 4294967280 bytes",
        }
        # The files are sent as they are: their data set bytes after their own file meta.
        return BadCase(bad[kind], {"PatientID": f"BAD-{kind}"}, reasons[kind])
    if kind == "missing_series_uid":
        ds = dcmread(setup.good[-1])
        del ds.SeriesInstanceUID
        ds.PatientID = "BAD-missing_series_uid"
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(work / "missing_series_uid.dcm", enforce_file_format=True)
        return BadCase(
            work / "missing_series_uid.dcm", {"PatientID": ds.PatientID}, "missing SeriesInstanceUID"
        )
    if kind == "no_meta":
        # A bare implicit VR data set (no preamble, no file meta) streamed as it is in an Explicit VR
        # Little Endian context, as an SCU that sends file bytes without looking would: the data set does
        # not match the negotiated transfer syntax (PS3.5 §10.1) and cannot be stored as such.
        ds = dcmread(bad[kind], force=True, stop_before_pixels=True)
        path = _part10(
            work / "no_meta.part10",
            bad[kind].read_bytes(),
            sop_class=ds.SOPClassUID,
            sop_instance=ds.SOPInstanceUID,
            syntax=ExplicitVRLittleEndian,
        )
        return BadCase(path, {"PatientID": "BAD-no_meta"})
    if kind.startswith("garbage"):
        syntax = ImplicitVRLittleEndian if kind.endswith("implicit") else ExplicitVRLittleEndian
        uid = generate_uid()
        path = _part10(
            work / f"{kind}.part10",
            bad["garbage"].read_bytes(),
            sop_class=CTImageStorage,
            sop_instance=uid,
            syntax=syntax,
        )
        return BadCase(path, {"SOPInstanceUID": uid})
    raise AssertionError(kind)


BAD_KINDS = [
    "truncated",
    "no_meta",
    "missing_study_uid",
    "missing_sop_uid",
    "missing_series_uid",
    "absurd_length",
    "garbage_explicit",
    "garbage_implicit",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_instance_over_c_store_is_refused_and_leaves_nothing(
    setup: Setup, kind: str, tmp_path: Path
) -> None:
    case = _bad_case(setup, kind, tmp_path)
    before = setup.stored_files()
    log = _Log(setup.simral)
    ae = _ae(
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ImplicitVRLittleEndian]),
    )
    assoc = ae.associate("127.0.0.1", setup.simral.dicom_port, ae_title=setup.simral.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(case.path)
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" in status:  # an abort (no response) is acceptable too
        assert _is_failure(status.Status), (
            f"{kind}: C-STORE answered 0x{status.Status:04X} {status.get('ErrorComment', '')}"
        )
    assert _count(setup.simral, **case.find) == 0, f"{kind}: the refused instance is in the index"
    assert setup.stored_files() == before, f"{kind}: the store changed: {setup.stored_files() ^ before}"
    logged = log.new()
    assert "instance rejected" in logged, f"{kind}: no rejection reason in the serve log:\n{logged}"
    assert case.reason in logged, f"{kind}: expected {case.reason!r} in the serve log:\n{logged}"
    _check_clean(setup.simral)
    assert _probe(setup) is None  # and the server is still fine


# ---------------------------------------------------------------------------------------------------------
# simral import


def test_import_of_bad_files_reports_each_and_stores_nothing(setup: Setup) -> None:
    simral = setup.simral
    before = setup.stored_files()
    count_before = _count(simral)
    result = simral.cli("import", *map(str, setup.bad.values()), check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    rejected = {
        line.split(": ", 2)[1]: line.split(": ", 2)[2]
        for line in result.stdout.splitlines()
        if line.startswith("rejected: ") and line.count(": ") >= 2
    }
    assert set(rejected) == {str(p) for p in setup.bad.values()}, output
    assert all(reason.strip() for reason in rejected.values()), output
    expected = {
        "truncated": "cut short",
        "no_meta": "not a DICOM Part 10 file",
        "missing_study_uid": "missing StudyInstanceUID",
        "missing_sop_uid": "missing SOPInstanceUID",
        "absurd_length": "claims 4294967280 bytes",
    }
    for kind, reason in expected.items():
        assert reason in rejected[str(setup.bad[kind])], (kind, rejected[str(setup.bad[kind])])
    counts = re.findall(r"^\W*rejected\W+(\d+)\W*$", result.stdout, re.MULTILINE)
    assert counts == [str(len(setup.bad))], output
    assert _count(simral) == count_before
    assert setup.stored_files() == before
    _check_clean(simral)


# ---------------------------------------------------------------------------------------------------------
# Raw PDUs (PS3.8 §9.3)


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _associate_rq(called: str, calling: str, contexts: dict[int, tuple[str, list[str]]]) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2) proposing ``contexts`` {id: (abstract, [syntaxes])}."""
    body = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, (abstract, syntaxes) in contexts.items():
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, s.encode()) for s in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    header = struct.pack(
        ">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), bytes(32)
    )
    return struct.pack(">BBI", 0x01, 0, len(header + body)) + header + body


def _p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU (PS3.8 §9.3.5) of PDVs (context id, message control header, fragment)."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def _c_store_command(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set (PS3.7 §9.3.1.1), Implicit VR Little Endian with its group length."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    encoded = encode(command, True, True)
    length = Dataset()
    length.CommandGroupLength = len(encoded)
    return encode(length, True, True) + encoded


def _recv_pdu(sock: socket.socket, timeout: float) -> tuple[int, bytes] | str:
    """The next PDU (type, body), or 'closed' / 'timeout'."""
    sock.settimeout(timeout)
    try:
        header = b""
        while len(header) < 6:
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return "closed"
            header += chunk
        pdu_type, _, length = struct.unpack(">BBI", header)
        body = b""
        while len(body) < length:
            chunk = sock.recv(min(65536, length - len(body)))
            if not chunk:
                return "closed"
            body += chunk
        return pdu_type, body
    except TimeoutError:
        return "timeout"
    except ConnectionError:
        return "closed"


def _connect(simral: SimralProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", simral.dicom_port), timeout=10)


def _associated(simral: SimralProcess, contexts: dict[int, tuple[str, list[str]]]) -> socket.socket:
    sock = _connect(simral)
    sock.sendall(_associate_rq(simral.ae_title, SCU, contexts))
    answer = _recv_pdu(sock, 10)
    assert isinstance(answer, tuple) and answer[0] == 0x02, f"no A-ASSOCIATE-AC: {answer!r}"
    return sock


def _ends_connection(sock: socket.socket, what: str, timeout: float = 15) -> None:
    """The server answers ``what`` with an A-ABORT or closes the connection (and nothing else)."""
    answer = _recv_pdu(sock, timeout)
    sock.close()
    assert answer == "closed" or (isinstance(answer, tuple) and answer[0] == 0x07), (
        f"{what}: expected A-ABORT or close, got {answer!r}"
    )


def _rss_mb(simral: SimralProcess) -> float:
    assert simral.proc is not None
    for line in Path(f"/proc/{simral.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


CONTEXTS = {1: (Verification, [ExplicitVRLittleEndian]), 3: (CTImageStorage, [ExplicitVRLittleEndian])}


def test_unknown_calling_ae_is_rejected(setup: Setup) -> None:
    simral = setup.simral
    sock = _connect(simral)
    sock.sendall(_associate_rq(simral.ae_title, "INTRUDER", CONTEXTS))
    answer = _recv_pdu(sock, 10)
    sock.close()
    # A-ASSOCIATE-RJ: result 1 (rejected-permanent), source 1 (service user), reason 3 (calling AE
    # title not recognized), PS3.8 §9.3.4.
    assert answer == (0x03, bytes([0, 1, 1, 3])), answer
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", simral.dicom_port, ae_title=simral.ae_title)
    assert assoc.is_rejected and not assoc.is_established
    assert _probe(setup) is None


def test_garbage_pdus_do_not_disturb_other_associations(setup: Setup) -> None:
    simral = setup.simral
    rss_before = _rss_mb(simral)
    spooled_before = setup.spool_files()
    left_behind: dict[str, set[str]] = {}
    stop = threading.Event()
    outcomes: list[str | None] = []

    def prober() -> None:
        while not stop.is_set():
            outcomes.append(_probe(setup))
            time.sleep(0.05)

    def attack_done(what: str) -> None:
        # Spool files of the probes' C-STOREs come and go; one still there 2 s later was left behind.
        deadline = time.monotonic() + 2
        while (new := setup.spool_files() - spooled_before) and time.monotonic() < deadline:
            time.sleep(0.1)
        if new:
            left_behind[what] = new
            spooled_before.update(new)

    thread = threading.Thread(target=prober, name="prober")
    thread.start()
    try:
        # 1. Random bytes instead of an A-ASSOCIATE-RQ.
        sock = _connect(simral)
        sock.sendall(os.urandom(4096))
        _ends_connection(sock, "random bytes")
        attack_done("random bytes")

        # 2. A valid association, then a P-DATA-TF whose PDV claims more than the PDU holds.
        sock = _associated(simral, CONTEXTS)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IBB", 1000, 1, 0x03) + b"abcd")
        _ends_connection(sock, "PDV longer than its PDU")
        attack_done("PDV longer than its PDU")

        # 3. A C-STORE-RQ in a presentation context that was never negotiated.
        sock = _associated(simral, CONTEXTS)
        sock.sendall(_p_data((99, 0x03, _c_store_command(CTImageStorage, generate_uid()))))
        _ends_connection(sock, "unknown presentation context")
        attack_done("C-STORE-RQ in an unknown presentation context")

        # 4. A command set that is random bytes (last command fragment).
        sock = _associated(simral, CONTEXTS)
        sock.sendall(_p_data((1, 0x03, os.urandom(200))))
        _ends_connection(sock, "garbage command set")
        attack_done("garbage command set")

        # 5. Absurd PDU lengths: before association and inside one; the peer then stalls a little.
        absurd = []
        sock = _connect(simral)
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF) + b"\x00\x01")
        absurd.append(sock)
        sock = _associated(simral, CONTEXTS)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0) + os.urandom(1024))
        absurd.append(sock)
        time.sleep(2)  # the prober keeps working meanwhile
        for sock in absurd:
            sock.close()
        attack_done("absurd PDU lengths")
    finally:
        stop.set()
        thread.join(120)
    failures = [o for o in outcomes if o is not None]
    assert len(outcomes) >= 3, f"only {len(outcomes)} probes ran during the attacks"
    assert not failures, f"{len(failures)}/{len(outcomes)} probes failed during the attacks: {failures[:3]}"
    assert _probe(setup) is None, "the server does not serve after the attacks"
    rss_after = _rss_mb(simral)
    assert rss_after - rss_before < 200, f"RSS grew from {rss_before:.0f} MB to {rss_after:.0f} MB"
    assert not left_behind, f"spool files left in the staging folder: {left_behind}"
    _check_clean(simral)


def test_store_cut_off_mid_data_set_leaves_nothing(setup: Setup, tmp_path: Path) -> None:
    """A peer that vanishes (or aborts) halfway through a C-STORE data set leaves no file behind."""
    simral = setup.simral
    before = setup.stored_files()
    sent = []
    for how in ("close", "abort"):
        path = ct_series(tmp_path / how, slices=1, rows=64, cols=64, patient_id=f"CUTOFF-{how}", seed=21)[0]
        _, raw = dataset_bytes(path)
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        sock = _associated(simral, CONTEXTS)
        sock.sendall(_p_data((3, 0x03, _c_store_command(CTImageStorage, uid))))
        sock.sendall(_p_data((3, 0x00, raw[: len(raw) // 2])))  # not the last fragment
        time.sleep(0.5)
        if how == "abort":
            sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))  # A-ABORT, service user
        sock.close()
        sent.append(uid)
    deadline = time.monotonic() + 10
    while setup.stored_files() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    for uid in sent:
        assert _count(simral, SOPInstanceUID=uid) == 0
    assert setup.stored_files() == before, (
        f"files left behind by cut-off C-STOREs: {sorted(setup.stored_files() - before)}"
    )
    _check_clean(simral)


# ---------------------------------------------------------------------------------------------------------
# Peers that stall inside a PDU


def _stall_before_association(simral: SimralProcess) -> socket.socket:
    """A connection whose A-ASSOCIATE-RQ announces 64 KiB of which only 2 bytes ever come."""
    sock = _connect(simral)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFF) + b"\x00\x01")
    return sock


def _stall_in_association(simral: SimralProcess) -> socket.socket:
    """An association whose next P-DATA-TF announces 64 KiB of which only 100 bytes ever come."""
    sock = _associated(simral, CONTEXTS)
    sock.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFF) + bytes(100))
    return sock


def _still_open(stalled: list[socket.socket], within: float) -> int:
    """How many of ``stalled`` the server neither aborted nor closed within ``within`` seconds."""
    deadline = time.monotonic() + within
    still_open = 0
    for sock in stalled:
        if _recv_pdu(sock, max(0.1, deadline - time.monotonic())) == "timeout":
            still_open += 1
    return still_open


def test_peers_stalled_inside_a_pdu_are_dropped(tmp_path: Path) -> None:
    """A peer that stops halfway through a PDU is dropped after the network timeout.

    Otherwise each such peer (a crashed modality, a dropped NAT mapping, a hostile client) keeps a
    connection, a reader thread and, mid C-STORE, a spool file for ever.
    """
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT)})
    simral.add_node("bad-scu", SCU, 104)
    with simral:
        stalled = [_stall_before_association(simral) for _ in range(3)]
        stalled += [_stall_in_association(simral) for _ in range(3)]
        try:
            still_open = _still_open(stalled, NETWORK_TIMEOUT + 10)
        finally:
            for sock in stalled:
                sock.close()
        assert not still_open, (
            f"{still_open}/{len(stalled)} connections stalled inside a PDU are still open "
            f"{NETWORK_TIMEOUT + 10} s later (network timeout {NETWORK_TIMEOUT} s)"
        )
        assert _probe_echo(simral)


def _probe_echo(simral: SimralProcess) -> bool:
    ae = _ae((Verification, [ExplicitVRLittleEndian]))
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", simral.dicom_port, ae_title=simral.ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.get("Status") == 0x0000


@pytest.mark.slow
def test_stalled_peers_do_not_lock_everyone_out(tmp_path: Path) -> None:
    """More peers stalled inside their A-ASSOCIATE-RQ than the association limit: others are served again
    once the stalled connections time out (network timeout, then at worst the ACSE/ARTIM timeout, 30 s).
    """
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT)})
    simral.add_node("bad-scu", SCU, 104)
    with simral:
        stalled = [_stall_before_association(simral) for _ in range(70)]
        started = time.monotonic()
        served_after = None
        try:
            while time.monotonic() - started < NETWORK_TIMEOUT + 30 + 10:
                if _probe_echo(simral):
                    served_after = time.monotonic() - started
                    break
                time.sleep(1)
        finally:
            for sock in stalled:
                sock.close()
        assert served_after is not None, (
            f"no association served for {NETWORK_TIMEOUT + 40} s while {len(stalled)} peers stall inside "
            f"their A-ASSOCIATE-RQ (network timeout {NETWORK_TIMEOUT} s)"
        )
