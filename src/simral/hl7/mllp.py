"""MLLP framing (HL7 v2 Transport Specification: Minimal Lower Layer Protocol, release 2).

A message travels as ``<VT> message <FS><CR>`` (0x0B … 0x1C 0x0D); bytes outside a frame are
discarded. The acknowledgement is framed the same way.
"""

from __future__ import annotations

import socket

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
#: Largest message accepted (ADT messages are a few kilobytes).
MAX_MESSAGE = 1024 * 1024


class FramingError(ValueError):
    """The peer broke MLLP framing (a frame too large, or the connection closed mid-frame)."""


def frame(message: bytes) -> bytes:
    """``message`` wrapped in an MLLP block."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class FrameReader:
    """Reads MLLP frames from a connected socket, one message at a time."""

    def __init__(self, sock: socket.socket, *, max_size: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.max_size = max_size
        self._buffer = bytearray()

    def next_frame(self) -> bytes | None:
        """The next message (without its framing); None when the peer closed between messages.

        Raises :class:`FramingError` for a frame over ``max_size`` or cut by the end of the
        connection, and ``TimeoutError``/``OSError`` as the socket does.
        """
        while True:
            start = self._buffer.find(START_BLOCK)
            if start < 0:
                self._buffer.clear()  # bytes outside a block are discarded
            else:
                if start:
                    del self._buffer[:start]
                end = self._buffer.find(END_BLOCK + CARRIAGE_RETURN)
                if end >= 0:
                    message = bytes(self._buffer[1:end])
                    del self._buffer[: end + 2]
                    return message
                if len(self._buffer) > self.max_size + 2:
                    raise FramingError(f"MLLP frame larger than {self.max_size} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                if self._buffer.startswith(START_BLOCK):
                    raise FramingError("connection closed inside an MLLP frame")
                return None
            self._buffer += chunk


def send(sock: socket.socket, message: bytes) -> None:
    """Send one framed message."""
    sock.sendall(frame(message))
