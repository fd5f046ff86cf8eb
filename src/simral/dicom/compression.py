"""Lossless re-encoding of native Pixel Data for storage at rest, verified before use.

Targets (PS3.5 §8.2, Annex A.4): JPEG-LS Lossless (1.2.840.10008.1.2.4.80, §8.2.3, encoder
pyjpegls) and JPEG 2000 Lossless Only (1.2.840.10008.1.2.4.90, §8.2.4, encoder pylibjpeg-openjpeg,
without the multi-component transform so that RGB stays RGB). HTJ2K Lossless
(1.2.840.10008.1.2.4.201) is offered only when pydicom has an encoder for it; pydicom 3.0 has
none, so :func:`available_syntaxes` leaves it out.

:func:`compress_file` writes the new Part 10 file (same SOP Instance UID and attributes, Lossy
Image Compression "00", PS3.3 C.7.6.1.1.5), reads it back, decodes every frame and compares the
pixels with the original's — values (``numpy.array_equal``) and the native bytes a peer that
does not accept the compressed syntax will receive — and refuses (:class:`NotCompressible`) when
anything differs. The whole instance is held in memory while it is re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)

#: The lossless syntaxes a compression rule may ask for, by the name the CLI uses.
LOSSLESS_SYNTAXES: dict[str, UID] = {
    "jpeg-ls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
    "htj2k": HTJ2KLossless,
}
#: Stored syntaxes that are re-encoded (native little endian; big endian is retired, PS3.5 A.3).
SOURCE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class NotCompressible(ValueError):
    """The instance is left as stored; ``reason`` says why (no PHI)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CompressedFile:
    """A verified lossless copy of an instance."""

    path: Path
    transfer_syntax_uid: str
    frames: int


def syntax_available(uid: str) -> bool:
    """Whether pydicom has an installed encoder for ``uid`` here."""
    try:
        return bool(get_encoder(UID(uid)).is_available)
    except NotImplementedError:
        return False


def available_syntaxes() -> dict[str, UID]:
    """The entries of :data:`LOSSLESS_SYNTAXES` that can be encoded on this installation."""
    return {name: uid for name, uid in LOSSLESS_SYNTAXES.items() if syntax_available(uid)}


def _decoded(dataset: Dataset) -> np.ndarray:
    """Every frame decoded with minimal processing (no YBR → RGB conversion): the stored samples."""
    array, _ = get_decoder(UID(dataset.file_meta.TransferSyntaxUID)).as_array(dataset, raw=True)
    return array


def _native_bytes(array: np.ndarray, like: bytes) -> bytes:
    data = np.ascontiguousarray(array).tobytes()
    return data + b"\x00" if len(data) % 2 and len(like) == len(data) + 1 else data


def compress_file(source: Path, target: str, destination: Path) -> CompressedFile:
    """Write ``source`` re-encoded losslessly in ``target`` to ``destination`` and verify it.

    Raises :class:`NotCompressible` for an instance without Pixel Data, already encapsulated,
    in a syntax other than native little endian, marked lossy, that the encoder refuses, or whose
    decoded copy differs from the original in any pixel.
    """
    target_uid = UID(target)
    if target_uid not in LOSSLESS_SYNTAXES.values():
        raise NotCompressible(f"{target_uid.name or target} is not a lossless target syntax")
    if not syntax_available(target_uid):
        raise NotCompressible(f"no encoder installed for {target_uid.name}")
    try:
        dataset = dcmread(source)
    except Exception as exc:
        raise NotCompressible(f"unreadable: {type(exc).__name__}: {exc}") from None
    stored = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if "PixelData" not in dataset:
        raise NotCompressible("no Pixel Data (7FE0,0010)")
    if stored.is_compressed:
        raise NotCompressible(f"already encapsulated ({stored.name})")
    if stored not in SOURCE_SYNTAXES:
        raise NotCompressible(f"stored as {stored.name or stored}: only native little endian is re-encoded")
    if str(dataset.get("LossyImageCompression", "")).strip() == "01":
        raise NotCompressible("Lossy Image Compression is 01 (PS3.3 C.7.6.1.1.5)")
    original_bytes = bytes(dataset.PixelData)
    try:
        original = _decoded(dataset).copy()
    except Exception as exc:
        raise NotCompressible(f"cannot decode the stored pixel data: {type(exc).__name__}: {exc}") from None
    if _native_bytes(original, original_bytes) != original_bytes:
        raise NotCompressible("the stored pixel bytes are not plain sample values (bits above Bits Stored)")
    options: dict[str, Any] = {"use_mct": False} if target_uid == JPEG2000Lossless else {}
    try:
        dataset.compress(target_uid, generate_instance_uid=False, **options)
    except Exception as exc:
        raise NotCompressible(f"encoding failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    if "LossyImageCompression" not in dataset:
        dataset.LossyImageCompression = "00"
    dataset.save_as(destination, enforce_file_format=True)
    copy = dcmread(destination)
    try:
        decoded = _decoded(copy)
    except Exception as exc:
        raise NotCompressible(f"the compressed copy does not decode: {type(exc).__name__}: {exc}") from None
    if str(copy.file_meta.TransferSyntaxUID) != target_uid or copy.SOPInstanceUID != dataset.SOPInstanceUID:
        raise NotCompressible("the written copy does not have the expected syntax and SOP Instance UID")
    if decoded.dtype != original.dtype or not np.array_equal(decoded, original):
        raise NotCompressible("decoded pixels differ from the original")
    if _native_bytes(decoded, original_bytes) != original_bytes:
        raise NotCompressible("decoded pixel bytes differ from the original")
    return CompressedFile(destination, str(target_uid), int(copy.get("NumberOfFrames", 1) or 1))
