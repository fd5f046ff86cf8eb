"""DICOM test data for simral's tests and benchmarks.

No real patient data, ever: everything here is either generated (synthetic phantoms, made-up names and
identifiers, UIDs under pydicom's root derived from a seed) or one of the files shipped by pydicom and
pydicom-data for their own test suites.

* :func:`storable_test_files` -- the files of the pydicom test corpus that a Storage SCU can send (see
  :func:`describe_test_files` for why the others are left out);
* :func:`ct_series`, :func:`small_instances`, :func:`multi_series_study` -- synthetic instances, fast and
  reproducible (same arguments and seed, same bytes and UIDs);
* :func:`charset_samples`, :func:`charset_instances` -- Specific Character Set coverage;
* :func:`set_test_ins` -- the patient's INS in Other Patient IDs Sequence (ANS test identities only);
* :func:`bad_inputs` -- broken files for negative tests.

Command line::

    python tests/corpus.py ct OUTDIR --slices 600
    python tests/corpus.py small OUTDIR --count 2000
    python tests/corpus.py study OUTDIR | charset OUTDIR | bad OUTDIR
    python tests/corpus.py list        # storable corpus files, transfer syntax and SOP class
    python tests/corpus.py describe    # excluded corpus files and why
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import io
import logging
import math
import re
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AllStoragePresentationContexts

__all__ = [
    "ANS_TEST_INS_OID",
    "CharsetInstance",
    "CorpusFile",
    "ExcludedFile",
    "bad_inputs",
    "charset_instances",
    "charset_samples",
    "corpus_report",
    "ct_series",
    "describe_test_files",
    "is_valid_uid",
    "multi_series_study",
    "set_test_ins",
    "small_instances",
    "storable_test_files",
]

# ---------------------------------------------------------------------------------------------------------
# The pydicom test corpus
# ---------------------------------------------------------------------------------------------------------

#: Storage SOP Classes known to pynetdicom (what an SCP built on it can be configured to accept).
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(cx.abstract_syntax for cx in AllStoragePresentationContexts)

#: Transfer syntaxes known to dcmtk 3.6.7 (dcmsend/storescp on the test machines: the UIDs in libdcmdata).
#: A file in a transfer syntax dcmtk does not know (HTJ2K, JPEG XL, fragmentable MPEG, SMPTE 2110...)
#: cannot be read, hence not sent, by dcmsend. pynetdicom itself would negotiate any transfer syntax UID.
DCMTK_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    [
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.5",  # RLE Lossless
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(50, 67)),  # JPEG processes 1-29 (incl. retired)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(90, 96)),  # JPEG 2000 (+ Part 2, JPIP)
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),  # MPEG2, MPEG-4 AVC, HEVC
    ]
)

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# The attributes every instance must have to be archived (and, for the first two, to be sent at all).
_IDENTIFYING_UIDS: tuple[tuple[str, int], ...] = (
    ("SOPClassUID", 0x00080016),
    ("SOPInstanceUID", 0x00080018),
    ("StudyInstanceUID", 0x0020000D),
    ("SeriesInstanceUID", 0x0020000E),
)

#: Why a corpus file is left out; keys of :attr:`ExcludedFile.reason`.
#:
#: The selection was checked by dcmsending every selected file (dcmtk 3.6.7) to ``storescp +xa`` on
#: 127.0.0.1 and reading back what arrived: all get through. Without the "encoding-mismatch" rule four
#: files pydicom reads happily would not: SC_rgb_jpeg.dcm (implicit VR data set under JPEG Baseline;
#: dcmsend fails to parse it) and explicit_VR-UN.dcm, rtdose_rle*.dcm (identifying UIDs in VR UN; dcmsend
#: cannot match the SOP Class to a presentation context, the SCP gets an unusable data set, and dcmsend
#: still exits 0 -- check what arrived, not only dcmsend's exit status).
EXCLUSION_REASONS: dict[str, str] = {
    "not-dicom": "dcmread refuses it (no preamble/'DICM' prefix: not a DICOM Part 10 file)",
    "unreadable": "dcmread fails on it",
    "no-transfer-syntax": "no File Meta Information or no TransferSyntaxUID in it",
    "unknown-transfer-syntax": "transfer syntax unknown to dcmtk 3.6.7 (dcmsend cannot read the file)",
    "missing-uid": "SOPClassUID, SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID absent or empty",
    "encoding-mismatch": (
        "an identifying UID is not encoded as the transfer syntax says (VR UN in explicit VR, or the data"
        " set is implicit VR under an explicit VR transfer syntax): dcmtk then does not see the UID (or"
        " cannot parse the file) and the C-STORE fails"
    ),
    "invalid-uid": "an identifying UID is not a valid UID (over 64 characters or not digits and dots)",
    "not-storage": "SOP Class is not a Storage SOP Class known to pynetdicom (e.g. retired, DICOMDIR)",
    "meta-mismatch": "MediaStorageSOPClassUID/InstanceUID in the file meta differ from the data set's",
    "duplicate": "its SOPInstanceUID is already used by an earlier file of the selection",
}


@dataclass(frozen=True)
class CorpusFile:
    """A storable file of the pydicom test corpus."""

    path: Path
    transfer_syntax: UID
    sop_class_uid: UID
    sop_instance_uid: UID
    study_instance_uid: UID
    series_instance_uid: UID


@dataclass(frozen=True)
class ExcludedFile:
    """A file of the pydicom test corpus left out of :func:`storable_test_files`."""

    path: Path
    reason: str  # a key of EXCLUSION_REASONS
    detail: str


def is_valid_uid(value: object) -> bool:
    """True for a UID that can go on the wire: 1-64 characters, dot-separated numbers, no leading zeros."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records (the corpus has many deliberately odd files)."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _short(path: Path) -> str:
    """A path for humans: from the installed package's name on."""
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return str(path)


def _classify(path: Path) -> CorpusFile | ExcludedFile:
    """Check one file against every rule except uniqueness."""

    def excluded(reason: str, detail: str = "") -> ExcludedFile:
        return ExcludedFile(path, reason, detail)

    try:
        ds = pydicom.dcmread(path)  # default settings, not force
    except InvalidDicomError as exc:
        return excluded("not-dicom", str(exc).split(". ")[0])
    except Exception as exc:
        return excluded("unreadable", f"{type(exc).__name__}: {exc}")
    meta: FileMetaDataset = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        return excluded("no-transfer-syntax")
    if str(ts) not in DCMTK_TRANSFER_SYNTAXES:
        return excluded("unknown-transfer-syntax", f"{ts} {ts.name}")
    missing = [kw for kw, tag in _IDENTIFYING_UIDS if tag not in ds or not ds.get_item(tag).value]
    if missing:
        return excluded("missing-uid", ", ".join(missing))
    # Look at the raw elements (still unconverted right after dcmread): pydicom silently turns UN into
    # the dictionary VR and falls back to implicit VR when the data contradicts the transfer syntax,
    # dcmtk does neither.
    expected_vr = None if ts.is_implicit_VR else "UI"
    for kw, tag in _IDENTIFYING_UIDS:
        item = ds.get_item(tag)
        if isinstance(item, RawDataElement) and expected_vr != item.VR:
            found = "implicit VR" if item.VR is None else f"VR {item.VR}"
            return excluded("encoding-mismatch", f"{kw} encoded with {found} under {ts.name}")
    values = {kw: ds.get(kw) for kw, _ in _IDENTIFYING_UIDS}
    invalid = [f"{kw}={value!r}" for kw, value in values.items() if not is_valid_uid(value)]
    if invalid:
        return excluded("invalid-uid", ", ".join(invalid))
    sop_class, sop_instance = values["SOPClassUID"], values["SOPInstanceUID"]
    if sop_class not in STORAGE_SOP_CLASSES:
        return excluded("not-storage", f"{sop_class} {UID(sop_class).name}")
    meta_class, meta_instance = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    if meta_class != sop_class or meta_instance != sop_instance:
        return excluded(
            "meta-mismatch", f"meta {meta_class} / {meta_instance}, data set {sop_class} / {sop_instance}"
        )
    return CorpusFile(
        path,
        UID(ts),
        UID(sop_class),
        UID(sop_instance),
        UID(values["StudyInstanceUID"]),
        UID(values["SeriesInstanceUID"]),
    )


@functools.cache
def corpus_report() -> tuple[tuple[CorpusFile, ...], tuple[ExcludedFile, ...]]:
    """(storable files, excluded files) of the pydicom test corpus, both sorted by path. Cached.

    The corpus is ``pydicom.data.get_testdata_files()``: pydicom's own test files plus pydicom-data's when
    installed (nothing is downloaded). A file is storable when it passes every rule of
    :data:`EXCLUSION_REASONS`; when several files share a SOP Instance UID (pydicom ships the same image in
    many transfer syntaxes and variants) only the first in path order is kept.

    Checked against dcmtk 3.6.7: ``dcmsend`` sends every storable file to ``storescp +xa`` (no -pm), see
    :data:`EXCLUSION_REASONS`. dcmsend cannot decompress JPEG 2000, so a JPEG 2000 file goes only to an SCP
    that accepts JPEG 2000 (as ``storescp +xa`` and pynetdicom do). Every transfer syntax is kept, deflated
    and big endian included.
    """
    storable: list[CorpusFile] = []
    excluded: list[ExcludedFile] = []
    first: dict[str, tuple[CorpusFile, bytes]] = {}
    paths = sorted({Path(p) for p in pydicom.data.get_testdata_files()})
    with quiet_pydicom():
        for path in paths:
            if not path.is_file():
                continue
            verdict = _classify(path)
            if isinstance(verdict, ExcludedFile):
                excluded.append(verdict)
                continue
            digest = hashlib.sha256(path.read_bytes()).digest()
            if verdict.sop_instance_uid in first:
                kept, kept_digest = first[verdict.sop_instance_uid]
                same = "identical bytes" if digest == kept_digest else "different content"
                excluded.append(ExcludedFile(path, "duplicate", f"same UID as {_short(kept.path)} ({same})"))
                continue
            first[verdict.sop_instance_uid] = (verdict, digest)
            storable.append(verdict)
    return tuple(storable), tuple(excluded)


def storable_test_files() -> list[Path]:
    """Paths of the storable files of the pydicom test corpus, sorted (see :func:`corpus_report`)."""
    return [f.path for f in corpus_report()[0]]


def describe_test_files(out: TextIO | None = None) -> None:
    """Print, for humans, why each excluded corpus file is excluded, and the counts."""
    out = out or sys.stdout
    storable, excluded = corpus_report()
    for f in excluded:
        print(f"{f.reason:24} {_short(f.path)}" + (f"  -- {f.detail}" if f.detail else ""), file=out)
    print(file=out)
    counts = Counter(f.reason for f in excluded)
    print(f"{len(storable)} storable, {len(excluded)} excluded:", file=out)
    for reason, text in EXCLUSION_REASONS.items():
        if counts[reason]:
            print(f"  {counts[reason]:4} {reason}: {text}", file=out)


# ---------------------------------------------------------------------------------------------------------
# Synthetic instances: common helpers
# ---------------------------------------------------------------------------------------------------------

_UID_NAMESPACE = "simral-test-corpus-1"
_MANUFACTURER = "SIMRAL synthetic"
_INSTITUTION = "Synthetic Test Hospital"


def _uid(*parts: object) -> UID:
    """A UID under pydicom's root, a deterministic function of ``parts``."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)])


def _number(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


@dataclass(frozen=True)
class _Study:
    """Patient- and study-level attributes, derived from the UIDs/IDs so that every series agrees."""

    uid: UID
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str

    @classmethod
    def make(cls, uid: str, patient_id: str, patient_name: str, description: str) -> _Study:
        n = _number("study", uid)
        p = _number("patient", patient_id)
        date = dt.date(2020, 1, 1) + dt.timedelta(days=n % 1800)
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=p % 27000)
        return cls(
            uid=UID(uid),
            patient_id=patient_id,
            patient_name=patient_name,
            birth_date=birth.strftime("%Y%m%d"),
            sex="MFO"[p % 3],
            date=date.strftime("%Y%m%d"),
            time=f"{7 + (n >> 16) % 12:02d}{(n >> 24) % 60:02d}{(n >> 32) % 60:02d}",
            accession=f"SIM{n % 10**10:010d}",
            study_id=str(1 + (n >> 40) % 99999),
            description=description,
        )

    def apply(self, ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.birth_date
        ds.PatientSex = self.sex
        ds.StudyInstanceUID = self.uid
        ds.StudyDate = self.date
        ds.StudyTime = self.time
        ds.AccessionNumber = self.accession
        ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
        ds.StudyID = self.study_id
        ds.StudyDescription = self.description
        ds.Manufacturer = _MANUFACTURER
        ds.InstitutionName = _INSTITUTION
        ds.StationName = "SIMRALSIM"


def _series_time(study: _Study, series_number: int) -> str:
    hh, mm, ss = int(study.time[:2]), int(study.time[2:4]), int(study.time[4:])
    total = (hh * 3600 + mm * 60 + ss + 90 * series_number) % 86400
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file in Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "SIMRAL_CORPUS"
    ds.file_meta = meta
    buffer = io.BytesIO()  # one write() instead of one per element
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getbuffer())
    return path


# ---------------------------------------------------------------------------------------------------------
# CT
# ---------------------------------------------------------------------------------------------------------

_PIXEL_DATA = 0x7FE00010
_HU_OFFSET = 1024  # stored value = HU + 1024, RescaleIntercept -1024
_FOV_MM = 360.0


class _CTPhantom:
    """A cheap torso phantom: fixed body, spine and table; lungs, liver and a lesion varying along z.

    Everything costly is computed once; a slice is a few masked assignments plus a shifted window of a
    precomputed noise field.
    """

    NOISE_PAD = 48

    def __init__(self, rows: int, cols: int, seed: int) -> None:
        self.rows, self.cols = rows, cols
        y, x = np.ogrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
        y, x = y.astype(np.float32), x.astype(np.float32)

        def ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
            return np.asarray(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2, dtype=np.float32)

        hu = np.full((rows, cols), -1000, dtype=np.int16)
        hu[ellipse(0, 0.02, 0.86, 0.62) < 1] = -95  # subcutaneous fat
        hu[ellipse(0, 0.02, 0.80, 0.56) < 1] = 35  # soft tissue
        hu[ellipse(0, 0.02, 0.78, 0.54) < 1] = 45
        hu[(np.abs(y - 0.74) < 0.02) & (np.abs(x) < 0.92)] = 150  # table
        hu[ellipse(0, 0.38, 0.10, 0.09) < 1] = 700  # vertebral body, cortical
        hu[ellipse(0, 0.38, 0.075, 0.065) < 1] = 250  # cancellous
        hu[ellipse(0, 0.50, 0.03, 0.05) < 1] = 25  # spinal canal
        # smooth in-body gradient (beam hardening-ish) so slices are not piecewise constant
        body = ellipse(0, 0.02, 0.78, 0.54) < 1
        shading = (12 * np.cos(3 * x) * np.cos(2 * y)).astype(np.int16)
        hu = np.where(body, hu + shading, hu).astype(np.int16)
        self.base = (hu + _HU_OFFSET).astype(np.int16)
        self.lungs = np.minimum(ellipse(-0.40, -0.02, 0.30, 0.42), ellipse(0.40, -0.02, 0.30, 0.42))
        self.liver = ellipse(-0.30, -0.05, 0.38, 0.32)
        self.kidneys = np.minimum(ellipse(-0.30, 0.30, 0.09, 0.12), ellipse(0.30, 0.30, 0.09, 0.12))
        self.lesion = ellipse(-0.32, -0.08, 1.0, 1.0)  # squared distance from its centre
        self.aorta = ellipse(0.08, 0.22, 0.06, 0.06)
        rng = np.random.default_rng(seed)
        pad = self.NOISE_PAD
        self.noise = rng.normal(0.0, 10.0, size=(rows + pad, cols + pad)).astype(np.int16)

    def slice(self, z_mm: float, rng: np.random.Generator) -> np.ndarray:
        """Stored values of the slice at ``z_mm`` (``z <= 0``, head first), int16."""
        img = self.base.copy()
        t = (-z_mm % 640.0) / 640.0  # 0 at the apex of the lungs, wraps after 64 cm
        if t < 0.42:
            r = math.sin(math.pi * t / 0.42) ** 0.6
            img[self.lungs < r * r] = -840 + _HU_OFFSET
        if 0.36 < t < 0.72:
            r = math.sin(math.pi * (t - 0.36) / 0.36) ** 0.5
            img[self.liver < r * r] = 62 + _HU_OFFSET
        if 0.60 < t < 0.85:
            r = math.sin(math.pi * (t - 0.60) / 0.25) ** 0.5
            img[self.kidneys < r * r] = 160 + _HU_OFFSET
        img[self.aorta < 1] = 180 + _HU_OFFSET
        dz = (t - 0.50) * 640.0 / (_FOV_MM / 2)  # lesion: a sphere of 2 cm radius in the liver
        r2 = (20.0 / (_FOV_MM / 2)) ** 2 - dz * dz
        if r2 > 0:
            img[self.lesion < r2] = 95 + _HU_OFFSET
        dy, dx = rng.integers(0, self.NOISE_PAD, size=2)
        img += self.noise[dy : dy + self.rows, dx : dx + self.cols]
        return img


@dataclass(frozen=True)
class _CTSeriesSpec:
    series_number: int
    description: str
    kernel: str
    thickness: float


def _write_ct_series(
    out_dir: Path,
    study: _Study,
    spec: _CTSeriesSpec,
    *,
    slices: int,
    rows: int,
    cols: int,
    series_uid: str | None,
    seed: int,
    phantom: _CTPhantom | None = None,
) -> list[Path]:
    if slices < 0:
        raise ValueError("slices must be >= 0")
    if rows < 8 or cols < 8:
        raise ValueError("rows and cols must be >= 8")
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or _uid("ct-series", study.uid, spec.series_number, rows, cols, seed)
    frame_of_reference = _uid("ct-frame-of-reference", study.uid)
    phantom = phantom or _CTPhantom(rows, cols, seed)
    rng = np.random.default_rng([seed, spec.series_number, rows, cols])
    spacing = _FOV_MM / max(rows, cols)
    x0, y0 = -spacing * (cols - 1) / 2, -spacing * (rows - 1) / 2
    series_time = _series_time(study, spec.series_number)
    # One data set per series, only the per-slice elements change (much cheaper than building each).
    ds = Dataset()
    study.apply(ds)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = series_time
    ds.SOPClassUID = CTImageStorage
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.Modality = "CT"
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = "Phantom CT"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(_FOV_MM)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "250"
    ds.Exposure = "125"
    ds.ConvolutionKernel = spec.kernel
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.RescaleIntercept = str(-_HU_OFFSET)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    paths: list[Path] = []
    for i in range(slices):
        z = -spec.thickness * i
        ds.SOPInstanceUID = _uid("ct-instance", series_uid, i + 1)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.add_new(_PIXEL_DATA, "OW", phantom.slice(z, rng).astype("<i2", copy=False).tobytes())
        paths.append(_save(ds, out_dir / f"CT{spec.series_number:03d}_{i + 1:05d}.dcm"))
    return paths


def ct_series(
    out_dir: Path,
    *,
    slices: int,
    rows: int = 512,
    cols: int = 512,
    patient_id: str = "BENCH001",
    patient_name: str = "BENCH^CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    seed: int = 0,
) -> list[Path]:
    """Write a synthetic axial CT series (CT Image Storage, Explicit VR LE, int16) into ``out_dir``.

    Files are named ``CT<series number>_<instance number>.dcm``; the paths are returned by instance number.
    Slices are 1 mm apart, head first from z = 0 down. UIDs and content are deterministic functions of the
    arguments (``slices`` only decides how many are written), so reruns give identical files; change
    ``seed`` (or the patient) for different UIDs. Given ``study_uid``, the study-level attributes
    (date, accession number...) are derived from it, so that several series of one study agree.
    """
    study_uid = study_uid or _uid("ct-study", seed, patient_id, patient_name)
    study = _Study.make(study_uid, patient_id, patient_name, "CT THORAX ABDOMEN (synthetic)")
    spec = _CTSeriesSpec(series_number, "AX 1.0 STANDARD", "STANDARD", 1.0)
    return _write_ct_series(
        Path(out_dir), study, spec, slices=slices, rows=rows, cols=cols, series_uid=series_uid, seed=seed
    )


def multi_series_study(
    out_dir: Path, *, series: int = 4, per_series: int = 25, seed: int = 0, rows: int = 256, cols: int = 256
) -> list[Path]:
    """Write one CT study of ``series`` series of ``per_series`` slices (different kernels/thicknesses).

    Patient ``MULTI<seed>``; files ``CT<series>_<instance>.dcm``, returned by series then instance number.
    """
    if series < 1:
        raise ValueError("series must be >= 1")
    patient_id, patient_name = f"MULTI{seed:03d}", f"MULTI^STUDY^{seed}"
    study = _Study.make(
        _uid("multi-series-study", seed, patient_id), patient_id, patient_name, "CT CHEST (synthetic)"
    )
    kinds = [
        ("AX 5.0 STANDARD", "STANDARD", 5.0),
        ("AX 1.25 BONE", "BONE", 1.25),
        ("AX 2.5 LUNG", "LUNG", 2.5),
        ("AX 3.0 SOFT", "SOFT", 3.0),
    ]
    phantom = _CTPhantom(rows, cols, seed)
    paths: list[Path] = []
    for s in range(series):
        desc, kernel, thickness = kinds[s % len(kinds)]
        spec = _CTSeriesSpec(s + 1, desc, kernel, thickness)
        paths += _write_ct_series(
            Path(out_dir),
            study,
            spec,
            slices=per_series,
            rows=rows,
            cols=cols,
            series_uid=None,
            seed=seed,
            phantom=phantom,
        )
    return paths


# ---------------------------------------------------------------------------------------------------------
# Many small instances
# ---------------------------------------------------------------------------------------------------------


def _small_pattern(rows: int, cols: int, maximum: int, phase: int) -> np.ndarray:
    y, x = np.ogrid[0:rows, 0:cols]
    disc = ((y - rows / 2) ** 2 + (x - cols / 2) ** 2) < (min(rows, cols) / 3) ** 2
    img = (x * (maximum // 2) // max(cols - 1, 1) + y * (maximum // 4) // max(rows - 1, 1)) + disc * (
        maximum // 4
    )
    return np.roll(np.asarray(img), phase, axis=0)


def small_instances(
    out_dir: Path,
    *,
    count: int,
    per_series: int = 100,
    studies: int | None = None,
    seed: int = 0,
    rows: int = 64,
    cols: int = 64,
) -> list[Path]:
    """Write ``count`` small images over several patients, studies and series, for throughput tests.

    Series hold ``per_series`` instances (the last one fewer); ``studies`` defaults to one per two series,
    patients to one per two studies. Each study has one modality, in turn: Secondary Capture (8 bit),
    MR (16 bit) and CR (16 bit), all ``rows`` x ``cols``. Files are ``SM<index>.dcm``; paths are returned
    in index order (patient, study, series, instance). UIDs depend on every argument.
    """
    if count < 0 or per_series < 1:
        raise ValueError("count must be >= 0 and per_series >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_series = max(1, math.ceil(count / per_series))
    n_studies = max(1, min(n_series, studies if studies is not None else math.ceil(n_series / 2)))
    n_patients = max(1, math.ceil(n_studies / 2))
    key = ("small", seed, count, per_series, n_studies, rows, cols)
    patterns = {
        "OT": _small_pattern(rows, cols, 255, 0).astype(np.uint8),
        "MR": _small_pattern(rows, cols, 4095, 0).astype("<u2"),
        "CR": _small_pattern(rows, cols, 4095, rows // 3).astype("<u2"),
    }
    modalities = ("OT", "MR", "CR")
    studies_made: dict[int, _Study] = {}
    paths: list[Path] = []
    for j in range(n_series):
        s = j * n_studies // n_series  # contiguous blocks of series per study
        p = s * n_patients // n_studies
        if s not in studies_made:
            studies_made[s] = _Study.make(
                _uid(*key, "study", s),
                f"SMALL{seed}-{p + 1:05d}",
                f"SMALL^PATIENT{p + 1}^{seed}",
                f"SMALL STUDY {s + 1}",
            )
        study = studies_made[s]
        modality = modalities[s % len(modalities)]
        series_number = j + 1
        series_uid = _uid(*key, "series", j)
        series_time = _series_time(study, series_number)
        # one data set per series, only the per-instance elements change
        ds = Dataset()
        study.apply(ds)
        ds.InstanceCreationDate = ds.SeriesDate = ds.ContentDate = study.date
        ds.InstanceCreationTime = ds.SeriesTime = ds.ContentTime = series_time
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = f"{modality} SERIES {series_number}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelRepresentation = 0
        if modality == "OT":
            ds.SOPClassUID = SecondaryCaptureImageStorage
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.ConversionType = "WSD"
            ds.PatientOrientation = ""
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
            ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        if modality == "MR":
            ds.SOPClassUID = MRImageStorage
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", 1
            ds.MagneticFieldStrength = "1.5"
            ds.SliceThickness = "5"
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.FrameOfReferenceUID = _uid(series_uid, "frame-of-reference")
            ds.PositionReferenceIndicator = ""
            ds.PixelSpacing = [_ds(240 / rows), _ds(240 / cols)]
        elif modality == "CR":
            ds.SOPClassUID = ComputedRadiographyImageStorage
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = "PA"
            ds.PatientOrientation = ["L", "F"]
            ds.ImagerPixelSpacing = ["0.5", "0.5"]
        pixel_vr = "OB" if modality == "OT" else "OW"
        for k in range(min(per_series, count - j * per_series)):
            ds.SOPInstanceUID = _uid(series_uid, "instance", k)
            ds.InstanceNumber = k + 1
            if modality == "MR":
                ds.ImagePositionPatient = ["-120", "-120", _ds(-5.0 * k)]
                ds.SliceLocation = _ds(-5.0 * k)
            ds.add_new(_PIXEL_DATA, pixel_vr, np.roll(patterns[modality], k, axis=1).tobytes())
            paths.append(_save(ds, out_dir / f"SM{len(paths):07d}.dcm"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Specific Character Set
# ---------------------------------------------------------------------------------------------------------

_SPECIFIC_CHARACTER_SET = 0x00080005
_PATIENT_NAME = 0x00100010


class CharsetInstance(NamedTuple):
    """A storable instance whose PatientName is in a given character set."""

    path: Path
    specific_character_set: str  # raw value, e.g. "ISO_IR 100" or "\\ISO 2022 IR 87"
    patient_name: str  # as decoded by pydicom


def _raw_top_level_elements(path: Path) -> dict[int, RawDataElement]:
    """The undecoded top-level elements of a (non-deflated) Part 10 file, exactly as stored."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: not a DICOM Part 10 file")
    group, element, vr = struct.unpack_from("<HH2s", data, 132)
    if (group, element, vr) != (2, 0, b"UL"):
        raise ValueError(f"{path}: file meta does not start with its group length")
    start = 144 + struct.unpack_from("<I", data, 140)[0]
    ts = read_file_meta_info(path).TransferSyntaxUID
    if ts.is_deflated:
        raise ValueError(f"{path}: deflated")
    fp = io.BytesIO(data)
    fp.seek(start)
    elements: dict[int, RawDataElement] = {}
    for elem in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian):
        if isinstance(elem, RawDataElement):
            elements[int(elem.tag)] = elem
    return elements


@functools.cache
def _charset_sources() -> tuple[Path, ...]:
    found = []
    with quiet_pydicom():
        for name in sorted(pydicom.data.get_charset_files("*.dcm")):
            path = Path(name)
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
            if ds.get("SpecificCharacterSet") and ds.get("PatientName"):
                found.append(path)
    return tuple(found)


def charset_samples() -> list[Path]:
    """pydicom's character set test files that have a SpecificCharacterSet and a PatientName.

    They are not all storable (see :func:`charset_instances` for instances built from them). Covered:
    ISO_IR 100/126/127/138/144/192, GB18030 and ISO 2022 IR 13/87/149 (Japanese, Korean).
    """
    return list(_charset_sources())


def charset_instances(out_dir: Path, *, seed: int = 0) -> list[CharsetInstance]:
    """One small storable Secondary Capture instance per :func:`charset_samples` file, in ``out_dir``.

    SpecificCharacterSet and PatientName are copied byte for byte from the sample (raw elements, never
    re-encoded). Each instance has its own patient (``CHARSET-<sample name>``), study and UIDs; files are
    ``<sample name>.dcm``. Returns (path, SpecificCharacterSet as stored, PatientName as decoded).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: list[CharsetInstance] = []
    for source in _charset_sources():
        raw = _raw_top_level_elements(source)
        charset_raw, name_raw = raw[_SPECIFIC_CHARACTER_SET], raw[_PATIENT_NAME]
        charset_bytes, name_bytes = bytes(charset_raw.value or b""), bytes(name_raw.value or b"")
        with quiet_pydicom():
            decoded = str(pydicom.dcmread(source).PatientName)
        patient_id = f"CHARSET-{source.stem}"
        study_uid = _uid("charset-study", seed, source.name)
        series_uid = _uid("charset-series", study_uid)
        study = _Study.make(study_uid, patient_id, "", "CHARSET TEST (synthetic)")
        ds = Dataset()
        study.apply(ds)
        del ds.PatientName
        ds[_SPECIFIC_CHARACTER_SET] = RawDataElement(
            Tag(_SPECIFIC_CHARACTER_SET), "CS", len(charset_bytes), charset_bytes, 0, False, True
        )
        ds[_PATIENT_NAME] = RawDataElement(
            Tag(_PATIENT_NAME), "PN", len(name_bytes), name_bytes, 0, False, True
        )
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = _uid("charset-instance", series_uid)
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SeriesDate = ds.ContentDate = study.date
        ds.SeriesTime = ds.ContentTime = study.time
        ds.PatientOrientation = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.add_new(_PIXEL_DATA, "OB", _small_pattern(16, 16, 255, 0).astype(np.uint8).tobytes())
        # Declare the data set "read" in the encoding it will be written in, so that pydicom writes the
        # raw elements as they are instead of decoding and re-encoding them.
        ds.set_original_encoding(False, True, ds._character_set)
        path = _save(ds, out_dir / f"{source.stem}.dcm")
        written = _raw_top_level_elements(path)
        if (
            written[_SPECIFIC_CHARACTER_SET].value != charset_bytes
            or written[_PATIENT_NAME].value != name_bytes
        ):
            raise RuntimeError(f"{path}: character set or patient name not copied byte for byte")
        charset = charset_bytes.decode("ascii").rstrip(" \0")
        result.append(CharsetInstance(path, charset, decoded))
    return result


# ---------------------------------------------------------------------------------------------------------
# The patient's INS (ANS test identities only)
# ---------------------------------------------------------------------------------------------------------

#: The OID of the ANS test INS (the INS test kit's identities; simral accepts it only with
#: ``SIMRAL_INS_TEST_OIDS_ALLOWED``): the only INS authority these files ever carry.
ANS_TEST_INS_OID = "1.2.250.1.213.1.4.10"


def set_test_ins(ds: Dataset, nir: str) -> None:
    """Give ``ds`` the ANS test INS ``nir`` (a test NIR: 15 digits, its key checked) the way a
    French modality worklist fills it (DESIGN.md §6): Other Patient IDs Sequence replaced by one
    item, IssuerOfPatientID ``ASIP-SANTE-INS-NIR``, the ANS test OID as ISO Universal Entity ID."""
    if not re.fullmatch(r"[12][0-9]{14}", nir) or 97 - int(nir[:13]) % 97 != int(nir[13:]):
        raise ValueError(f"not a NIR with a valid key: {nir!r}")
    qualifier = Dataset()
    qualifier.UniversalEntityID = ANS_TEST_INS_OID
    qualifier.UniversalEntityIDType = "ISO"
    item = Dataset()
    item.PatientID = nir
    item.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
    item.IssuerOfPatientIDQualifiersSequence = [qualifier]
    item.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [item]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


def _one_ct(out_dir: Path, name: str, seed: int, **changes: Any) -> tuple[Dataset, Path]:
    """A 64x64 CT instance of its own patient/study, with ``changes`` (None deletes) applied."""
    study = _Study.make(_uid("bad-study", seed, name), f"BAD-{name}", f"BAD^{name.upper()}", "BAD INPUT")
    tmp = out_dir / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    spec = _CTSeriesSpec(1, "BAD INPUT", "STANDARD", 1.0)
    (src,) = _write_ct_series(tmp, study, spec, slices=1, rows=64, cols=64, series_uid=None, seed=seed)
    ds = pydicom.dcmread(src)
    src.unlink()
    tmp.rmdir()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds, out_dir / f"{name}.dcm"


def bad_inputs(out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write broken files for negative tests; returns {kind: path}.

    * ``truncated`` -- a valid CT file cut in the middle of its pixel data;
    * ``no_meta`` -- a valid data set written bare: no preamble, no 'DICM', no file meta, implicit VR LE;
    * ``missing_study_uid`` -- a valid Part 10 file without StudyInstanceUID;
    * ``missing_sop_uid`` -- a Part 10 file whose data set has no SOPInstanceUID (the file meta has one);
    * ``absurd_length`` -- a CT file whose ReasonForVisit (0032,1066) UT element claims 0xFFFFFFF0 bytes;
    * ``garbage`` -- 4 KiB of random bytes.

    Mind that ``pydicom.dcmread`` accepts ``truncated`` (only ``pixel_array`` fails) and ``absurd_length``
    (the value silently swallows the rest of the file, Pixel Data included); dcmtk rejects both. It refuses
    ``no_meta`` (unless ``force=True``) and ``garbage``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}

    ds, path = _one_ct(out_dir, "truncated", seed)
    _save(ds, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(ds.PixelData) // 2])
    result["truncated"] = path

    ds, path = _one_ct(out_dir, "no_meta", seed)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    result["no_meta"] = path

    ds, path = _one_ct(out_dir, "missing_study_uid", seed, StudyInstanceUID=None)
    result["missing_study_uid"] = _save(ds, path)

    ds, path = _one_ct(out_dir, "missing_sop_uid", seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    del ds.SOPInstanceUID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    result["missing_sop_uid"] = path

    ds, path = _one_ct(out_dir, "absurd_length", seed, ReasonForVisit="SYNTHETIC")
    _save(ds, path)
    patched = bytearray(path.read_bytes())
    header = struct.pack("<HH2sH", 0x0032, 0x1066, b"UT", 0)
    at = patched.find(header)
    if at < 0 or at > len(patched) - len(ds.PixelData):
        raise RuntimeError("ReasonForVisit element not found in the header")
    struct.pack_into("<I", patched, at + len(header), 0xFFFFFFF0)
    path.write_bytes(bytes(patched))
    result["absurd_length"] = path

    rng = np.random.default_rng([seed, 0xBAD])
    garbage = bytearray(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    garbage[128:132] = b"XXXX"  # never a 'DICM' prefix by chance
    path = out_dir / "garbage.dcm"
    path.write_bytes(bytes(garbage))
    result["garbage"] = path
    return result


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _timed(label: str, paths: Sequence[Path], started: float) -> None:
    elapsed = time.perf_counter() - started
    size = sum(p.stat().st_size for p in paths)
    print(f"{label}: {len(paths)} files, {size / 1e6:.1f} MB in {elapsed:.2f} s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corpus.py", description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ct", help="synthetic CT series")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--patient-id", default="BENCH001")
    p.add_argument("--series-number", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("small", help="many small instances")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--per-series", type=int, default=100)
    p.add_argument("--studies", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("study", help="one multi-series CT study")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--series", type=int, default=4)
    p.add_argument("--per-series", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("charset", help="Specific Character Set instances")
    p.add_argument("out_dir", type=Path)
    p = sub.add_parser("bad", help="broken files for negative tests")
    p.add_argument("out_dir", type=Path)
    sub.add_parser("list", help="storable files of the pydicom test corpus")
    sub.add_parser("describe", help="excluded files of the pydicom test corpus, and why")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.command == "ct":
        paths = ct_series(
            args.out_dir,
            slices=args.slices,
            rows=args.rows,
            cols=args.cols,
            patient_id=args.patient_id,
            series_number=args.series_number,
            seed=args.seed,
        )
        _timed("ct", paths, started)
    elif args.command == "small":
        paths = small_instances(
            args.out_dir, count=args.count, per_series=args.per_series, studies=args.studies, seed=args.seed
        )
        _timed("small", paths, started)
    elif args.command == "study":
        paths = multi_series_study(
            args.out_dir, series=args.series, per_series=args.per_series, seed=args.seed
        )
        _timed("study", paths, started)
    elif args.command == "charset":
        for item in charset_instances(args.out_dir):
            print(f"{item.path}\t{item.specific_character_set}\t{item.patient_name}")
    elif args.command == "bad":
        for kind, path in bad_inputs(args.out_dir).items():
            print(f"{kind}\t{path}")
    elif args.command == "list":
        storable, excluded = corpus_report()
        for f in storable:
            print(f"{_short(f.path)}\t{f.transfer_syntax.name}\t{f.sop_class_uid.name}")
        print(f"{len(storable)} storable files ({len(excluded)} excluded: see 'describe')", file=sys.stderr)
    elif args.command == "describe":
        describe_test_files()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def data_file(name: str) -> Path:
    """A file shipped with pydicom / pydicom-data, by name."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    return Path(str(path))


def part10(dataset: Dataset) -> io.BytesIO:
    """``dataset`` written as a Part 10 file in memory."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer
