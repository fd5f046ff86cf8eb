"""Comparing DICOM files: bit-exact data sets, or element by element with equal pixel bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info as read_file_meta
from pydicom.filereader import read_preamble


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, raw bytes of the data set after the file meta information)."""
    with open(path, "rb") as fh:
        read_preamble(fh, force=False)
        meta = read_file_meta(fh)
        return str(meta.TransferSyntaxUID), fh.read()


def dataset_sha256(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)[1]).hexdigest()


def same_instance(original: Path, received: Path) -> str | None:
    """None when identical: same syntax → same bytes; otherwise every element and pixel bytes equal."""
    ts_a, bytes_a = dataset_bytes(original)
    ts_b, bytes_b = dataset_bytes(received)
    if ts_a == ts_b and bytes_a == bytes_b:
        return None
    # A sending SCU may re-encode (dcmsend drops group lengths, fixes padding): compare values.
    a, b = dcmread(original), dcmread(received)
    # Decoding pixel data changes how they are described (PS3.5 §8.2: YBR → RGB, planar order).
    describes_pixels = {0x00280004, 0x00280006} if ts_a != ts_b else set()
    for element in a:
        if element.tag.group == 0x0002 or element.tag.element == 0x0000 or element.tag == 0xFFFCFFFC:
            continue
        if element.tag in describes_pixels:
            continue
        if element.tag not in b:
            return f"{original.name}: {element.tag} missing after transfer"
        if element.tag == 0x7FE00010:
            continue
        if element.value != b[element.tag].value:
            return f"{original.name}: {element.keyword or element.tag} differs"
    if "PixelData" in a and ts_a == ts_b:
        if a.PixelData != b.PixelData:
            return f"{original.name}: pixel data bytes differ"
    elif "PixelData" in a:
        # Different transfer syntaxes (the peer did not accept the stored one): the decoded
        # pixels must be equal (lossless transcoding, or the same lossy data decoded once).
        import numpy as np

        if not np.array_equal(a.pixel_array, b.pixel_array):
            return f"{original.name}: decoded pixel data differ"
    return None
