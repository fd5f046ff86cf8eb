"""Transfer-syntax conversion for peers that did not accept the stored one (PS3.5 §10, Annex A).

Decoding uses pydicom's pixel-data handlers (pylibjpeg plugins, python-gdcm); encoding to the
native syntaxes is always possible, to RLE Lossless and JPEG-LS / JPEG 2000 lossless where an
encoder plugin is installed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)


class TranscodeError(RuntimeError):
    """The instance cannot be converted to any of the accepted transfer syntaxes."""


def choose_target(stored: str, accepted: Sequence[str]) -> str | None:
    """The accepted syntax to convert to: the stored one, else a native one, else None."""
    if stored in accepted:
        return stored
    for candidate in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        if candidate in accepted:
            return candidate
    return None


def can_transcode(stored: str, target: str) -> bool:
    """Whether :func:`transcode_file` can turn ``stored`` into ``target`` on this installation.

    Native little-endian targets need only a decoder for ``stored``; compressed targets need one of
    pydicom's encoders with its plugin installed (RLE, JPEG-LS, JPEG 2000). Big-endian data is sent
    as stored only.
    """
    source, wanted = UID(stored), UID(target)
    if source == wanted:
        return True
    if ExplicitVRBigEndian in (source, wanted) or not wanted.is_transfer_syntax:
        return False
    if source.is_compressed:
        try:
            if not get_decoder(source).is_available:
                return False
        except NotImplementedError:
            return False
    if not wanted.is_compressed:
        return True
    try:
        return bool(get_encoder(wanted).is_available)
    except NotImplementedError:
        return False


def _decompress(dataset: Dataset) -> None:
    """Decode pixel data with the first plugin that manages (pydicom's default order, then each)."""
    errors = []
    for plugin in ("", "pylibjpeg", "gdcm"):
        try:
            dataset.decompress(decoding_plugin=plugin, generate_instance_uid=False)
            return
        except Exception as exc:
            errors.append(f"{plugin or 'default'}: {exc}")
    raise TranscodeError("; ".join(errors))


def transcode_file(path: Path, target: str) -> Dataset:
    """Read ``path`` and return the dataset re-encoded in ``target`` (pixel data decoded if needed)."""
    dataset = dcmread(path)
    source = UID(dataset.file_meta.TransferSyntaxUID)
    target_uid = UID(target)
    if source == target_uid:
        return dataset
    try:
        if source.is_compressed and "PixelData" in dataset:
            _decompress(dataset)
        if target_uid.is_compressed:
            dataset.compress(target_uid, generate_instance_uid=False)
        # Re-encode every element (raw elements keep the source encoding until written):
        # write in the target syntax, then read back so the dataset's encoding is the target's.
        dataset.file_meta.TransferSyntaxUID = target_uid
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        return dcmread(buffer)
    except Exception as exc:
        raise TranscodeError(f"cannot convert {source.name} to {target_uid.name}: {exc}") from exc
