"""DICOM upper-layer service provider on pynetdicom (PS3.7 DIMSE, PS3.8 upper layer).

Services: Verification (C-ECHO), Storage (C-STORE, every storage SOP class and transfer syntax
pynetdicom knows), Query/Retrieve Patient Root and Study Root (C-FIND, C-MOVE, C-GET), Storage
Commitment Push Model (N-ACTION / N-EVENT-REPORT), Modality Worklist (C-FIND, PS3.4 K) and
Modality Performed Procedure Step (N-CREATE / N-SET, PS3.4 F.7). This module translates; the
archive and reading services do the work.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session

from simral import tls
from simral.access.policy import Principal, peer_binding_refusal
from simral.archive import query as qr
from simral.archive import service as archive
from simral.archive.models import Instance, Patient, Series, Study
from simral.audit import service as audit
from simral.context import AppContext
from simral.dimse import commitment, sending
from simral.nodes import service as nodes
from simral.nodes.models import RemoteNode
from simral.observability import metrics
from simral.reading import mpps, worklist
from simral.sharing import service as sharing

log = logging.getLogger(__name__)

FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
    ModalityWorklistInformationFind: "WORKLIST",
}
MOVE_MODELS = {
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
}
GET_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}
#: The non-storage SOP classes served and the DIMSE commands answered for each (PS3.4); storage SOP
#: classes (C-STORE) come from pynetdicom's list. ``simral.web.route_rules.DIMSE_RULES`` covers them all.
SERVICE_CLASSES: dict[str, tuple[str, ...]] = {
    Verification: ("C-ECHO",),
    **{uid: ("C-FIND",) for uid in FIND_MODELS},
    **{uid: ("C-MOVE",) for uid in MOVE_MODELS},
    **{uid: ("C-GET",) for uid in GET_MODELS},
    StorageCommitmentPushModel: ("N-ACTION",),
    ModalityPerformedProcedureStep: ("N-CREATE", "N-SET"),
}
_NO_SUCH_AE = "\x00no-registered-node"
#: The acceptor picks the first of these the requestor proposes in a context (PS3.8 §9.3.3.2):
#: explicit VR first (keeps VRs), then the other native syntaxes, then every encapsulated one.
ACCEPTED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian] + [
    ts
    for ts in ALL_TRANSFER_SYNTAXES
    if ts not in {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian}
]


class _SupportedContexts(list[PresentationContext]):
    """The acceptor's supported presentation contexts, cheap to deep-copy.

    pynetdicom deep-copies them for every incoming connection, before anything is negotiated or
    checked; a deep copy re-creates (and re-validates) each of the ~8000 transfer syntax UIDs of
    simral's contexts: some 200 ms of CPU per connection, which any peer could ask for in a loop.
    UIDs are immutable strings: the copy shares them and copies the contexts and their lists.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate.__dict__ = {
                key: list(value) if isinstance(value, list) else value
                for key, value in context.__dict__.items()
            }
            copies.append(duplicate)
        return copies


class ReusePortServer(ThreadedAssociationServer):
    """Association server binding with SO_REUSEPORT (several acceptor processes share a port)."""

    contexts: list[PresentationContext]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _SupportedContexts(self.contexts)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        """Stop serving and close the socket (this server is not in the AE's own server list)."""
        socketserver.TCPServer.shutdown(self)
        self.server_close()

    def get_request(self) -> tuple[socket.socket, Any]:
        # TCP_NODELAY is set by the EVT_CONN_OPEN handler (sending.set_nodelay), as on
        # associations simral opens.
        request, address = self.socket.accept()
        # accept() returns a blocking socket: without a timeout a peer that stops inside a PDU
        # blocks pynetdicom's reader (and holds an association slot) for ever.
        request.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            # The TLS handshake (PS3.15 B.1) runs in the association's thread (finish_request),
            # not here: a silent or slow peer must not hold up the acceptor.
            request = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.warning("DICOM TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().finish_request(request, client_address)


def _drop_spool_file(message: Any) -> None:
    _drop_file(getattr(message, "_data_set_file", None))


def _drop_file(handle: Any) -> None:
    if handle is not None:
        handle.close()
        Path(handle.name).unlink(missing_ok=True)


def _install_request_check() -> None:
    """Abort an A-ASSOCIATE-RQ that decodes as a PDU but carries an invalid parameter value.

    pynetdicom turns the request into its primitive in the reader thread's state machine action
    (AE-6); a value the primitive refuses, such as an even presentation context ID (PS3.8
    §9.3.2.2: odd integers 1 to 255), raised there and killed the reader: no answer, and the
    connection and its association slot held until ``acse_timeout`` (30 s); a presentation
    context without an abstract syntax or without transfer syntaxes raised in the association
    thread's negotiation, with the same effect (the reader's idle timeout). Such a request is
    handled as the invalid PDU it is (PS3.8 Table 9-10, Sta2 + Evt19, AA-1): an A-ABORT (service
    provider, invalid PDU parameter value) and the ARTIM timer, then Sta13.
    """
    import pynetdicom.fsm as fsm
    from pynetdicom.pdu import A_ABORT_RQ

    description, action, states = fsm.ACTIONS["AE-6"]
    if getattr(action, "_simral", False):
        return

    def checked_ae_6(dul: Any) -> str:
        try:
            primitive = dul._recv_pdu.queue[0].to_primitive()
            for context in primitive.presentation_context_definition_list:
                if context.abstract_syntax is None or not context.transfer_syntax:
                    # PS3.8 §9.3.2.2: one Abstract Syntax Sub-Item and one or more Transfer Syntax
                    # Sub-Items per context (pynetdicom's negotiation raised in the association
                    # thread, leaving the peer unanswered).
                    raise ValueError("a presentation context without abstract or transfer syntax")
        except IndexError:
            pass  # nothing received: pynetdicom's own action reports it
        except Exception as exc:
            dul._recv_pdu.get(False)
            log.info("A-ASSOCIATE-RQ aborted: invalid parameter value (%s)", type(exc).__name__)
            pdu = A_ABORT_RQ()
            pdu.source = 0x02
            pdu.reason_diagnostic = 0x06
            dul._send(pdu)
            dul.artim_timer.restart()
            return "Sta13"
        return str(action(dul))

    checked_ae_6._simral = True  # type: ignore[attr-defined]
    fsm.ACTIONS["AE-6"] = (description, checked_ae_6, states)


def _install_spool_cleanup() -> None:
    """Delete a C-STORE spool file when decoding the rest of its message fails, or when a new
    command set replaces its message before the data set ended.

    pynetdicom opens the spool file before it looks the presentation context up; a P-DATA for a
    context that was never negotiated raises KeyError there, kills the DUL reactor thread, and no
    EVT_CONN_CLOSE follows.
    """
    from pynetdicom.dimse_messages import DIMSEMessage

    if getattr(DIMSEMessage.decode_msg, "_simral", False):
        return
    original = DIMSEMessage.decode_msg

    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        previous = getattr(self, "_data_set_file", None)
        try:
            done = bool(original(self, primitive, assoc))
        except BaseException:
            _drop_spool_file(self)
            if previous is not getattr(self, "_data_set_file", None):
                _drop_file(previous)
            raise
        current = getattr(self, "_data_set_file", None)
        if previous is not None and previous is not current:
            # A command set began before the data set of the previous one ended (PS3.7 §9.3.1
            # allows no interleaving): pynetdicom opened a second spool file over the first.
            _drop_file(previous)
        if current is not None and current is not previous and assoc is not None:
            # Remembered, so that the association's end removes it if no handler took it.
            assoc.__dict__.setdefault("_simral_spools", []).append(current)
        return done

    decode_msg._simral = True  # type: ignore[attr-defined]
    DIMSEMessage.decode_msg = decode_msg


#: Seconds between two Pending responses of one C-MOVE or C-GET (PS3.4 C.4.2.3.1, C.4.3.3.1: the
#: SCP *may* send them during the sub-operations). pynetdicom sends one after every sub-operation,
#: a third of the CPU a moved instance costs; the requestor still hears of progress every interval
#: and the final response carries the counts.
PENDING_RESPONSE_INTERVAL = 1.0


def _install_pending_interval(interval: float = PENDING_RESPONSE_INTERVAL) -> None:
    """Send a C-MOVE / C-GET Pending response only when ``interval`` seconds have passed since the
    last one for the same request (the first sub-operation's is always sent)."""
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    if getattr(DIMSEServiceProvider.send_msg, "_simral", False):
        return
    original = DIMSEServiceProvider.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, (C_MOVE, C_GET)) and primitive.Status is not None:
            last: dict[int, float] = self.__dict__.setdefault("_simral_pending_sent", {})
            key = int(primitive.MessageIDBeingRespondedTo or 0)
            if primitive.Status == 0xFF00:
                now = time.monotonic()
                if key in last and now - last[key] < interval:
                    return
                last[key] = now
            else:  # the final response: the request is over
                last.pop(key, None)
        original(self, primitive, context_id)

    send_msg._simral = True  # type: ignore[attr-defined]
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]


class SpoolFile:
    """The file a C-STORE data set is received into, surviving a full disk.

    pynetdicom writes each received fragment to its spool file as it arrives; a write failing
    (ENOSPC, EDQUOT, EIO) would end its network reader and leave the sender without an answer.
    Here the first failure is recorded, the file truncated (its space freed at once) and the rest
    of the data set read and dropped, so the request is answered "Refused: Out of Resources"
    (PS3.4 B.2.3 status A700) on an association that stays usable.
    """

    def __init__(self, folder: str | None = None) -> None:
        self.error: OSError | None = None
        self._fd: int | None = None
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        except OSError as exc:
            self.error = exc
            self.name = os.path.join(folder or tempfile.gettempdir(), f".unwritable-{id(self)}.dcm")

    @property
    def file(self) -> SpoolFile:
        """pynetdicom flushes through ``.file``; writes here are unbuffered."""
        return self

    def flush(self) -> None:
        return None

    def write(self, data: bytes | memoryview) -> int:
        if self.error is None and self._fd is not None:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self.error = exc
                os.ftruncate(self._fd, 0)
        return len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _spool_file(*_args: Any, **_kwargs: Any) -> SpoolFile:
    return SpoolFile(tempfile.gettempdir())


def _install_spool_file() -> None:
    """Receive C-STORE data sets into :class:`SpoolFile` (pynetdicom's ``NamedTemporaryFile``)."""
    import pynetdicom.dimse_messages as dimse_messages

    dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[assignment]


def spool_error(event: evt.Event) -> OSError | None:
    """The error that kept a C-STORE data set from being received whole to disk, if any."""
    return getattr(getattr(event.request, "_dataset_file", None), "error", None)


def _observed(kind: str, protocol: str, responses: Iterator[Any]) -> Iterator[Any]:
    """Pass a C-FIND/C-GET/C-MOVE handler's responses through to pynetdicom, timing the operation
    and counting its outcome (the last status yielded, PS3.7 Annex C) and, for a retrieve, its
    C-STORE sub-operations (pending responses carrying an instance)."""
    started = time.perf_counter()
    outcome, sent = "success", 0
    try:
        for response in responses:
            if isinstance(response, tuple) and len(response) == 2:
                status = response[0]
                if status is None or isinstance(status, int):
                    outcome = metrics.dimse_outcome(status)
                    if status == 0xFF00 and response[1] is not None:
                        sent += 1
            yield response
    except GeneratorExit:
        raise  # pynetdicom stopped asking after the final status: the outcome stands
    except BaseException:
        outcome = "failure"
        raise
    finally:
        metrics.record_request(kind, protocol, outcome, time.perf_counter() - started)
        if kind == "retrieve":
            metrics.record_retrieved_instances(protocol, sent)


class SimralAE(ApplicationEntity):
    """The archive's AE; only registered calling AE titles are accepted unless configured otherwise."""

    def __init__(self, ctx: AppContext) -> None:
        super().__init__(ae_title=ctx.settings.ae_title)
        self.ctx = ctx

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        """Registered AE titles (PS3.8 §7.1.1.3 association rejection reason 3 for others)."""
        if self.ctx.settings.allow_unknown_ae:
            return []
        with self.ctx.db.reading() as session:
            titles = [n.ae_title for n in nodes.list_all(session)]
        return titles or [_NO_SUCH_AE]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:  # pragma: no cover - set by pynetdicom init
        pass


class DimseService:
    """Binds the archive services to pynetdicom events."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        sending.install()  # with the event-driven reactors (simral.dimse.eventloop)
        _install_request_check()
        _install_spool_cleanup()
        _install_spool_file()
        _install_pending_interval()
        # The network reader and the association thread hand data to each other many times per
        # instance; a shorter GIL switch interval than CPython's 5 ms cuts that latency.
        sys.setswitchinterval(0.0005)
        # Received datasets are spooled where the store can take them by rename.
        tempfile.tempdir = str(ctx.store.scratch_dir())
        ae = SimralAE(ctx)
        ae.maximum_pdu_size = settings.max_pdu
        ae.maximum_associations = 64
        ae.network_timeout = settings.network_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = settings.network_timeout
        ae.connection_timeout = 10
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_SYNTAXES, scu_role=True, scp_role=True)
        for uid in SERVICE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES[:4])
        # Outgoing associations (C-MOVE sub-operations, N-EVENT-REPORT on a new association).
        ae.add_requested_context(StorageCommitmentPushModel)
        self.ae = ae
        self.server: ReusePortServer | None = None
        self.servers: list[ReusePortServer] = []
        self.handlers = [
            (evt.EVT_CONN_OPEN, self.on_connection_open),
            (evt.EVT_CONN_CLOSE, self.on_connection_close),
            (evt.EVT_RELEASED, self.on_association_end),
            (evt.EVT_ABORTED, self.on_association_end),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_N_CREATE, self.on_n_create),
            (evt.EVT_N_SET, self.on_n_set),
        ]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> ReusePortServer:
        """Start accepting associations in background threads; over TLS with ``ssl_context``
        (PS3.15 B.1), with the same handlers and AE settings. May be called once per port."""
        server = self.ae.make_server(
            (host, port), ssl_context=ssl_context, evt_handlers=self.handlers, server_class=ReusePortServer
        )
        if self.server is None:
            self.server = server
        self.servers.append(server)
        kind = "DICOM TLS" if ssl_context is not None else "DICOM"
        thread = threading.Thread(target=server.serve_forever, name=f"{kind.lower()}-acceptor", daemon=True)
        thread.start()
        log.info("%s service %s listening on %s:%d", kind, self.ae.ae_title, host, server.server_address[1])
        return server

    def stop(self) -> None:
        """Stop accepting and end the open associations."""
        for server in self.servers:
            server.shutdown()
        for assoc in list(self.ae.active_associations):
            assoc.abort()

    # -- helpers -----------------------------------------------------------------------------------

    def principal(self, event: evt.Event) -> Principal:
        """The calling node as the access policy sees it: its organisation, or archive-wide.

        Looked up once per association. An AE title absent from the registry (accepted only when
        ``allow_unknown_ae`` is set, for a lab) acts archive-wide.
        """
        assoc = event.assoc
        cached: Principal | None = getattr(assoc, "_simral_principal", None)
        if cached is not None:
            return cached
        calling = assoc.requestor.ae_title.strip()
        with self.ctx.db.reading() as session:
            node = nodes.get_by_ae(session, ae_title=calling)
            shared = (
                sharing.shared_study_uids(session, organisation=node.organisation)
                if node is not None and node.organisation
                else frozenset()
            )
        principal = Principal(
            kind="dicom-node",
            shared=shared,
            name=calling,
            organisation=node.organisation if node is not None else "",
            archive_wide=node.archive_wide if node is not None else self.ctx.settings.allow_unknown_ae,
            address=str(assoc.requestor.address),
            via="tls-certificate" if node is not None and node.tls_subject else "ae-title",
        )
        assoc._simral_principal = principal  # type: ignore[attr-defined]
        return principal

    # -- handlers ----------------------------------------------------------------------------------

    @staticmethod
    def tls_subject_cn(event: evt.Event) -> str | None:
        """Subject CN of the verified client certificate of a DICOM TLS association (PS3.15 B.1),
        ``None`` on plain TCP or without one; recorded when the connection opened."""
        return getattr(event.assoc, "_simral_tls_subject_cn", None)

    def on_connection_open(self, event: evt.Event) -> None:
        sending.set_nodelay(event)
        transport = event.assoc.dul.socket
        subject = tls.peer_common_name(transport.socket if transport is not None else None)
        event.assoc._simral_tls_subject_cn = subject  # type: ignore[attr-defined]

    def on_connection_close(self, event: evt.Event) -> None:
        """Remove the spool file of a C-STORE data set the peer never finished sending; end the
        association at once when the connection closed before an A-ASSOCIATE-RQ was read.

        pynetdicom's acceptor waits ``acse_timeout`` (30 s) for the request even when its reader
        already ended: a malformed A-ASSOCIATE-RQ (aborted, PS3.8 §9.2 AA-1), or a connection
        closed before one, held an association slot that long, so a peer opening a few such
        connections a second kept every other node out (``maximum_associations``). The wait is
        given ``None``, what pynetdicom's wait returns at its timeout.
        """
        assoc = event.assoc
        _drop_spool_file(getattr(assoc.dimse, "message", None))
        if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.put(None)

    def on_association_end(self, event: evt.Event) -> None:
        """Remove the C-STORE spool files of the association that no handler took: requests still
        queued when it was released or aborted, or refused by pynetdicom before reaching
        :meth:`on_store` (an unknown SOP class). Runs in the association's thread once it serves
        no request any more; a file :meth:`on_store` moved into the store is no longer there."""
        for handle in getattr(event.assoc, "_simral_spools", ()):
            _drop_file(handle)

    @property
    def outgoing(self) -> dict[str, Any]:
        """Association options for associations simral opens (PDU size, TCP_NODELAY)."""
        return {
            "max_pdu": self.ctx.settings.max_pdu,
            "evt_handlers": [(evt.EVT_CONN_OPEN, sending.set_nodelay)],
        }

    def outgoing_to(self, node: RemoteNode) -> dict[str, Any]:
        """:attr:`outgoing` for ``node``, over DICOM TLS when the node is registered with ``tls``."""
        return {**self.outgoing, "tls_args": tls.tls_args(self.ctx.settings, tls=node.tls, host=node.host)}

    def on_established(self, event: evt.Event) -> None:
        """Refuse a registered AE title that calls from another host than its registered one (when
        the node says so) or without the client certificate it is bound to (PS3.15 B.1); such a
        refusal is a security alert in the audit trail. Unknown AE titles are refused at the
        association (PS3.8 rejection reason 3), unless ``allow_unknown_ae`` is set."""
        calling = event.assoc.requestor.ae_title.strip()
        subject = self.tls_subject_cn(event)
        if subject is not None:
            log.info("DICOM TLS association from AE %s, client certificate CN=%s", calling, subject)
        with self.ctx.db.reading() as session:
            node = nodes.get_by_ae(session, ae_title=calling)
        if node is None:
            return
        address = str(event.assoc.requestor.address)
        reason = peer_binding_refusal(
            bound_host=node.host,
            check_host=node.check_host,
            bound_subject=node.tls_subject,
            address=address,
            subject=subject,
        )
        if not reason:
            return
        log.warning("association from AE %s refused: %s", calling, reason)
        audit.record_now(
            self.ctx,
            action="association.refused",
            principal=Principal(
                kind="dicom-node", name=calling, organisation=node.organisation, address=address
            ),
            outcome="failure",
            detail={"reason": reason, "certificate_cn": subject or ""},
        )
        event.assoc.abort()

    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_store(self, event: evt.Event) -> Dataset | int:
        """C-STORE (PS3.4 B.2.3): acknowledge once the instance is durable and indexed."""
        request = event.request
        failed = spool_error(event)
        if failed is not None:
            log.error("C-STORE data set could not be received to disk: %s", failed.strerror or failed)
            status = Dataset()
            status.Status = archive.OUT_OF_RESOURCES
            status.ErrorComment = "Out of resources: the archive cannot write the data set"
            return status
        path = Path(event.dataset_path)
        result = archive.ingest_file(
            self.ctx,
            path,
            principal=self.principal(event),
            source=event.assoc.requestor.ae_title.strip(),
            move=True,
            expected_sop_uid=str(request.AffectedSOPInstanceUID or ""),
            entry="dimse",
        )
        status = Dataset()
        status.Status = result.status
        if result.reason:
            status.ErrorComment = result.reason[:64]
        return status

    def on_find(self, event: evt.Event) -> Iterator[Any]:
        """C-FIND (PS3.4 C.4.1.3, K.4.1.3), timed and counted by :func:`_observed`."""
        worklist_find = UID(event.request.AffectedSOPClassUID) == ModalityWorklistInformationFind
        return _observed("query", "mwl" if worklist_find else "c-find", self._find(event))

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1.3): one pending response per match."""
        model = FIND_MODELS.get(UID(event.request.AffectedSOPClassUID))
        if model is None:
            yield 0xC000, None
            return
        if model == "WORKLIST":
            yield from self._find_worklist(event)
            return
        try:
            identifier = event.identifier
            query_plan = qr.plan(identifier, model=model)  # type: ignore[arg-type]
        except qr.QueryError as exc:
            log.info("C-FIND refused: %s", exc)
            yield exc.status, None
            return
        except Exception as exc:
            log.info("C-FIND identifier not understood: %s", type(exc).__name__)
            yield 0xC000, None
            return
        principal = self.principal(event)
        keys = {
            elem.keyword: str(elem.value)[:200]
            for elem in identifier
            if elem.keyword and elem.value not in (None, "")
        }

        def answers(session: Session) -> Iterator[Dataset]:
            for result in qr.run(session, query_plan, principal=principal):
                yield qr.response_identifier(
                    result,
                    query_plan,
                    retrieve_ae_title=self.ae.ae_title,
                    model=model,  # type: ignore[arg-type]
                )

        yield from self._answer_find(
            event, principal, answers, protocol="DIMSE C-FIND", level=query_plan.level, keys=keys
        )

    def _answer_find(
        self,
        event: evt.Event,
        principal: Principal,
        answers: Callable[[Session], Iterator[Dataset]],
        *,
        protocol: str,
        level: str,
        keys: dict[str, str],
    ) -> Iterator[tuple[int, Dataset | None]]:
        """One pending response per answer (C-CANCEL honoured), the query audited, then success."""
        matches = 0
        with self.ctx.db.reading() as session:
            for answer in answers(session):
                if event.is_cancelled:
                    yield 0xFE00, None
                    return
                matches += 1
                yield 0xFF00, answer
        archive.audit_query(self.ctx, principal, protocol=protocol, level=level, keys=keys, matches=matches)
        yield 0x0000, None

    def _find_worklist(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """Modality Worklist C-FIND (PS3.4 K.4.1.3): one pending response per worklist item."""
        try:
            identifier = event.identifier
            keys = worklist.query_keys(identifier)
        except Exception as exc:
            log.info("MWL C-FIND identifier not understood: %s", type(exc).__name__)
            yield 0xA900, None
            return
        principal = self.principal(event)
        yield from self._answer_find(
            event,
            principal,
            lambda session: worklist.find(session, identifier, principal=principal),
            protocol="DIMSE C-FIND MWL",
            level="WORKLIST",
            keys=keys,
        )

    @staticmethod
    def _mpps_failure(exc: mpps.MppsError) -> Dataset:
        status = Dataset()
        status.Status = exc.status
        status.ErrorComment = str(exc)[:64]
        if exc.error_id is not None:
            status.ErrorID = exc.error_id
        return status

    def on_n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-CREATE (PS3.4 F.7.2.1): the modality starts a performed procedure step."""
        if event.request.AffectedSOPClassUID != ModalityPerformedProcedureStep:
            return 0x0118, None  # No such SOP Class
        try:
            attributes = event.attribute_list
            sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
        except Exception:
            return 0x0110, None
        created: Dataset | None = None
        if not sop_instance_uid:
            sop_instance_uid = str(generate_uid())
            created = Dataset()
            created.AffectedSOPInstanceUID = sop_instance_uid
        try:
            with self.ctx.db.unit_of_work() as session:
                mpps.create(
                    session,
                    sop_instance_uid=sop_instance_uid,
                    attributes=attributes,
                    principal=self.principal(event),
                    station_ae=event.assoc.requestor.ae_title.strip(),
                )
        except mpps.MppsError as exc:
            log.info("MPPS N-CREATE refused: status 0x%04X", exc.status)
            return self._mpps_failure(exc), None
        answer = created if created is not None else Dataset()
        return 0x0000, answer

    def on_n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-SET (PS3.4 F.7.2.2): the modality updates, completes or discontinues its step."""
        if event.request.RequestedSOPClassUID != ModalityPerformedProcedureStep:
            return 0x0118, None
        try:
            modifications = event.modification_list
            sop_instance_uid = str(event.request.RequestedSOPInstanceUID or "")
        except Exception:
            return 0x0110, None
        try:
            with self.ctx.db.unit_of_work() as session:
                mpps.update(
                    session,
                    sop_instance_uid=sop_instance_uid,
                    modifications=modifications,
                    principal=self.principal(event),
                )
        except mpps.MppsError as exc:
            log.info("MPPS N-SET refused: status 0x%04X", exc.status)
            return self._mpps_failure(exc), None
        return 0x0000, modifications

    def _retrieve_instances(self, event: evt.Event, model: str) -> list[archive.StoredInstance] | int:
        """The instances a C-MOVE/C-GET identifier names, or a failure status.

        The identifier must give the unique key of its level (PS3.4 C.4.2.2.1, C.4.3.2.1): an
        empty StudyInstanceUID never means "the whole archive".
        """
        try:
            identifier = event.identifier
            query_plan = qr.plan(identifier, model=model)  # type: ignore[arg-type]
        except qr.QueryError as exc:
            return exc.status
        except Exception:
            return 0xC000
        unique = qr.UNIQUE_KEY[query_plan.level]
        if not str(identifier.get(unique, "") or "").strip().strip("*"):
            log.info("retrieve refused: no %s in the identifier", unique)
            return 0xA900
        principal = self.principal(event)
        with self.ctx.db.reading() as session:
            uids = [self._pk(result) for result in qr.run(session, query_plan, principal=principal)]
            if not uids:
                return []
            level = query_plan.level
            base = archive.instances_query(principal)
            column = {"PATIENT": Patient.id, "STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}[
                level
            ]
            found: list[archive.StoredInstance] = []
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                found.extend(archive.iter_instances(session, base.where(column.in_(chunk))))
            found = archive.with_shown_identities(session, principal, found)
        try:
            destination = str(event.move_destination or "").strip()
        except AttributeError:
            destination = ""
        archive.audit_reads(
            self.ctx,
            principal,
            [item.study_uid for item in found],
            action="study.retrieve",
            detail={"protocol": "DIMSE C-MOVE" if destination else "DIMSE C-GET", "destination": destination},
        )
        return found

    @staticmethod
    def _pk(result: qr.Result) -> int:
        entity = result.instance or result.series or result.study or result.patient
        return entity.id

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE, timed and counted by :func:`_observed`."""
        return _observed("retrieve", "c-move", self._move(event))

    def _move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE (PS3.4 C.4.2.3): C-STORE sub-operations to a registered destination."""
        model = MOVE_MODELS.get(UID(event.request.AffectedSOPClassUID), "STUDY")
        destination = str(event.move_destination or "").strip()
        with self.ctx.db.reading() as session:
            node = nodes.get_by_ae(session, ae_title=destination)
        if node is None:
            log.info("C-MOVE to unknown destination AE refused")
            yield None, None
            return
        instances = self._retrieve_instances(event, model)
        if isinstance(instances, int):
            # pynetdicom answers Success to zero sub-operations and needs the destination
            # association before any status: open it with Verification only, announce one
            # sub-operation and fail it with the identifier's status.
            yield node.host, node.port, {**self.outgoing_to(node), "contexts": [build_context(Verification)]}
            yield 1
            yield instances, None
            return
        contexts = sending.contexts_for(instances) or None
        yield node.host, node.port, {**self.outgoing_to(node), "contexts": contexts}
        yield len(instances)
        for item in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield (
                0xFF00,
                sending.StoredInstanceDataset(
                    item, self.ctx, allow_transcode=self.ctx.settings.transcode_on_retrieve
                ),
            )

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET, timed and counted by :func:`_observed`."""
        return _observed("retrieve", "c-get", self._get(event))

    def _get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET (PS3.4 C.4.3.3): C-STORE sub-operations on the same association."""
        model = GET_MODELS.get(UID(event.request.AffectedSOPClassUID), "STUDY")
        instances = self._retrieve_instances(event, model)
        if isinstance(instances, int):
            yield 1  # see on_move: a failure needs a non-zero announced count
            yield instances, None
            return
        yield len(instances)
        for item in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield (
                0xFF00,
                sending.StoredInstanceDataset(
                    item, self.ctx, allow_transcode=self.ctx.settings.transcode_on_retrieve
                ),
            )

    def on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """Storage Commitment request (PS3.4 J.3.2): answer, then report on this or a new association."""
        if event.request.RequestedSOPClassUID != StorageCommitmentPushModel:
            return 0x0112, None
        if event.action_type != 1:
            return 0x0123, None  # No such action
        try:
            action = event.action_information
        except Exception:
            return 0x0110, None
        calling = event.assoc.requestor.ae_title.strip()
        principal = self.principal(event)
        report = commitment.evaluate(self.ctx, action, principal=principal)
        if report is None:
            return 0x0120, None  # Missing attribute
        thread = threading.Thread(
            target=commitment.deliver,
            args=(self.ae, self.ctx, event.assoc, calling, report),
            name="stgcmt-report",
            daemon=True,
        )
        thread.start()
        return 0x0000, None
