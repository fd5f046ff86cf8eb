"""Frame-level access to Pixel Data without loading it whole (PS3.18 §9.5.1.2, §8.7.3; PS3.5 §8, A.4).

The header is parsed with pydicom up to (7FE0,0010); the Pixel Data value is then located in the
file and only the bytes of the requested frames are read (seek + read), so multi-gigabyte
instances are served with memory bounded by one frame.

Limitations:

- Deflated transfer syntaxes (PS3.5 §A.5) cannot be seeked into and raise :class:`FrameError`.
- Float / Double Float Pixel Data are not served (no Pixel Data → :class:`FrameError`).
- With Bits Allocated 1 (PS3.5 §8.1.1) frames need not start on a byte boundary: a frame is
  returned repacked so that its first pixel is bit 0 of the first byte, trailing bits zero.
- :func:`decoded_frames` returns native frames unchanged apart from byte order (Planar
  Configuration and YBR_FULL_422 subsampling as stored, Bits Stored not sign-extended), and
  compressed frames as decoded by pydicom: interleaved samples (Planar Configuration 0), JPEG
  YBR_FULL_422 / YBR_FULL as RGB, signed values sign-extended.
- Without an offset table, several fragments per frame are split on the FFD9 end marker
  (JPEG, JPEG-LS, JPEG 2000 EOI/EOC); other syntaxes need one fragment per frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
#: Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 §A.4.11): frames are not compressed.
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

#: PS3.18 Table 8.7.3-5, media types of compressed Bulkdata by Transfer Syntax UID.
_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}


class FrameError(ValueError):
    """The requested frames cannot be served (no pixel data, bad frame number, malformed data)."""


class UndecodableFrame(FrameError):
    """A compressed frame could not be decoded (no decoder plugin for the syntax, or corrupt data)."""


@dataclass(frozen=True)
class PixelLayout:
    """Where and how an instance's Pixel Data is encoded (PS3.3 C.7.6.3, PS3.5 §8 and A.4)."""

    transfer_syntax_uid: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int
    photometric_interpretation: str
    encapsulated: bool
    #: Byte offset in the file of the first byte of the Pixel Data value.
    value_offset: int
    #: Value length, ``0xFFFFFFFF`` when undefined (encapsulated).
    value_length: int
    bits_stored: int = 0
    pixel_representation: int = 0
    planar_configuration: int = 0
    #: Value Representation of the Pixel Data element ("OB" / "OW"; "UN" possible).
    vr: str = "OW"
    little_endian: bool = True
    #: Extended Offset Table (7FE0,0001) and its Lengths (7FE0,0002) when present (PS3.3 C.7.6.3.1.8).
    extended_offsets: tuple[int, ...] | None = None
    extended_lengths: tuple[int, ...] | None = None

    @property
    def frame_size(self) -> int:
        """Bytes of one native frame (PS3.5 §8.1.1; packed bits rounded up; 4:2:2 subsampled)."""
        return (self.frame_bits + 7) // 8

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame; YBR_*_422 stores two samples per pixel (PS3.3 C.7.6.3.1.2)."""
        samples = self.rows * self.columns * self.samples_per_pixel
        if self.photometric_interpretation in ("YBR_FULL_422", "YBR_PARTIAL_422") and not self.encapsulated:
            samples = self.rows * self.columns * 2
        return samples * self.bits_allocated


def media_type_of(transfer_syntax_uid: str) -> str | None:
    """The compressed Bulkdata media type of a syntax (PS3.18 Table 8.7.3-5), None if there is none.

    None is returned for native syntaxes and for encapsulated ones without a bulk media type
    (Encapsulated Uncompressed, Deflated Image Frame Compression); use ``PixelLayout.encapsulated``
    to tell them apart.
    """
    return _MEDIA_TYPES.get(str(transfer_syntax_uid).strip())


def _int(dataset: Dataset, keyword: str, default: int) -> int:
    try:
        value = dataset.get(keyword)
        if value is None or value == "":
            return default
        return int(value[0] if isinstance(value, list | tuple) else value)
    except Exception:  # a malformed value surfaces only when the element is converted
        return default


def _offsets(dataset: Dataset, keyword: str) -> tuple[int, ...] | None:
    value = dataset.get(keyword)
    if not value:
        return None
    raw = bytes(value)
    if len(raw) % 8:
        raise FrameError(f"{keyword} length {len(raw)} is not a multiple of 8 (PS3.3 C.7.6.3.1.8)")
    return struct.unpack(f"<{len(raw) // 8}Q", raw)


def read_header(stream: BinaryIO) -> tuple[Dataset, PixelLayout]:
    """Parse a Part 10 header up to Pixel Data and locate the Pixel Data value (PS3.10 §7, PS3.5 §7.1)."""
    stream.seek(0)
    try:
        dataset = dcmread(stream, stop_before_pixels=True, defer_size=64 * 1024)
    except InvalidDicomError as exc:
        raise FrameError(f"not a DICOM Part 10 file: {exc}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise FrameError(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from None
    element_start = stream.tell()
    tsuid = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or ""))
    if not tsuid:
        raise FrameError("file meta information has no Transfer Syntax UID")
    if tsuid.is_deflated:
        raise FrameError(f"frames of a deflated data set ({tsuid.name}) cannot be accessed in place")
    little = tsuid.is_little_endian
    implicit = tsuid.is_implicit_VR
    header = stream.read(8)
    if len(header) < 8:
        raise FrameError("instance has no Pixel Data (7FE0,0010)")
    group, elem = struct.unpack("<HH" if little else ">HH", header[:4])
    if (group << 16 | elem) != PIXEL_DATA:
        raise FrameError("instance has no Pixel Data (7FE0,0010)")
    if implicit:
        vr = "OW"
        (length,) = struct.unpack("<I", header[4:8])
        value_offset = element_start + 8
    else:
        vr_bytes = header[4:6]
        vr = vr_bytes.decode("ascii", "replace")
        if vr_bytes in _LONG_VRS:
            extra = stream.read(4)
            if len(extra) < 4:
                raise FrameError("truncated Pixel Data element header")
            (length,) = struct.unpack("<I" if little else ">I", extra)
            value_offset = element_start + 12
        else:
            (length,) = struct.unpack("<H" if little else ">H", header[6:8])
            value_offset = element_start + 8
    encapsulated = length == UNDEFINED_LENGTH
    rows, columns = _int(dataset, "Rows", 0), _int(dataset, "Columns", 0)
    bits_allocated = _int(dataset, "BitsAllocated", 0)
    if rows <= 0 or columns <= 0 or bits_allocated <= 0:
        raise FrameError("Rows, Columns or Bits Allocated missing or zero (PS3.3 C.7.6.3)")
    layout = PixelLayout(
        transfer_syntax_uid=str(tsuid),
        rows=rows,
        columns=columns,
        samples_per_pixel=max(1, _int(dataset, "SamplesPerPixel", 1)),
        bits_allocated=bits_allocated,
        number_of_frames=max(1, _int(dataset, "NumberOfFrames", 1)),
        photometric_interpretation=str(dataset.get("PhotometricInterpretation", "") or "MONOCHROME2").strip(),
        encapsulated=encapsulated,
        value_offset=value_offset,
        value_length=length,
        bits_stored=_int(dataset, "BitsStored", bits_allocated),
        pixel_representation=_int(dataset, "PixelRepresentation", 0),
        planar_configuration=_int(dataset, "PlanarConfiguration", 0),
        vr=vr,
        little_endian=little,
        extended_offsets=_offsets(dataset, "ExtendedOffsetTable") if encapsulated else None,
        extended_lengths=_offsets(dataset, "ExtendedOffsetTableLengths") if encapsulated else None,
    )
    return dataset, layout


def pixel_layout(stream: BinaryIO) -> PixelLayout:
    """The Pixel Data layout of the Part 10 file in the seekable ``stream`` (header read only)."""
    return read_header(stream)[1]


def _check_numbers(layout: PixelLayout, numbers: Sequence[int]) -> None:
    for number in numbers:
        if not 1 <= number <= layout.number_of_frames:
            raise FrameError(f"frame {number} out of range 1..{layout.number_of_frames}")


def _read_at(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise FrameError(f"pixel data truncated: wanted {size} bytes at {offset}, got {len(data)}")
    return data


# -- native (PS3.5 §8.1.1) -------------------------------------------------------------------


def _native_bytes(stream: BinaryIO, layout: PixelLayout, start: int, size: int, *, to_little: bool) -> bytes:
    """Bytes [start, start+size) of a native value, byte-swapped to little endian if asked."""
    if layout.value_length != UNDEFINED_LENGTH and start + size > layout.value_length:
        raise FrameError(
            f"pixel data holds {layout.value_length} bytes, frame needs bytes {start}..{start + size}"
        )
    swap_words = to_little and not layout.little_endian
    if swap_words and layout.bits_allocated > 8:
        return bytes(_swap(_read_at(stream, layout.value_offset + start, size), layout.bits_allocated // 8))
    if swap_words and layout.vr == "OW":
        # 8-bit or 1-bit samples in big endian OW: bytes are swapped in pairs (PS3.5 §7.3).
        lo, hi = start - start % 2, start + size + (start + size) % 2
        data = _swap(_read_at(stream, layout.value_offset + lo, hi - lo), 2)
        return bytes(data[start - lo : start - lo + size])
    return _read_at(stream, layout.value_offset + start, size)


def _swap(data: bytes, width: int) -> bytes:
    if width <= 1:
        return data
    usable = len(data) - len(data) % width
    swapped = np.frombuffer(data[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return swapped + data[usable:]


def _native_frame(stream: BinaryIO, layout: PixelLayout, number: int, *, to_little: bool) -> bytes:
    bits = layout.frame_bits
    if bits % 8 == 0:
        size = bits // 8
        return _native_bytes(stream, layout, (number - 1) * size, size, to_little=to_little)
    # Bits Allocated 1 with a frame not a whole number of bytes: repack from bit 0.
    first_bit = (number - 1) * bits
    start, shift = divmod(first_bit, 8)
    size = (shift + bits + 7) // 8
    raw = np.frombuffer(_native_bytes(stream, layout, start, size, to_little=True), dtype=np.uint8)
    unpacked = np.unpackbits(raw, bitorder="little")[shift : shift + bits]
    return np.packbits(unpacked, bitorder="little").tobytes()


# -- encapsulated (PS3.5 §A.4) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Fragment:
    offset: int  # of the item tag, relative to the first item after the Basic Offset Table
    position: int  # absolute position of the fragment's data in the file
    length: int


def _fragments(stream: BinaryIO, layout: PixelLayout) -> tuple[list[int], list[_Fragment]]:
    """The Basic Offset Table and the fragment items, reading item headers only (PS3.5 §A.4)."""
    stream.seek(layout.value_offset)
    header = stream.read(8)
    if len(header) < 8:
        raise FrameError("encapsulated pixel data truncated before the Basic Offset Table")
    tag_group, tag_elem, bot_length = struct.unpack("<HHI", header)
    if (tag_group << 16 | tag_elem) != _ITEM:
        raise FrameError("encapsulated pixel data does not start with a Basic Offset Table item")
    if bot_length % 4:
        raise FrameError(f"Basic Offset Table length {bot_length} is not a multiple of 4")
    bot_raw = stream.read(bot_length)
    if len(bot_raw) != bot_length:
        raise FrameError("encapsulated pixel data truncated in the Basic Offset Table")
    bot = list(struct.unpack(f"<{bot_length // 4}I", bot_raw))
    first = layout.value_offset + 8 + bot_length
    position = first
    fragments: list[_Fragment] = []
    while True:
        stream.seek(position)
        item = stream.read(8)
        if len(item) < 8:
            raise FrameError("encapsulated pixel data truncated (no Sequence Delimitation Item)")
        group, elem, length = struct.unpack("<HHI", item)
        tag = group << 16 | elem
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == UNDEFINED_LENGTH:
            raise FrameError(f"unexpected element ({group:04X},{elem:04X}) among pixel data fragments")
        fragments.append(_Fragment(position - first, position + 8, length))
        position += 8 + length
    if not fragments:
        raise FrameError("encapsulated pixel data has no fragments")
    return bot, fragments


def _ends_frame(stream: BinaryIO, fragment: _Fragment) -> bool:
    """Whether a fragment ends with an EOI / EOC marker FFD9 (JPEG, JPEG-LS, JPEG 2000), maybe padded."""
    size = min(fragment.length, 3)
    tail = _read_at(stream, fragment.position + fragment.length - size, size)
    return tail.endswith(b"\xff\xd9") or (tail[:2] == b"\xff\xd9" and tail[2:] == b"\x00")


def _frame_groups(stream: BinaryIO, layout: PixelLayout) -> list[tuple[list[_Fragment], int | None]]:
    """Per frame, its fragments and (from the Extended Offset Table) its exact length."""
    bot, fragments = _fragments(stream, layout)
    frames = layout.number_of_frames
    starts: list[int] | None = None
    lengths: list[int | None] = [None] * frames
    if layout.extended_offsets is not None and len(layout.extended_offsets) == frames:
        starts = list(layout.extended_offsets)
        if layout.extended_lengths is not None and len(layout.extended_lengths) == frames:
            lengths = list(layout.extended_lengths)
    elif bot and len(bot) == frames:
        starts = bot
    if starts is not None:
        by_offset = {fragment.offset: index for index, fragment in enumerate(fragments)}
        try:
            indices = [by_offset[start] for start in starts]
        except KeyError:
            raise FrameError("offset table entry does not point to a fragment (PS3.5 §A.4)") from None
        bounds = [*indices, len(fragments)]
        if any(b <= a for a, b in pairwise(bounds)):
            raise FrameError("offset table entries are not increasing (PS3.5 §A.4)")
        return [(fragments[bounds[i] : bounds[i + 1]], lengths[i]) for i in range(frames)]
    if frames == 1:
        return [(fragments, None)]
    if len(fragments) == frames:
        return [([fragment], None) for fragment in fragments]
    groups: list[tuple[list[_Fragment], int | None]] = []
    current: list[_Fragment] = []
    for fragment in fragments:
        current.append(fragment)
        if _ends_frame(stream, fragment):
            groups.append((current, None))
            current = []
    if current or len(groups) != frames:
        raise FrameError(
            f"cannot split {len(fragments)} fragments into {frames} frames without an offset table"
        )
    return groups


def _encapsulated_frame(stream: BinaryIO, group: tuple[list[_Fragment], int | None]) -> bytes:
    fragments, length = group
    data = b"".join(_read_at(stream, f.position, f.length) for f in fragments)
    return data[:length] if length is not None and length <= len(data) else data


# -- public frame access -------------------------------------------------------------------------


def stored_frames(stream: BinaryIO, layout: PixelLayout, numbers: Sequence[int]) -> Iterator[bytes]:
    """Yield frames (1-based ``numbers``, in order) as stored: native slices or compressed bitstreams.

    PS3.18 §8.7.3.3.2: a compressed frame is its bitstream without item delimiters. Encapsulated
    frames are found with the Extended Offset Table, else the Basic Offset Table, else one fragment
    per frame, else JPEG/JPEG 2000 end-of-image markers (PS3.5 §A.4).
    """
    _check_numbers(layout, numbers)
    if not layout.encapsulated:
        for number in numbers:
            yield _native_frame(stream, layout, number, to_little=False)
        return
    groups = _frame_groups(stream, layout)
    for number in numbers:
        yield _encapsulated_frame(stream, groups[number - 1])


def _decode_options(layout: PixelLayout) -> dict[str, Any]:
    options: dict[str, Any] = {
        "rows": layout.rows,
        "columns": layout.columns,
        "samples_per_pixel": layout.samples_per_pixel,
        "bits_allocated": layout.bits_allocated,
        "bits_stored": layout.bits_stored or layout.bits_allocated,
        "pixel_representation": layout.pixel_representation,
        "photometric_interpretation": layout.photometric_interpretation,
        "number_of_frames": 1,
        "pixel_keyword": "PixelData",
        "pixel_vr": "OB" if layout.bits_allocated <= 8 else "OW",
    }
    if layout.samples_per_pixel > 1:
        options["planar_configuration"] = layout.planar_configuration
    return options


def _decode(tsuid: str, source: bytes, layout: PixelLayout) -> tuple[np.ndarray, str]:
    try:
        decoder = get_decoder(UID(tsuid))
    except NotImplementedError as exc:
        raise UndecodableFrame(f"no pixel data decoder for {UID(tsuid).name}: {exc}") from None
    if not decoder.is_available:
        raise UndecodableFrame(f"no decoder plugin installed for {UID(tsuid).name}")
    try:
        array, meta = decoder.as_array(source, index=0, **_decode_options(layout))
    except Exception as exc:  # plugins raise anything from RuntimeError to struct.error
        raise UndecodableFrame(f"cannot decode frame: {type(exc).__name__}: {exc}") from None
    return array, str(meta.get("photometric_interpretation", layout.photometric_interpretation))


def _native_le_frames(stream: BinaryIO, layout: PixelLayout, numbers: Sequence[int]) -> Iterator[bytes]:
    if layout.transfer_syntax_uid == ENCAPSULATED_UNCOMPRESSED:
        for frame in stored_frames(stream, layout, numbers):
            yield frame[: layout.frame_size]
        return
    for number in numbers:
        yield _native_frame(stream, layout, number, to_little=True)


def frame_arrays(
    stream: BinaryIO, layout: PixelLayout, numbers: Sequence[int]
) -> Iterator[tuple[np.ndarray, str]]:
    """Yield each frame as a numpy array (rows, columns[, samples]) and its photometric interpretation.

    The interpretation is the one after decoding (e.g. ``RGB`` for a JPEG YBR_FULL_422 frame).
    """
    _check_numbers(layout, numbers)
    if not layout.encapsulated or layout.transfer_syntax_uid == ENCAPSULATED_UNCOMPRESSED:
        native = replace(layout, encapsulated=False)
        for frame in _native_le_frames(stream, layout, numbers):
            yield _decode(ExplicitVRLittleEndian, frame, native)
        return
    for frame in stored_frames(stream, layout, numbers):
        yield _decode(layout.transfer_syntax_uid, encapsulate([frame]), layout)


def _array_bytes(array: np.ndarray, bits_allocated: int, signed: bool) -> bytes:
    if bits_allocated == 1:
        return pack_bits(array, pad=False)
    width = max(1, bits_allocated // 8)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{width}")
    if array.dtype.kind == "f":
        dtype = np.dtype(f"<f{array.dtype.itemsize}")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def decoded_frames(stream: BinaryIO, layout: PixelLayout, numbers: Sequence[int]) -> Iterator[bytes]:
    """Yield frames as native little endian bytes, as in Explicit VR Little Endian (PS3.18 §8.7.3.3.1).

    Native frames are returned as stored (byte-swapped from big endian if needed); compressed
    frames are decoded one at a time. Colour frames decode to interleaved samples, JPEG YBR to RGB.
    """
    _check_numbers(layout, numbers)
    if not layout.encapsulated or layout.transfer_syntax_uid == ENCAPSULATED_UNCOMPRESSED:
        yield from _native_le_frames(stream, layout, numbers)
        return
    for array, _ in frame_arrays(stream, layout, numbers):
        yield _array_bytes(array, layout.bits_allocated, layout.pixel_representation == 1)
