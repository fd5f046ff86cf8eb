"""Outbound HL7 v2 over MLLP (HL7 v2 Transport Specification, MLLP release 2; optionally over TLS),
and the ``hl7.send`` job kind that delivers messages to a site's RIS (ANS Téléradiologie flux 3).

A message is built and enqueued in the transaction of the change it reports (the outbox, DESIGN.md
§5), with its MSH-10 fixed, so a retry sends the very same message and the receiver's MSH-10
de-duplication makes the retry harmless. The job is done when the RIS answers AA (or CA, the
enhanced-mode commit accept); AE and AR (HL7 v2.5.1 §2.9.2, ANS guide "acquittement") are
permanent failures, kept on /admin/jobs with the receiver's ERR text; a refused connection, a
timeout or a garbled answer is retried with the queue's backoff.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from simral import tls
from simral.context import AppContext
from simral.hl7 import mllp
from simral.hl7.adt import decode, read_header
from simral.jobs import service as jobs
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.reading.models import RisEndpoint

log = logging.getLogger(__name__)

#: Job kind: send ``payload["message"]`` to the RIS endpoint named ``payload["destination"]``.
HL7_SEND = "hl7.send"
#: Answers to a RIS (the protocol, the report) are retried until acknowledged: with the queue's
#: backoff capped at 30 minutes, 350 tries span about a week, longer than any RIS maintenance
#: window; after that the job waits, dead-lettered, on ``/admin/jobs`` for an operator.
MAX_ATTEMPTS = 350


class AckError(ValueError):
    """The peer's answer is not a usable acknowledgement."""


@dataclass(frozen=True)
class Acknowledgement:
    """What the receiver answered: MSA-1, MSA-2 and, when it refused, ERR-3 (HL7 table 0357 code and
    text) and ERR-2 (where). ERR-8, the receiver's free text, is not kept: it may quote patient data
    and the job's error is logged."""

    code: str
    control_id: str
    error: str


def read_ack(raw: bytes) -> Acknowledgement:
    """MSA and ERR of an acknowledgement, read by plain splitting (HL7 v2.5.1 §2.14.8, §2.14.5)."""
    text = decode(raw)
    header = read_header(text)
    code = control_id = error = ""
    for segment in text.split("\r"):
        fields = segment.split(header.encoding.field)
        if fields[0] == "MSA":
            code = fields[1].strip() if len(fields) > 1 else ""
            control_id = fields[2].strip() if len(fields) > 2 else ""
        elif fields[0] == "ERR" and not error:
            condition = header.encoding.components(fields[3])[:2] if len(fields) > 3 else []
            location = fields[2] if len(fields) > 2 else ""
            error = header.encoding.unescape(" ".join(condition)).strip()
            if location:
                error += f" at {header.encoding.unescape(location)}"
    if not code:
        raise AckError("the answer has no MSA segment")
    return Acknowledgement(code, control_id, error)


def exchange(
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Send one framed message and return the framed answer's content (MLLP release 2)."""
    with socket.create_connection((host, port), timeout=timeout) as plain:
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = (
            ssl_context.wrap_socket(plain, server_hostname=host) if ssl_context is not None else plain
        )
        try:
            mllp.send(sock, message)
            answer = mllp.FrameReader(sock).next_frame()
        finally:
            if sock is not plain:
                sock.close()
    if answer is None:
        raise ConnectionError("the receiver closed the connection without acknowledging")
    return answer


def enqueue_message(
    session: Session, *, endpoint: RisEndpoint, message: str, control_id: str, subject: str
) -> int | None:
    """Queue ``message`` for ``endpoint`` in the caller's transaction (``subject`` names what it is
    about, e.g. ``imaging-request:12``; /admin/jobs shows the destination)."""
    return jobs.enqueue(
        session,
        kind=HL7_SEND,
        payload={
            "destination": endpoint.name,
            "message": message,
            "control_id": control_id,
            "subject": subject,
        },
        group_key=f"ris:{endpoint.name}",
        dedupe_key=f"hl7:{endpoint.name}:{control_id}",
        max_attempts=MAX_ATTEMPTS,
    )


def _endpoint(ctx: AppContext, name: str) -> dict[str, Any]:
    with ctx.db.reading() as session:
        endpoint = session.scalar(select(RisEndpoint).where(RisEndpoint.name == name))
        if endpoint is None:
            raise PermanentFailure(f"no RIS endpoint named {name!r} any more")
        return {"host": endpoint.host, "port": endpoint.port, "tls": endpoint.tls}


def send_hl7(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`HL7_SEND`: one connection per message, in the batch's order."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    endpoint = _endpoint(ctx, batch[0].payload["destination"])
    context = tls.client_context(ctx.settings) if endpoint["tls"] else None
    for job in batch:
        message = str(job.payload["message"]).encode("utf-8")
        try:
            answer = read_ack(
                exchange(
                    endpoint["host"],
                    endpoint["port"],
                    message,
                    timeout=ctx.settings.network_timeout,
                    ssl_context=context,
                )
            )
        except (OSError, mllp.FramingError, AckError, ValueError) as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
            # The receiver is unreachable: the rest of the batch would fail the same way.
            for rest in batch:
                outcomes.setdefault(rest.id, outcomes[job.id])
            break
        expected = str(job.payload.get("control_id", ""))
        if answer.control_id and expected and answer.control_id != expected:
            outcomes[job.id] = f"acknowledgement of {answer.control_id!r}, not of {expected!r}"
        elif answer.code in ("AA", "CA"):
            outcomes[job.id] = None
        elif answer.code in ("AE", "AR", "CE", "CR"):
            outcomes[job.id] = PermanentFailure(
                f"the RIS answered {answer.code}: {answer.error or 'no ERR text'}"
            )
        else:
            outcomes[job.id] = f"unknown acknowledgement code {answer.code!r}"
    return outcomes
