"""multipart/related bodies (RFC 2387) as DICOMweb uses them (PS3.18 §8.6.1.2).

Writing streams each part from its source; reading feeds a streaming parser (python-multipart)
that writes every part straight to a file, so neither direction holds a study in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser


def new_boundary() -> str:
    return secrets.token_hex(16)


def content_type_header(part_type: str, boundary: str, *, transfer_syntax: str | None = None) -> str:
    """The response Content-Type of a multipart/related body (``type`` parameter quoted)."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def part_head(boundary: str, content_type: str, *, length: int | None = None, location: str = "") -> bytes:
    """The delimiter and headers that open one part."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def iter_parts(boundary: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """Yield a whole multipart body from ``(content type, chunks)`` parts."""
    first = True
    for content_type, chunks in parts:
        yield (b"" if first else b"\r\n") + part_head(boundary, content_type)
        first = False
        yield from chunks
    yield closing(boundary) if not first else f"--{boundary}--\r\n".encode()


#: A boundary the body parser can take: printable ASCII, at most 256 characters (python-multipart's
#: limit), not ending with a space. RFC 2046 §5.1.1 asks senders for 70 characters of a smaller set,
#: but peers exceed it (Orthanc's DICOMweb plugin sends longer boundaries): be liberal in what we accept.
_BOUNDARY = re.compile(r"[\x21-\x7e ]{0,255}[\x21-\x7e]")


class MultipartError(ValueError):
    """The request body is not a well-formed multipart/related body."""


def _param(message: Message, name: str) -> object:
    """A Content-Type parameter. The standard library raises on some malformed RFC 2231 forms
    (``type*5=...; type*=...``: continuations mixed with an unnumbered part): refused as such."""
    try:
        value = message.get_param(name)
        # An RFC 2231 encoded value (``name*=charset'lang'value``) comes as a triple.
        return collapse_rfc2231_value(value) if isinstance(value, tuple) else value
    except Exception as exc:  # TypeError, ValueError, IndexError from email.utils.decode_params
        raise MultipartError(f"malformed Content-Type parameters: {type(exc).__name__}") from None


def request_boundary(content_type: str) -> tuple[str, str]:
    """``(part type, boundary)`` of a multipart/related request Content-Type (RFC 2387)."""
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise MultipartError("expected multipart/related")
    boundary = _param(message, "boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MultipartError("multipart/related without a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the boundary is not 1 to 256 printable characters")
    part_type = _param(message, "type")
    return (part_type.lower() if isinstance(part_type, str) else ""), boundary


@dataclass
class ReceivedPart:
    """One part of a request body, spooled to ``path``."""

    path: Path
    content_type: str
    size: int = 0
    #: SHA-256 of the bytes, computed while they arrived (spares ingest a second read).
    digest: Any = field(default_factory=hashlib.sha256)


@dataclass
class PartSpooler:
    """Feed request chunks; each part lands in its own file under ``folder``.

    Parts are handed out through :meth:`completed` as soon as they are whole, so the caller can
    ingest them while the rest of the body is still arriving.
    """

    boundary: str
    folder: Path
    max_part_headers: int = 16 * 1024
    _done: list[ReceivedPart] = field(default_factory=list)
    _current: ReceivedPart | None = None
    _file: object | None = None
    _header_name: bytearray = field(default_factory=bytearray)
    _header_value: bytearray = field(default_factory=bytearray)
    _headers: dict[str, str] = field(default_factory=dict)
    _finished: bool = False

    def __post_init__(self) -> None:
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_end": self._end,
        }
        self._parser = MultipartParser(self.boundary.encode("latin-1"), callbacks)  # type: ignore[arg-type]
        self._fd: int | None = None

    # parser callbacks -------------------------------------------------------------------------
    def _part_begin(self) -> None:
        # What tempfile.mkstemp does (O_EXCL, 0600), without its per-call path checks.
        while True:
            path = self.folder / f".tmp-stow-{secrets.token_hex(8)}.dcm"
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        self._headers = {}
        self._current = ReceivedPart(path, "")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > self.max_part_headers:
            raise MultipartError("part header too long")

    def _header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = self._header_value.decode(
            "latin-1"
        ).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._fd is not None and self._current is not None
        view = memoryview(data)[start:end]
        self._current.digest.update(view)  # no copy of the chunk
        self._current.size += end - start
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _part_end(self) -> None:
        assert self._fd is not None and self._current is not None
        os.close(self._fd)
        self._fd = None
        self._current.content_type = self._headers.get("content-type", "")
        self._done.append(self._current)
        self._current = None

    def _end(self) -> None:
        self._finished = True

    # API ----------------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except (MultipartError, OSError):
            raise  # OSError: a part could not be written (disk full), not a malformed body
        except Exception as exc:
            raise MultipartError(f"malformed multipart body: {exc}") from exc

    def completed(self) -> list[ReceivedPart]:
        """Parts finished since the last call."""
        done, self._done = self._done, []
        return done

    def finish(self) -> None:
        """Check the body ended with the closing delimiter."""
        with contextlib.suppress(Exception):
            self._parser.finalize()
        if not self._finished:
            raise MultipartError("multipart body is truncated (no closing boundary)")

    def discard(self) -> None:
        """Remove any part file still owned by the spooler (aborted body)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        leftovers = [p.path for p in self._done] + ([self._current.path] if self._current else [])
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._done = []
        self._current = None
