"""Attribute coercion of an instance being sent (PS3.4 B.4.1.3 "Coercion of Attributes", as IHE
Patient Information Reconciliation uses it): the stored file is read, the given attributes replace
the stored ones in the copy that goes out, and the stored bytes are left as they are.

One instance is decoded at a time (its pixel data included), never a whole study.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from simral.dicom.transcode import transcode_file


def coerce(dataset: Dataset, attributes: dict[str, Any]) -> Dataset:
    """Replace top-level attributes of ``dataset`` by ``attributes`` (DICOM JSON keyed by tag; an
    attribute without a value is sent empty, so a stored value of another domain never leaks)."""
    dataset.update(Dataset.from_json(attributes))
    return dataset


def coerced_dataset(path: Path, attributes: dict[str, Any], transfer_syntax: str) -> Dataset:
    """The instance stored at ``path`` in ``transfer_syntax`` (transcoded if it differs), coerced."""
    return coerce(transcode_file(path, transfer_syntax), attributes)


def coerced_bytes(path: Path, attributes: dict[str, Any], transfer_syntax: str) -> bytes:
    """:func:`coerced_dataset` as a DICOM file (PS3.10 preamble and meta information)."""
    buffer = io.BytesIO()
    coerced_dataset(path, attributes, transfer_syntax).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
