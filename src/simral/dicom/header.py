"""Reading an instance's header without its pixel data, and the keys the index needs.

PS3.10 §7 (file format), PS3.5 §7.1 (data element encoding), PS3.18 §F.2 (DICOM JSON model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import UID

from simral.dicom import json_model
from simral.dicom.json_model import BULK_DATA_THRESHOLD as BULK_DATA_THRESHOLD

#: Elements whose defined length exceeds this are not read while parsing the header.
DEFER_SIZE = 64 * 1024


class RejectedInstance(ValueError):
    """An instance that cannot be archived; ``reason`` is safe to log (no PHI)."""

    def __init__(self, reason: str, *, status: int = 0xC000) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The C-STORE failure status (PS3.4 B.2.3) this rejection maps to.
        self.status = status


@dataclass
class Header:
    """An instance's header and the index keys read from it."""

    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str

    def text(self, keyword: str) -> str:
        """The element's value as text ('' when absent or empty); PN values decoded."""
        value = self.dataset.get(keyword)
        if value is None or value == "":
            return ""
        if isinstance(value, list | tuple):
            return "\\".join(str(v) for v in value)
        return str(value)

    def integer(self, keyword: str) -> int | None:
        """The element's first value as an integer, or None."""
        value = self.dataset.get(keyword)
        if value is None or value == "":
            return None
        try:
            return int(value[0] if isinstance(value, list | tuple) else value)
        except (TypeError, ValueError):
            return None

    def json_model(self) -> dict[str, Any]:
        """The header as DICOM JSON (PS3.18 §F.2), bulk data replaced by a BulkDataURI."""
        return dataset_to_json(self.dataset)


def dataset_to_json(dataset: Dataset) -> dict[str, Any]:
    """DICOM JSON of ``dataset`` without group 0002, pixel data or values above the threshold.

    Built from the raw element bytes by :mod:`simral.dicom.json_model`; same output as pydicom's
    ``Dataset.to_json_dict`` (see :func:`simral.dicom.json_model.pydicom_dataset_to_json`).
    """
    return json_model.dataset_to_json(dataset)


def _check_lengths(dataset: Dataset, file_size: int) -> None:
    """Refuse defined lengths that point past the end of the file (PS3.5 §7.1.1)."""
    for raw in dataset._dict.values():
        if not isinstance(raw, RawDataElement):
            continue
        if raw.length == 0xFFFFFFFF:
            continue
        if raw.value_tell + raw.length > file_size:
            raise RejectedInstance(
                f"element ({raw.tag.group:04X},{raw.tag.elem:04X}) claims {raw.length} bytes, "
                f"beyond the end of the data ({file_size} bytes)",
                status=0xC000,
            )


def _check_structure(path: Path, transfer_syntax: UID, file_size: int) -> None:
    """Walk the top-level elements after the header, values skipped, to refuse truncated files.

    Defined lengths must end within the file; undefined lengths (encapsulated Pixel Data,
    sequences) must reach their delimiter (PS3.5 §7.5, §A.4). Deflated data cannot be walked
    without inflating it and is left to the decoder.
    """
    if transfer_syntax.is_deflated:
        return
    with open(path, "rb") as fp:
        read_preamble(fp, force=False)
        _read_file_meta_info(fp)
        if not transfer_syntax.is_implicit_VR:
            # pydicom silently reads an implicit VR data set under an explicit VR transfer syntax;
            # such a data set would be stored and served under a syntax it is not encoded in.
            first = fp.read(6)
            fp.seek(-len(first), os.SEEK_CUR)
            if len(first) == 6 and not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B):
                raise RejectedInstance(
                    f"data set not encoded in {transfer_syntax.name} (implicit VR found)", status=0xC000
                )
        try:
            for raw in data_element_generator(
                fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, defer_size=1
            ):
                length = getattr(raw, "length", 0)
                tell = getattr(raw, "value_tell", 0)
                if length != 0xFFFFFFFF and tell + length > file_size:
                    raise RejectedInstance(
                        f"element ({raw.tag.group:04X},{raw.tag.elem:04X}) of {length} bytes is cut short: "
                        f"the data ends at byte {file_size}",
                        status=0xC000,
                    )
        except RejectedInstance:
            raise
        except EOFError as exc:
            raise RejectedInstance(f"truncated data: {exc}", status=0xC000) from None
        except Exception as exc:  # ValueError, KeyError, struct.error, OSError ("no tag to read")...
            raise RejectedInstance(f"malformed data: {type(exc).__name__}: {exc}", status=0xC000) from None


#: The attributes the index reads from every header (``archive.service``):
#: decoded by :func:`read_header`, so that a malformed value refuses the instance at step 1.
INDEXED_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
    "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime",
    "InstanceNumber", "NumberOfFrames", "Rows", "Columns",
)  # fmt: skip


def _valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def read_header(path: Path) -> Header:
    """Parse a Part 10 file up to Pixel Data and check the identifying UIDs (DESIGN.md §3 step 1)."""
    file_size = os.path.getsize(path)
    try:
        dataset = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        raise RejectedInstance(f"not a DICOM Part 10 file: {exc}") from None
    except Exception as exc:
        # pydicom reports damaged data in many ways: EOFError, ValueError, KeyError, struct.error,
        # NotImplementedError (an unknown VR), BytesLengthException (a binary value of the wrong
        # length), zlib.error (Deflated Explicit VR Little Endian that does not inflate, PS3.5 A.5)...
        raise RejectedInstance(f"unreadable DICOM data: {type(exc).__name__}: {exc}") from None
    _check_lengths(dataset, file_size)
    meta = dataset.file_meta
    try:
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception as exc:  # a malformed value surfaces only when the element is decoded
        raise RejectedInstance(f"undecodable Transfer Syntax UID: {type(exc).__name__}") from None
    if not transfer_syntax:
        raise RejectedInstance("file meta information has no Transfer Syntax UID")
    if not UID(transfer_syntax).is_transfer_syntax:
        # Another UID, or a private syntax whose encoding is unknown (PS3.5 §10, PS3.10 §7.1).
        raise RejectedInstance("the Transfer Syntax UID is not a transfer syntax known to simral")
    try:
        uids = {
            "SOPClassUID": str(
                dataset.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or ""
            ),
            "SOPInstanceUID": str(dataset.get("SOPInstanceUID", "") or ""),
            "StudyInstanceUID": str(dataset.get("StudyInstanceUID", "") or ""),
            "SeriesInstanceUID": str(dataset.get("SeriesInstanceUID", "") or ""),
        }
    except Exception as exc:  # a malformed value surfaces only when the element is decoded
        raise RejectedInstance(f"undecodable identifying attribute: {type(exc).__name__}") from None
    for keyword, value in uids.items():
        if not value:
            raise RejectedInstance(f"missing {keyword}", status=0xA900)
        if not _valid_uid(value):
            raise RejectedInstance(f"invalid {keyword} (PS3.5 §9.1)", status=0xA900)
    _check_structure(path, UID(transfer_syntax), file_size)
    header = Header(
        dataset=dataset,
        transfer_syntax_uid=str(UID(transfer_syntax)),
        sop_class_uid=uids["SOPClassUID"],
        sop_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
    )
    for keyword in INDEXED_KEYWORDS:
        try:
            header.text(keyword)
        except Exception as exc:  # decoded here, so the index transaction never meets it
            raise RejectedInstance(f"undecodable {keyword}: {type(exc).__name__}") from None
    return header
