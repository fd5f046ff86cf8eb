"""Fuzz the HL7 v2 listener's message handling: MLLP framing (``hl7.mllp.FrameReader`` over a
socket pair), then each frame as ``hl7.server`` handles it (``pdq.handle`` for QBP^Q22,
``adt.handle`` for the ADT feed and the Téléradiologie orders), against a site with a registered
RIS and reading contract, and the seeds' ADT and PDQ senders registered as HL7 sources.

Expected: every frame gets an acknowledgement (HL7 v2.5 §2.9.2: MSH, MSA with AA, AE or AR; or the
PDQ response), a framing error ends the connection (:class:`~simral.hl7.mllp.FramingError`);
nothing else: an "application internal error" (ERR 207 logged with its traceback) is a bug.
Input: an MLLP byte stream, or one bare message (framed by the harness).
"""

from __future__ import annotations

import socket

from fuzz import harness

with harness.instrumented(__name__):
    from sqlalchemy import delete

    from simral.hl7 import adt, mllp, pdq
    from simral.patients.models import Hl7Message

NAME = "hl7"
MAX_LEN = 16 * 1024
ACK_CODES = {"AA", "AE", "AR", "CA", "CE", "CR"}

_site = harness.SiteHolder()
_oracle = harness.Oracle()


def setup() -> None:
    _oracle.install()


def teardown() -> None:
    _oracle.uninstall()
    _site.close()


def _frames(data: bytes) -> list[bytes]:
    """The frames a connection carrying ``data`` delivers (the listener's read loop)."""
    stream = data if mllp.START_BLOCK in data else mllp.frame(data)
    frames: list[bytes] = []
    left, right = socket.socketpair()
    with left, right:
        right.sendall(stream)
        right.shutdown(socket.SHUT_WR)
        reader = mllp.FrameReader(left, max_size=MAX_LEN)
        while True:
            try:
                frame = reader.next_frame()
            except mllp.FramingError:
                break
            if frame is None:
                break
            frames.append(frame)
    return frames


def test_one_input(data: bytes) -> None:
    site = _site.get()
    # Forget the messages seen: a mutated message keeping its MSH-10 is parsed, not answered as
    # a duplicate (that path runs within one input, for streams carrying a message twice).
    with site.ctx.db.unit_of_work() as session:
        session.execute(delete(Hl7Message))
    with _oracle.watching():
        for frame in _frames(data):
            if pdq.is_query(frame):
                handled = pdq.handle(site.ctx, frame, peer="127.0.0.1")
            else:
                handled = adt.handle(site.ctx, frame, peer="127.0.0.1")
            segments = handled.ack.replace(b"\n", b"\r").split(b"\r")
            if not segments[0].startswith(b"MSH") or not any(s.startswith(b"MSA") for s in segments):
                raise harness.Bug(f"acknowledgement without MSH and MSA: {handled.ack[:200]!r}")
            if handled.code not in ACK_CODES:
                raise harness.Bug(f"acknowledgement code {handled.code!r}")


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
