"""Races of the event-driven association reactors, run in a process of their own
(``python -m tests.eventloop_races NAME``) because installing :mod:`simral.dimse.eventloop`
changes pynetdicom for the whole process. Prints ``ok`` or exits non-zero with the reason.

- ``double-close``: a failed send and the read of the closed socket both report "connection
  closed" (Evt17); the second reaches a DUL already back in Sta1 (Idle), where PS3.8 Table 9-10
  defines no such event. It must not raise in the DUL thread.
- ``primitive-after-abort``: the association hands the DUL a primitive (here an A-ABORT; a
  response to a request, found by the DIMSE fuzzer) while it awaits the transport close (Sta13).
  The event is dropped and its primitive taken from the queue; left there, the reactor saw it at
  every turn, spun a core and never read the close, until the ARTIM timer ended it.
- (all) ``simral.dimse.sending.install`` alone makes the reactors event-driven.
- ``paused-reactor``: a sender pauses the reactor (clears ``_reactor_checkpoint``) just after the
  reactor passed the checkpoint; the message then waiting is the sender's response, and the
  reactor must leave it in the queue.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from simral.dimse import sending

sending.install()  # the product's installation: pass-through sends on event-driven reactors

from simral.dimse import eventloop  # noqa: E402


def _fail(reason: str) -> None:
    """Exit at once, whatever threads a broken reactor left running."""
    print(reason, file=sys.stderr, flush=True)
    os._exit(1)


def _pair() -> tuple[object, object]:
    scp = AE(ae_title="RACESCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    port = server.server_address[1]
    scu = AE(ae_title="RACESCU")
    scu.add_requested_context(Verification)
    scu.network_timeout = scu.acse_timeout = scu.dimse_timeout = 10
    assoc = scu.associate("127.0.0.1", port, ae_title="RACESCP")
    if not assoc.is_established:
        _fail("no association")
    return server, assoc


def double_close() -> None:
    failures: list[BaseException] = []
    threading.excepthook = lambda args: failures.append(args.exc_value)  # type: ignore[assignment,return-value]
    server, assoc = _pair()
    try:
        dul = assoc.dul  # type: ignore[attr-defined]
        dul.event_queue.put("Evt17")
        dul.event_queue.put("Evt17")
        eventloop._wake_dul(dul)
        dul.join(10)
        assoc.join(10)  # type: ignore[attr-defined]
        if dul.is_alive() or assoc.is_alive():  # type: ignore[attr-defined]
            _fail("the association's threads did not end")
        if failures:
            _fail(f"the DUL thread raised {failures[0]!r}")
        if dul.state_machine.current_state != "Sta1":
            _fail(f"ended in {dul.state_machine.current_state}")
        if not assoc.is_aborted:  # type: ignore[attr-defined]
            _fail("the association was not reported aborted (A-P-ABORT)")
    finally:
        server.shutdown()  # type: ignore[attr-defined]


class _ClearedOnceAfterWait(threading.Event):
    """The checkpoint as a sender leaves it: cleared just after the reactor's wait returned."""

    def __init__(self) -> None:
        super().__init__()
        self.set()
        self.raced = False

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        if not self.raced and self.message_waiting():
            self.raced = True
            self.clear()
        return result

    def message_waiting(self) -> bool:
        return False


def paused_reactor() -> None:
    server, assoc = _pair()
    try:
        checkpoint = _ClearedOnceAfterWait()
        queue = assoc.dimse.msg_queue  # type: ignore[attr-defined]
        checkpoint.message_waiting = lambda: queue.qsize() > 0  # type: ignore[method-assign]
        assoc._reactor_checkpoint = checkpoint  # type: ignore[attr-defined]
        response = C_ECHO()  # the response a sender waits for
        response.MessageIDBeingRespondedTo = 1
        response.Status = 0x0000
        queue.put((1, response))  # wakes the reactor
        time.sleep(0.5)
        if not checkpoint.raced:
            _fail("the reactor did not reach the checkpoint")
        if queue.qsize() != 1:
            _fail("the paused reactor took the sender's response")
        if queue.get(block=False) != (1, response):
            _fail("another message was left")
        checkpoint.set()
        assoc.release()  # type: ignore[attr-defined]
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def primitive_after_abort() -> None:
    server, assoc = _pair()
    try:
        dul = assoc.dul  # type: ignore[attr-defined]
        # As after the DUL answered a peer's bad PDU with an A-ABORT (AA-8), minus the ARTIM timer,
        # so that only the close can end the wait; the peer has closed its side.
        dul.state_machine.current_state = "Sta13"
        ended = threading.Event()

        def abort() -> None:
            assoc.abort()  # type: ignore[attr-defined]
            ended.set()

        threading.Thread(target=abort, daemon=True).start()
        if not ended.wait(5):
            _fail("the DUL did not reach Sta1: its reactor kept seeing the dropped primitive")
        if dul.to_provider_queue.qsize():
            _fail("the dropped primitive is still queued")
        dul.join(5)
        if dul.is_alive():
            _fail("the DUL thread did not end")
    finally:
        server.shutdown()  # type: ignore[attr-defined]


if __name__ == "__main__":
    # Also what processes that only send (forwarding workers, benchmarks) rely on.
    if getattr(Association, "_run_reactor", None) is not eventloop._run_reactor:
        _fail("sending.install() left pynetdicom's polling reactors in place")
    cases = {
        "double-close": double_close,
        "paused-reactor": paused_reactor,
        "primitive-after-abort": primitive_after_abort,
    }
    cases[sys.argv[1]]()
    print("ok")
