"""The MLLP listener of ``simral serve`` (HL7 v2 Transport Specification, MLLP release 2; optionally
over TLS as IHE ATNA secure nodes do).

One thread per connection; each message is handled to completion (kept, applied, committed)
before its acknowledgement is written, and messages of one connection are handled in order.

Only one process owns the HL7 port. DICOM and HTTP listeners are bound by every worker with
SO_REUSEPORT, which spreads connections over processes; the ADT feed is ordered (A28 before A31
before A40 for one patient), and a sender that times out and reconnects to resend would have its
second copy handled by another process while the first is still being applied. With one owner,
the node handles its feed in arrival order; the feed is a few messages per second at most, which
needs no second CPU. Duplicates across nodes of a cluster are still caught by the message log's
unique key (sending application, facility, MSH-10).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from simral import tls
from simral.context import AppContext
from simral.hl7 import adt, mllp, pdq
from simral.observability import metrics

log = logging.getLogger(__name__)


#: How many documents of the largest accepted size one imaging order may carry (base64 in OBX-5).
DOCUMENTS_PER_MESSAGE = 4


def max_message_size(ctx: AppContext) -> int:
    """The largest MLLP frame read: an ADT message's allowance plus room for an order carrying
    :data:`DOCUMENTS_PER_MESSAGE` documents of ``request_document_max_bytes`` in base64."""
    documents = DOCUMENTS_PER_MESSAGE * (ctx.settings.request_document_max_bytes * 4 // 3 + 4)
    return mllp.MAX_MESSAGE + max(0, documents)


class _Handler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = f"{self.client_address[0]}" if self.client_address else ""
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.warning("MLLP TLS handshake with %s failed: %s", peer, exc)
                return
        tls_subject = tls.peer_common_name(sock)
        reader = mllp.FrameReader(sock, max_size=max_message_size(self.server.ctx))
        while True:
            try:
                message = reader.next_frame()
            except (TimeoutError, OSError, mllp.FramingError) as exc:
                log.info("MLLP connection from %s closed: %s", peer, exc)
                return
            if message is None:
                return
            started = time.perf_counter()
            if pdq.is_query(message):  # QBP^Q22 (IHE PDQ ITI-21); everything else is the ADT feed
                handled = pdq.handle(self.server.ctx, message, peer=peer, tls_subject=tls_subject)
            else:
                handled = adt.handle(self.server.ctx, message, peer=peer, tls_subject=tls_subject)
            metrics.record_hl7(_message_type(message), handled.code, time.perf_counter() - started)
            try:
                mllp.send(sock, handled.ack)
            except OSError as exc:
                log.info("MLLP acknowledgement to %s not delivered: %s", peer, exc)
                return


def _message_type(message: bytes) -> str:
    """MSH-9 as a metrics label (``ADT^A28``, ``other`` for anything unreadable)."""
    try:
        header = adt.read_header(adt.decode(message))
    except adt.Rejected:
        return "other"
    return metrics.hl7_message_type(header.message_type, header.event)


class MllpServer(socketserver.ThreadingTCPServer):
    """A threaded MLLP acceptor bound without SO_REUSEPORT (one owner, see the module docstring)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, ctx: AppContext, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.ctx = ctx
        self.ssl_context = ssl_context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        request, address = self.socket.accept()
        request.settimeout(self.ctx.settings.network_timeout)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # The handshake runs in the connection's thread, not in the acceptor.
            request = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, address


def start(ctx: AppContext, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> MllpServer:
    """Start accepting MLLP connections in a background thread; ``stop`` with ``shutdown()``."""
    server = MllpServer(ctx, (host, port), ssl_context=ssl_context)
    threading.Thread(target=server.serve_forever, name="hl7-acceptor", daemon=True).start()
    log.info("HL7 MLLP listener on %s:%d%s", host, server.server_address[1], " (TLS)" if ssl_context else "")
    return server


def stop(server: MllpServer) -> None:
    """Stop accepting and close the listening socket."""
    server.shutdown()
    server.server_close()
