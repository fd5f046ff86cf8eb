"""Sending the audit trail to the syslog collector (IHE ITI TF-2 3.20 Record Audit Event; RFC 5425).

The trail itself is the durable buffer: the ``audit_export_cursor`` row of the ``syslog`` sink
holds the id of the last record the collector's TLS stream accepted, and the exporter sends the
records after it, in id order, as RFC 5424 messages framed by octet counting (RFC 5425 §4.3) over
TLS 1.2+ (the collector's certificate and name verified, our client certificate presented when
configured). The cursor moves only after a batch was written; a collector that is down, refuses
TLS or drops the connection leaves it where it was, and the backlog goes out, in order, once the
collector is back. Before each batch the connection is checked for a close from the collector, so a
restarted collector never silently swallows a batch written to the dead connection. ``simral audit
verify`` uses the cursor to detect a truncated tail.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from dataclasses import dataclass

from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from simral import tls
from simral.audit import atna
from simral.audit.models import AuditEvent, AuditExportCursor
from simral.config import Settings
from simral.context import AppContext
from simral.db.base import utcnow

log = logging.getLogger(__name__)

SINK = "syslog"
BATCH = 500


def cursor(session: Session) -> int:
    """Id of the last record the collector accepted (0: none yet)."""
    value = session.scalar(sql_select(AuditExportCursor.last_id).where(AuditExportCursor.sink == SINK))
    return int(value or 0)


def _advance(session: Session, last_id: int) -> None:
    row = session.get(AuditExportCursor, SINK)
    if row is None:
        session.add(AuditExportCursor(sink=SINK, last_id=last_id, updated_at=utcnow()))
    elif last_id > row.last_id:
        row.last_id, row.updated_at = last_id, utcnow()


@dataclass
class SyslogExporter:
    """Pushes the trail's new records to the collector; one per platform (see ``server.py``)."""

    ctx: AppContext
    _sock: ssl.SSLSocket | None = None

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and self._closed_by_peer(self._sock):
            self.close()
        if self._sock is None:
            host, port = self.settings.audit_syslog_host, self.settings.audit_syslog_port
            raw = socket.create_connection((host, port), timeout=10)
            try:
                context = tls.client_context_from(
                    self.settings.audit_syslog_cert_file,
                    self.settings.audit_syslog_key_file,
                    self.settings.audit_syslog_ca_file,
                )
                self._sock = context.wrap_socket(raw, server_hostname=host)
            except BaseException:
                raw.close()
                raise
        return self._sock

    @staticmethod
    def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
        """Whether the collector closed the connection (it never sends us data otherwise)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1) == b""
        except (ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def push(self) -> int:
        """Send every record after the cursor; how many were sent. Raises on a transport error
        (the cursor then stays at the last batch that went out whole)."""
        sent = 0
        source = self.settings.ae_title
        while True:
            with self.ctx.db.reading() as session:
                after = cursor(session)
                records = list(
                    session.scalars(
                        sql_select(AuditEvent)
                        .where(AuditEvent.id > after)
                        .order_by(AuditEvent.id)
                        .limit(BATCH)
                    )
                )
                frames = b"".join(
                    atna.octet_counted(atna.syslog_message(r, atna.audit_message(r, source_id=source)))
                    for r in records
                )
            if not records:
                return sent
            try:
                self._connection().sendall(frames)
            except (OSError, ssl.SSLError):
                self.close()
                raise
            with self.ctx.db.unit_of_work() as session:
                _advance(session, records[-1].id)
            sent += len(records)


def run_exporter(ctx: AppContext, stop: threading.Event) -> None:
    """The exporter loop: push, wait ``audit_syslog_interval`` (doubling up to a minute while the
    collector is unreachable), until ``stop``."""
    exporter = SyslogExporter(ctx)
    delay = ctx.settings.audit_syslog_interval
    try:
        while not stop.is_set():
            try:
                exporter.push()
                delay = ctx.settings.audit_syslog_interval
            except (OSError, ssl.SSLError, tls.TlsConfigError) as exc:
                log.warning(
                    "audit collector %s:%d unreachable: %s",
                    ctx.settings.audit_syslog_host,
                    ctx.settings.audit_syslog_port,
                    exc,
                )
                delay = min(max(delay * 2, ctx.settings.audit_syslog_interval), 60.0)
            stop.wait(delay)
    finally:
        exporter.close()


def start_exporter(ctx: AppContext, stop: threading.Event) -> threading.Thread | None:
    """Start the exporter thread when a collector is configured."""
    if not ctx.settings.audit_syslog_host:
        return None
    thread = threading.Thread(target=run_exporter, args=(ctx, stop), name="audit-export", daemon=True)
    thread.start()
    return thread
