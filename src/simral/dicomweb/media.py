"""Accept-header negotiation for DICOMweb (PS3.18 §8.7: media types, transfer syntaxes, q-values)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian

from simral.dicom.transcode import can_transcode

#: Default transfer syntax of ``application/dicom`` and ``application/octet-stream`` (PS3.18 8.7.3.5.2).
DEFAULT_SYNTAX = str(ExplicitVRLittleEndian)
ANY_SYNTAX = "*"
#: Older names some clients still send (PS3.18 Table 8.7.3-2 notes).
MEDIA_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

_TOKEN = re.compile(r'\s*([^=;,\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')


class NotAcceptable(Exception):
    """No representation the client accepts can be produced (HTTP 406)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: ``type/subtype`` with its parameters and quality."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def related_type(self) -> str:
        """For ``multipart/related``, the ``type`` parameter (the parts' media type)."""
        related = self.params.get("type", "").lower()
        return MEDIA_ALIASES.get(related, related)

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split_entries(header: str) -> list[str]:
    entries: list[str] = []
    current: list[str] = []
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """Parse an Accept header (RFC 9110 §12.5.1), best quality first, header order kept on ties."""
    if not header:
        return [MediaRange("*/*")]
    ranges: list[tuple[float, int, MediaRange]] = []
    for index, entry in enumerate(_split_entries(header)):
        media_type, _, rest = entry.partition(";")
        params: dict[str, str] = {}
        q = 1.0
        for match in _TOKEN.finditer(rest):
            name, value = match.group(1).lower(), match.group(2).strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            else:
                params[name] = value
        if q > 0:
            ranges.append((-q, index, MediaRange(media_type.strip().lower(), params, q)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1]))]


def _part_ranges(ranges: Sequence[MediaRange], part_types: set[str]) -> list[MediaRange]:
    """The entries that accept multipart/related parts of one of ``part_types``."""
    out = []
    for r in ranges:
        if r.media_type in {"*/*", "multipart/*"} or (
            r.media_type == "multipart/related" and r.related_type in {"", "*", "*/*"}
        ):
            out.append(MediaRange("multipart/related", {**r.params, "type": "*"}, r.q))
        elif r.media_type == "multipart/related" and (r.related_type in part_types or "*" in part_types):
            out.append(r)
        elif r.media_type in part_types:
            # A bare part type (e.g. application/dicom) is taken to mean multipart of it.
            out.append(MediaRange("multipart/related", {**r.params, "type": r.media_type}, r.q))
    return out


def instance_syntaxes(accept: str | None) -> list[str]:
    """Transfer syntaxes acceptable for ``application/dicom`` parts, in preference order."""
    ranges = _part_ranges(parse_accept(accept), {"application/dicom"})
    if not ranges:
        raise NotAcceptable('retrieve answers multipart/related; type="application/dicom"')
    return list(dict.fromkeys(r.transfer_syntax or DEFAULT_SYNTAX for r in ranges))


def choose_syntax(stored: str, acceptable: Sequence[str]) -> str | None:
    """The syntax to send an instance stored in ``stored`` in, given the client's preferences."""
    for wanted in acceptable:
        if wanted in (ANY_SYNTAX, stored):
            return stored
        if can_transcode(stored, wanted):
            return wanted
    return None


@dataclass(frozen=True)
class FrameChoice:
    """How to answer a frames / bulk-data request for one stored transfer syntax."""

    as_stored: bool
    content_type: str
    transfer_syntax: str


def choose_frames(accept: str | None, stored: str, stored_media_type: str | None) -> FrameChoice:
    """Negotiate the frames' representation (PS3.18 8.7.3.3, Table 8.7.3-2).

    ``application/octet-stream`` means uncompressed frames unless ``transfer-syntax=*`` (then the
    stored bytes, labelled with their syntax); a compressed media type equal to the stored one
    (e.g. ``image/jpeg``) gets the stored bitstream.
    """
    compressed = stored_media_type is not None
    part_types = {"application/octet-stream"} | ({stored_media_type} if stored_media_type else set())
    ranges = _part_ranges(parse_accept(accept), part_types)
    for r in ranges:
        wanted = r.transfer_syntax
        part = r.related_type
        if part == "*":
            part = (
                stored_media_type
                if stored_media_type and wanted in (ANY_SYNTAX, stored)
                else "application/octet-stream"
            )
        if part == "application/octet-stream":
            if wanted in (ANY_SYNTAX, stored) or (wanted is None and not compressed):
                return FrameChoice(True, stored_media_type or "application/octet-stream", stored)
            if wanted in (None, DEFAULT_SYNTAX):
                return FrameChoice(not compressed, "application/octet-stream", DEFAULT_SYNTAX)
            continue
        if part == stored_media_type and (wanted in (None, ANY_SYNTAX, stored)):
            return FrameChoice(True, stored_media_type, stored)
    raise NotAcceptable(
        "frames are available as application/octet-stream"
        + (f" and {stored_media_type}" if stored_media_type else "")
    )
