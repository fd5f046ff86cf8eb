"""Event-driven reactors for pynetdicom's associations (PS3.8 §9.2 state machine, unchanged).

pynetdicom runs two threads per association and both poll. Its DUL reactor (``run_reactor``) sleeps
``_run_loop_delay`` whenever the socket is quiet, then handles one received PDU or one outgoing
primitive per loop; its association reactor (``_run_reactor``) sleeps 1 ms between looks at the
queue of received DIMSE messages; the end of an association waits in 10 ms steps (``kill``) and a
fixed 100 ms after an abort (``_abort_blocking``). A busy association waits for those polls, an
idle one burns CPU on them.

:func:`install` replaces only the waiting, on both sides (associations simral accepts and those it
requests: C-MOVE sub-operations, forwarding, storage commitment reports); pynetdicom's state
machine, PDUs and DIMSE messages are untouched:

- the DUL thread blocks in ``poll`` on the association socket and on a wake-up socket written
  when another thread queues an outgoing primitive or stops the reactor, with a timeout of the
  running ARTIM timer (PS3.8 §9.1.5); then it handles every queued primitive, every available
  PDU and every state machine event before it waits again. A TLS socket's decrypted bytes
  (``SSLSocket.pending``) are read before waiting, ``poll`` does not see them;
- PDUs are read through a receive buffer: one ``recv_into`` takes what the kernel holds (several
  PDUs, or a PDU's larger part) instead of pynetdicom's 4 KiB reads and their copies;
- the association thread waits on an event set when a DIMSE message, an A-RELEASE or A-ABORT
  indication is queued for it or the DUL thread ends, with the network idle timer as timeout;
- the end of an association waits for the DUL thread's state change (Sta1) or end, not in steps,
  and an abort does not sleep afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import T_CONNECT

log = logging.getLogger("pynetdicom.dul")

#: Longest wait without any event; timers and wake-ups end waits sooner. A bound, not a poll.
MAX_WAIT = 1.0
#: The receive buffer's read size.
RECV_SIZE = 262144
_HEADER = struct.Struct(">BBL")
_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after each put (the consumer waits on something else too)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


# -- DUL reactor -------------------------------------------------------------------------------------


def _wake_dul(dul: Any) -> None:
    """Wake the DUL thread from another thread (nothing to do from its own: it looks before waiting)."""
    if dul.__dict__.get("_simral_thread") == threading.get_ident() or dul.__dict__.get("_simral_pending"):
        return
    dul._simral_pending = True
    writer = dul.__dict__.get("_simral_wake_w")
    if writer is not None:
        # OSError: closed (the reactor ended) or full (a wake-up is pending anyway).
        with contextlib.suppress(OSError):
            writer.send(b"\0")


def _get_kill(dul: Any) -> bool:
    return bool(dul.__dict__.get("_simral_kill", False))


def _set_kill(dul: Any, value: bool) -> None:
    dul.__dict__["_simral_kill"] = value
    if value:
        _wake_dul(dul)


def _artim_remaining(dul: Any) -> float | None:
    timer = dul.artim_timer
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return None
    return max(0.0, float(timer.remaining))


def _buffered(dul: Any) -> bytearray:
    buffer: bytearray | None = dul.__dict__.get("_simral_rbuf")
    if buffer is None:
        buffer = dul._simral_rbuf = bytearray()
    return buffer


def _fill(dul: Any, sock: Any, want: int) -> bool:
    """Read from ``sock`` until the buffer holds ``want`` bytes; False if the connection ended.

    Each read goes into one scratch area kept per association (no allocation per read) and takes
    all the kernel holds, up to ``RECV_SIZE``.
    """
    buffer = _buffered(dul)
    scratch: memoryview | None = dul.__dict__.get("_simral_scratch")
    if scratch is None:
        scratch = dul._simral_scratch = memoryview(bytearray(RECV_SIZE))
    while len(buffer) < want:
        count = sock.recv_into(scratch)
        if not count:
            return False
        buffer += scratch[:count]
    return True


def _read_pdu_data(self: Any) -> None:
    """pynetdicom's ``_read_pdu_data`` (the same events, PS3.8 §9.2 Evt3-Evt19) over a buffer."""
    sock = self.socket.socket
    buffer = _buffered(self)
    try:
        complete = _fill(self, sock, 6)
    except (OSError, TimeoutError) as exc:
        log.error("Connection closed before the entire PDU was received")
        log.exception(exc)
        self.event_queue.put("Evt17")
        return
    if not complete:
        buffer.clear()
        self.event_queue.put("Evt17")
        return
    pdu_type, _, pdu_length = _HEADER.unpack_from(buffer)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        log.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        buffer.clear()
        self.event_queue.put("Evt19")
        return
    try:
        complete = _fill(self, sock, 6 + pdu_length)
    except (OSError, TimeoutError) as exc:
        log.error("Connection closed before the entire PDU was received")
        log.exception(exc)
        buffer.clear()
        self.event_queue.put("Evt17")
        return
    if not complete:
        log.error(
            f"The received PDU is shorter than expected ({len(buffer)} of {6 + pdu_length} bytes received)"
        )
        buffer.clear()
        self.event_queue.put("Evt17")
        return
    with memoryview(buffer) as view:
        data = bytes(view[: 6 + pdu_length])
    del buffer[: 6 + pdu_length]
    try:
        pdu, event = _decode_pdu(self, data)
        self.event_queue.put(event)
    except Exception as exc:
        log.error("Unable to decode the received PDU data")
        log.exception(exc)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _decode_pdu(self: Any, data: bytes) -> tuple[Any, str]:
    """pynetdicom's ``_decode_pdu`` without its copy of the (already immutable) PDU bytes."""
    from pynetdicom import evt

    evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
    pdu_cls, event = _PDU_TYPES[data[0:1]]
    pdu = pdu_cls()
    pdu.decode(data)
    evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    return pdu, event


def _readable(dul: Any, *, ask_kernel: bool) -> bool:
    """Bytes to read: buffered here, decrypted in the TLS layer, reported by the last ``poll`` or,
    with ``ask_kernel``, in the kernel now (``select`` without waiting, as pynetdicom)."""
    if dul.__dict__.get("_simral_rbuf"):
        return True
    transport = dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None or not transport._is_connected:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if dul.__dict__.get("_simral_polled"):
        dul._simral_polled = False
        return True
    return ask_kernel and bool(transport.ready)


def _is_transport_event(self: Any) -> bool:
    """pynetdicom's ``_is_transport_event`` (Sta13: read what is left, then close) over the buffer."""
    if self.state_machine.current_state == "Sta13":
        if _readable(self, ask_kernel=True):
            self._read_pdu_data()
            return True
        self.socket.close()
        return True
    # Not asking the kernel here: the wait's ``poll`` does, and returns at once if data is there.
    if _readable(self, ask_kernel=False):
        self._read_pdu_data()
        return True
    return False


def _wait(dul: Any, wake_r: socket.socket) -> None:
    """Block until the socket is readable, a wake-up arrives or the ARTIM timer runs out."""
    timeout = MAX_WAIT
    artim = _artim_remaining(dul)
    if artim is not None:
        timeout = min(timeout, artim)
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    transport = dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None and transport._is_connected:
        try:
            fileno = sock.fileno()
        except OSError:
            fileno = -1
        if fileno >= 0:
            poller.register(fileno, _POLL_IN)
    wake_fd = wake_r.fileno()
    for fd, _ in poller.poll(timeout * 1000):
        if fd == wake_fd:
            with contextlib.suppress(OSError):
                wake_r.recv(4096)
        else:
            # Readable, or an error or hang-up, which the read turns into Evt17.
            dul._simral_polled = True


def _notify_state(dul: Any) -> None:
    condition: threading.Condition = dul._simral_state
    with condition:
        condition.notify_all()


#: Sta1 (Idle) and Sta13 (awaiting transport close): PS3.8 Table 9-10 defines no action there for
#: the other events, which pynetdicom's state machine raises on (InvalidEventError, killing the
#: thread); after the connection is gone they are dropped.
_CONNECTION_GONE = frozenset({"Sta1", "Sta13"})
#: The events ``_process_recv_primitive`` raises for the primitive first in ``to_provider_queue``
#: (A-ASSOCIATE request/accept/reject, P-DATA, A-RELEASE request/response, A-ABORT).
_LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def _is_connect_result(dul: Any, event: str) -> bool:
    """Whether ``event`` is the outcome (Evt2 / Evt17) of the T-CONNECT first in the queue."""
    with contextlib.suppress(IndexError):
        head = dul.to_provider_queue.queue[0]
        return isinstance(head, T_CONNECT) and head.result == event
    return False


def run_reactor(self: Any) -> None:
    """The DUL reactor: handle all that is ready, then wait for the socket, a wake-up or a timer."""
    self._simral_thread = threading.get_ident()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    self._simral_wake_w = wake_w
    self._idle_timer.start()
    assoc = self.assoc
    state = self.state_machine.current_state
    try:
        assoc._dul_ready.set()
        while not self._kill_thread:
            self._simral_pending = False
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                busy = self._process_recv_primitive()
                if not busy and self._is_transport_event():
                    self._idle_timer.restart()
                    busy = True
            except Exception as exc:
                log.error("Exception in DUL.run(), aborting association")
                log.exception(exc)
                # As pynetdicom: the state machine is bypassed, an A-ABORT sent (PS3.8 §9.3.8).
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                assoc.is_aborted = True
                assoc.is_established = False
                assoc._kill = True
                self._kill_thread = True
                return
            while True:
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    break
                current = self.state_machine.current_state
                if current in _CONNECTION_GONE and (event, current) not in TRANSITION_TABLE:
                    # The connection is closed or closing: a second "connection closed" (a failed
                    # send and the read of the closed socket both report it), or a response the
                    # association hands over after the peer left, has nothing left to do. A local
                    # primitive's event leaves the primitive queued (its action would take it):
                    # taken here, or it would be seen again at every turn, busy until ARTIM.
                    if event in _LOCAL_PRIMITIVE_EVENTS or _is_connect_result(self, event):
                        with contextlib.suppress(queue.Empty):
                            self.to_provider_queue.get(block=False)
                    continue
                self.state_machine.do_action(event)
                busy = True
            if self.state_machine.current_state != state:
                state = self.state_machine.current_state
                _notify_state(self)
            if busy or self._kill_thread or self.to_provider_queue.qsize():
                continue
            _wait(self, wake_r)
    finally:
        self._simral_exited = True
        self._simral_wake_w = None
        wake_w.close()
        wake_r.close()
        _notify_state(self)
        _wake_assoc(assoc)


def stop_dul(self: Any) -> bool:
    """pynetdicom's ``stop_dul``: stop the reactor if in Sta1, joined rather than polled."""
    if self.state_machine.current_state != "Sta1":
        return False
    self._kill_thread = True
    if self.is_alive() and threading.current_thread() is not self:
        self.join()
    return True


# -- association reactor -----------------------------------------------------------------------------


def _wake_assoc(assoc: Any) -> None:
    wake: threading.Event | None = assoc.__dict__.get("_simral_wake")
    if wake is not None:
        wake.set()


def _run_reactor(self: Any) -> None:
    """pynetdicom's association reactor, waiting on its wake-up event instead of sleeping 1 ms.

    ``_is_paused`` is True while it waits: a thread sending a request on this association (which
    pauses the reactor, ``_reactor_checkpoint``) need not wait for a poll; after a wait the
    reactor passes the checkpoint before it takes a message.

    A sender (a C-STORE sub-operation of C-GET / C-MOVE) clears the checkpoint, then waits for
    ``_is_paused``. The reactor marks itself not paused *before* it looks at the checkpoint again
    and takes a message only if the checkpoint is still open: either the sender sees it running and
    waits, or the reactor sees the pause and leaves the sender's response to the sender (which
    pynetdicom's own reactor could take, answered "Received unexpected C-STORE service message").
    """
    wake: threading.Event = self._simral_wake
    self._is_paused = False
    while not self._kill:
        wake.clear()
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        if not self._reactor_checkpoint.is_set():
            continue  # paused meanwhile by a sender: the message waiting is its response
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)
            continue

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            _trigger(self, "EVT_RELEASED")
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            log.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            _trigger(self, "EVT_ABORTED")
            self.kill()
            return

        if _stopped(self.dul) or not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return

        if self._kill or self.dimse.msg_queue.qsize():
            continue
        idle = self.dul._idle_timer
        timeout = MAX_WAIT if idle.timeout is None else min(MAX_WAIT, max(0.0, float(idle.remaining)))
        self._is_paused = True
        wake.wait(timeout)


def _trigger(assoc: Any, name: str) -> None:
    from pynetdicom import evt

    evt.trigger(assoc, getattr(evt, name), {})


def kill(self: Any) -> None:
    """pynetdicom's ``Association.kill``: wait for the DUL thread to reach Sta1 (then stop it) or
    to end, woken by its state changes instead of polling every 10 ms."""
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    _wake_assoc(self)
    dul = self.dul
    condition: threading.Condition = dul._simral_state
    while dul.is_alive() and not dul.stop_dul():
        if threading.current_thread() is dul:
            _set_kill(dul, True)
            return
        with condition:
            condition.wait_for(
                lambda: (
                    dul.__dict__.get("_simral_exited", False) or dul.state_machine.current_state == "Sta1"
                ),
                timeout=MAX_WAIT,
            )
        if _stopped(dul):
            dul.join()


def _stopped(dul: Any) -> bool:
    return bool(dul.__dict__.get("_simral_exited", False))


def _abort_blocking(self: Any, block: bool = True) -> None:
    """pynetdicom's ``_abort_blocking`` without its fixed 100 ms sleep at the end: once the
    reactors are stopped and the socket shut, the association's slot is free at once."""
    if self._sent_abort or self.is_released:
        return
    self._sent_abort = True
    self._reactor_checkpoint.set()
    logging.getLogger("pynetdicom.association").info("Aborting Association")
    self.acse.send_abort(0x00)
    _trigger(self, "EVT_ABORTED")
    if block is False:
        return
    self.kill()
    with contextlib.suppress(Exception):
        self.dul.socket._shutdown_socket()


# -- installation ------------------------------------------------------------------------------------


_original_init = Association.__init__


def _association_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    dul = self.dul
    self._simral_wake = threading.Event()
    dul._simral_state = threading.Condition()
    dul.to_provider_queue = _WakingQueue(lambda: _wake_dul(dul))
    dul.to_user_queue = _WakingQueue(lambda: _wake_assoc(self))
    self.dimse.msg_queue = _WakingQueue(lambda: _wake_assoc(self))


def install() -> None:
    """Make pynetdicom's association reactors event-driven (idempotent; every association created
    afterwards, accepted or requested)."""
    if getattr(Association, "_simral_eventloop", False):
        return
    Association.__init__ = _association_init  # type: ignore[method-assign]
    Association._run_reactor = _run_reactor  # type: ignore[method-assign]
    Association.kill = kill  # type: ignore[method-assign]
    Association._abort_blocking = _abort_blocking  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = stop_dul  # type: ignore[method-assign]
    DULServiceProvider._is_transport_event = _is_transport_event  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    DULServiceProvider._kill_thread = property(_get_kill, _set_kill)  # type: ignore[assignment]
    Association._simral_eventloop = True  # type: ignore[attr-defined]
