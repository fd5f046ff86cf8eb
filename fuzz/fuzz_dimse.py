"""Fuzz the DICOM upper layer as simral accepts it (PS3.8 §9 PDUs, PS3.7 DIMSE): the input is what
a peer sends on a TCP connection to ``dimse.server.DimseService`` (pynetdicom's acceptor with
simral's AE, handlers and event hooks) on the loopback interface: a whole A-ASSOCIATE-RQ first
and the rest once it is answered, any other input at once; the harness then half-closes, reads
until the acceptor closes, and closes itself on an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT as a
requestor does (PS3.8 §9.2). One real association per input: its two pynetdicom threads are
joined before the oracle looks.

Seeds are recorded associations of a pynetdicom SCU (calling AE registered): C-ECHO, C-STORE,
C-FIND (Study Root, Patient Root, Modality Worklist), C-GET, MPPS N-CREATE / N-SET, Storage
Commitment N-ACTION, and an unknown calling AE.
Expected: the acceptor answers what it can (or aborts) and closes the connection within the
input's time limit; no exception in the association threads, no error logged by simral, no
C-STORE spool file left in the scratch folder.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from fuzz import harness

# simral only: pynetdicom's reactor threads poll every 0.2 ms, and instrumented polling loops
# slow the whole exchange a hundredfold.
with harness.instrumented(__name__, include=["simral"]):
    from simral.dimse.server import DimseService

NAME = "dimse"
MAX_LEN = 16 * 1024
#: How long the acceptor may take to close after the peer stopped sending.
CLOSE_WITHIN = 8.0
#: The acceptor's ACSE timeout, which is also its ARTIM timer (PS3.8 §9.1.5): longer than
#: CLOSE_WITHIN, so that a connection only the timer would close is a bug. Every input ends with
#: the harness's half-close, so the acceptor has no reason to wait for its timer.
ACSE_TIMEOUT = CLOSE_WITHIN * 2

_site = harness.SiteHolder(renew_every=20000)
_peer: list[Any] = []


def undecodable_dimse_message(args: threading.ExceptHookArgs) -> bool:
    """pynetdicom's ``DIMSEMessage.decode_msg`` trusts the command set: an unknown Command Field
    (KeyError), a command set without Command Data Set Type (AttributeError), a context never
    negotiated (as simral's ``_install_spool_cleanup`` notes)... raise in the DUL thread. The
    connection closes at once and the association ends (the oracle checks the rest: no hang, no
    spool file, no descriptor left): upstream, not simral."""
    frames = traceback.extract_tb(args.exc_traceback)
    return any(f.name == "decode_msg" and f.filename.endswith("pynetdicom/dimse_messages.py") for f in frames)


_oracle = harness.Oracle(tolerated=(undecodable_dimse_message,))
_services: dict[int, tuple[DimseService, int]] = {}


def setup() -> None:
    _oracle.install()
    if not _peer:
        _peer.append(_commitment_peer())
        _site.scu_port = _peer[0].server_address[1]


def teardown() -> None:
    _oracle.uninstall()
    for service, _port in _services.values():
        service.stop()
    _services.clear()
    while _peer:
        _peer.pop().shutdown()
    _site.close()


def _commitment_peer() -> Any:
    """The registered node's own listener: a Storage Commitment SCU taking N-EVENT-REPORTs (the
    reports simral sends on a new association, PS3.4 J.3.3)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StorageCommitmentPushModel

    ae = AE(ae_title=harness.SCU_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = CLOSE_WITHIN / 2
    return ae.start_server(("127.0.0.1", 0), block=False)


def _service(site: harness.Site) -> tuple[DimseService, int]:
    found = _services.get(id(site))
    if found is None:
        for service, _port in _services.values():
            service.stop()
        _services.clear()
        service = DimseService(site.ctx)
        service.ae.network_timeout = CLOSE_WITHIN / 2
        # Since simral ends an association whose connection closed before its A-ASSOCIATE-RQ (it
        # waited this long, 30 s in simral serve), and drops what Sta13 does not define (the reactor
        # spun until ARTIM), an input left waiting for this timer is a bug (the close deadline).
        service.ae.acse_timeout = ACSE_TIMEOUT
        service.ae.dimse_timeout = CLOSE_WITHIN / 2
        server = service.start("127.0.0.1", 0)
        found = (service, server.server_address[1])
        _services[id(site)] = found
    return found


def pdus(data: bytes) -> list[bytes]:
    """``data`` cut at its PDU boundaries (PS3.8 §9.3: type, reserved, 32-bit length); the last
    piece may be a partial PDU."""
    pieces, start = [], 0
    while start + 6 <= len(data):
        end = start + 6 + int.from_bytes(data[start + 2 : start + 6], "big")
        pieces.append(data[start:end])
        start = end
    if start < len(data):
        pieces.append(data[start:])
    return pieces


def _exchange(port: int, data: bytes) -> None:
    """Play ``data`` as a requestor does (PS3.8 §9.2: the A-ASSOCIATE-RQ, then, once answered, the
    other PDUs), half-close, and read until the acceptor closes (or the deadline).

    Only a whole A-ASSOCIATE-RQ is answered before the rest arrives: for any other first PDU the
    acceptor aborts, or reads on (blocking on a partial PDU header until its network timeout), so
    the whole input is sent at once."""
    deadline = time.monotonic() + CLOSE_WITHIN
    pieces = pdus(data)
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN) as sock:
        try:
            first = pieces[0] if pieces else b""
            if len(pieces) > 1 and first[0] == 0x01 and len(first) == 6 + int.from_bytes(first[2:6], "big"):
                sock.sendall(pieces[0])
                # The answer (A-ASSOCIATE-AC / RJ, an A-ABORT) or the close, before the rest.
                if select.select([sock], [], [], CLOSE_WITHIN / 2)[0] and not sock.recv(
                    65536, socket.MSG_PEEK
                ):
                    return
                pieces = pieces[1:]
            sock.sendall(b"".join(pieces))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return  # the acceptor closed first (an abort before the whole input was read)
        answer = bytearray()
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return
            except TimeoutError:
                break
            if not chunk:
                return
            answer += chunk
            if _association_over(answer):
                # A requestor closes on an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT (PS3.8 §9.2,
                # Sta13): the acceptor's ARTIM wait ends there; its threads must still end.
                return
    raise harness.Bug(f"the acceptor did not close the connection within {CLOSE_WITHIN} s")


def _association_over(answer: bytes | bytearray) -> bool:
    """Whether the acceptor's PDUs so far include an A-ASSOCIATE-RJ (0x03), an A-RELEASE-RP (0x06)
    or an A-ABORT (0x07)."""
    start = 0
    while start + 6 <= len(answer):
        if answer[start] in (0x03, 0x06, 0x07):
            return True
        start += 6 + int.from_bytes(answer[start + 2 : start + 6], "big")
    return False


def _settled(service: DimseService, before: set[threading.Thread]) -> None:
    """Wait for the association threads, and those they started (a Storage Commitment report
    sent on a new association), to end: joined (no polling loop competing with them for the GIL)."""
    deadline = time.monotonic() + CLOSE_WITHIN
    while True:
        running = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not running and not service.ae.active_associations:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            names = sorted(t.name for t in running)
            raise harness.Bug(f"threads still running after the connection closed: {names}")
        if running:
            running[0].join(left)
        else:
            time.sleep(0.0005)  # an association listed a moment longer than its thread runs


def test_one_input(data: bytes) -> None:
    site = _site.get()
    service, port = _service(site)
    before = set(threading.enumerate())
    with _oracle.watching(scratch=site.scratch):
        _exchange(port, data)
        _settled(service, before)


# ------------------------------------------------------------------------------------- seeds


class _Recorder:
    """A loopback TCP relay that records what the client sends to the acceptor."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
            while True:
                try:
                    chunk = src.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if record:
                    self.sent.extend(chunk)
                dst.sendall(chunk)

        back = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
        back.start()
        pump(client, upstream, True)
        back.join(5)
        client.close()
        upstream.close()
        self.listener.close()


def seeds(dicom_files: dict[str, bytes]) -> dict[str, bytes]:
    """Record the byte streams of real associations (see the module docstring)."""
    from io import BytesIO

    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import (
        CTImageStorage,
        ModalityPerformedProcedureStep,
        ModalityWorklistInformationFind,
        MRImageStorage,
        PatientRootQueryRetrieveInformationModelFind,
        StorageCommitmentPushModel,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        Verification,
    )

    site = harness.open_site()
    service = DimseService(site.ctx)
    port = service.start("127.0.0.1", 0).server_address[1]
    instance = dcmread(BytesIO(dicom_files["synthetic-explicit-le.dcm"]))
    recorded: dict[str, bytes] = {}

    def record(
        name: str, contexts: list[str], work: Callable[[Any], None], *, calling: str = harness.SCU_AE
    ) -> None:
        recorder = _Recorder(port)
        ae = AE(ae_title=calling)
        for uid in contexts:
            ae.add_requested_context(uid)
        roles = (
            [build_role(MRImageStorage, scu_role=True, scp_role=True)] if MRImageStorage in contexts else []
        )
        assoc = ae.associate("127.0.0.1", recorder.port, ae_title="SIMRAL", ext_neg=roles)
        if assoc.is_established:
            work(assoc)
            assoc.release()
        recorder.thread.join(10)
        recorded[name] = bytes(recorder.sent)

    def query(**keys: str) -> Dataset:
        ds = Dataset()
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    record("echo.bin", [Verification], lambda a: a.send_c_echo())
    record("store-mr.bin", [MRImageStorage, CTImageStorage], lambda a: a.send_c_store(instance))
    study = str(instance.StudyInstanceUID)
    record(
        "find-study.bin",
        [StudyRootQueryRetrieveInformationModelFind],
        lambda a: list(
            a.send_c_find(
                query(
                    QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="PAT*", StudyDate="20260101-"
                ),
                StudyRootQueryRetrieveInformationModelFind,
            )
        ),
    )
    record(
        "find-patient.bin",
        [PatientRootQueryRetrieveInformationModelFind],
        lambda a: list(
            a.send_c_find(
                query(QueryRetrieveLevel="PATIENT", PatientID="IPP-CHX-1", PatientName=""),
                PatientRootQueryRetrieveInformationModelFind,
            )
        ),
    )

    def mwl(assoc: Any) -> None:
        step = Dataset()
        step.Modality = "MR"
        step.ScheduledStationAETitle = harness.SCU_AE
        step.ScheduledProcedureStepStartDate = "20260106-20260107"
        ds = query(PatientName="", PatientID="", AccessionNumber="")
        ds.ScheduledProcedureStepSequence = [step]
        list(assoc.send_c_find(ds, ModalityWorklistInformationFind))

    record("find-mwl.bin", [ModalityWorklistInformationFind], mwl)
    record(
        "get-study.bin",
        [StudyRootQueryRetrieveInformationModelGet, MRImageStorage],
        lambda a: list(
            a.send_c_get(
                query(QueryRetrieveLevel="STUDY", StudyInstanceUID=study),
                StudyRootQueryRetrieveInformationModelGet,
            )
        ),
    )

    def mpps(assoc: Any) -> None:
        attributes = query(
            PerformedProcedureStepStatus="IN PROGRESS",
            PerformedProcedureStepStartDate="20260106",
            PerformedProcedureStepStartTime="134418",
            Modality="MR",
            PatientName="PAT-TROIS^DOMINIQUE",
            PatientID="IPP-CHX-1",
            PerformedStationAETitle=harness.SCU_AE,
            PerformedProcedureStepID="PPS-1",
        )
        attributes.ScheduledStepAttributesSequence = [query(StudyInstanceUID=study, AccessionNumber="ACC-1")]
        uid = "1.2.826.0.1.3680043.8.498.4242.77"
        assoc.send_n_create(attributes, ModalityPerformedProcedureStep, uid)
        assoc.send_n_set(
            query(PerformedProcedureStepStatus="COMPLETED", PerformedProcedureStepEndDate="20260106"),
            ModalityPerformedProcedureStep,
            uid,
        )

    record("mpps.bin", [ModalityPerformedProcedureStep], mpps)

    def commit(assoc: Any) -> None:
        ref = query(
            ReferencedSOPClassUID=MRImageStorage, ReferencedSOPInstanceUID=str(instance.SOPInstanceUID)
        )
        action = query(TransactionUID="1.2.826.0.1.3680043.8.498.4242.78")
        action.ReferencedSOPSequence = [ref]
        assoc.send_n_action(action, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")

    record("commitment.bin", [StorageCommitmentPushModel], commit)
    record("unknown-ae.bin", [Verification], lambda a: a.send_c_echo(), calling="NOBODY")
    service.stop()
    site.close()
    return recorded


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
