"""The signed report as a PDF (fpdf2) and as a DICOM Encapsulated PDF instance of its study
(PS3.3 A.45.1 Encapsulated PDF IOD: Patient, General Study, Encapsulated Document Series, General
Equipment, SC Equipment, Encapsulated Document and SOP Common modules).

The PDF uses DejaVu Sans (Debian ``fonts-dejavu-core``) when it is installed so that any French
text prints; otherwise fpdf2's core Helvetica with the text reduced to Latin-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from fpdf import FPDF
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

#: Encapsulated PDF Storage (PS3.4 B.5).
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: Where Debian puts DejaVu Sans (fonts-dejavu-core).
FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
)
BOLD_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf"),
)
#: Typographic characters outside Latin-1 and their plain replacements (core-font fallback).
_LATIN1_REPLACEMENTS = str.maketrans(
    {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "-", "œ": "oe", "Œ": "OE", "…": "..."}
)


@dataclass
class ReportPdf:
    """What the PDF shows."""

    title: str
    organisation: str
    patient_line: str
    exam_line: str
    author_line: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    footer: str = ""


def _font(pdf: FPDF) -> tuple[str, bool]:
    regular = next((p for p in FONT_CANDIDATES if p.is_file()), None)
    bold = next((p for p in BOLD_CANDIDATES if p.is_file()), None)
    if regular is None:
        return "Helvetica", False
    pdf.add_font("DejaVu", "", str(regular))
    pdf.add_font("DejaVu", "B", str(bold or regular))
    return "DejaVu", True


def render_pdf(report: ReportPdf, *, created: datetime | None = None) -> bytes:
    """The report as PDF bytes (A4, one column)."""
    pdf = FPDF(format="A4")
    pdf.set_creation_date(created or datetime.now(UTC))
    pdf.set_title(report.title)
    pdf.set_author(report.author_line)
    pdf.set_creator("simral")
    pdf.set_lang("fr-FR")
    family, unicode_font = _font(pdf)

    def text(value: str) -> str:
        return (
            value
            if unicode_font
            else value.translate(_LATIN1_REPLACEMENTS).encode("latin-1", "replace").decode("latin-1")
        )

    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.add_page()
    pdf.set_font(family, "B", 11)
    pdf.multi_cell(0, 6, text(report.organisation), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(family, "B", 15)
    pdf.ln(2)
    pdf.multi_cell(0, 8, text(report.title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(family, "", 10)
    pdf.ln(1)
    for line in (report.patient_line, report.exam_line):
        pdf.multi_cell(0, 5, text(line), new_x="LMARGIN", new_y="NEXT")
    for heading, body in report.sections:
        if not body.strip():
            continue
        pdf.ln(3)
        pdf.set_font(family, "B", 12)
        pdf.multi_cell(0, 7, text(heading), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(family, "", 10.5)
        pdf.multi_cell(0, 5.5, text(body.strip()), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(5)
    pdf.set_font(family, "", 10)
    pdf.multi_cell(0, 5, text(report.author_line), new_x="LMARGIN", new_y="NEXT")
    if report.footer:
        pdf.set_font(family, "", 8)
        pdf.multi_cell(0, 4, text(report.footer), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


@dataclass(frozen=True)
class EncapsulatedPdfIdentity:
    """The UIDs and descriptive values of the Encapsulated PDF instance."""

    sop_instance_uid: str
    series_instance_uid: str
    document_title: str
    created: datetime
    series_number: int = 9000
    instance_number: int = 1
    manufacturer: str = "simral"


def encapsulated_pdf(pdf: bytes, study: Dataset, identity: EncapsulatedPdfIdentity) -> Dataset:
    """A Part 10 dataset of the Encapsulated PDF IOD (PS3.3 A.45.1) in the study described by
    ``study`` (its Patient and General Study module attributes are copied as stored)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(identity.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SIMRAL"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient module (C.7.1.1) and General Study module (C.7.2.1), as the study holds them.
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "OtherPatientIDsSequence",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyDescription",
    ):
        # An empty optional sequence (a modality copying a zero-length worklist return key) is left
        # out: these modules' sequences hold one or more items when present.
        if keyword in study and not (study[keyword].VR == "SQ" and not study[keyword].value):
            ds[keyword] = study[keyword]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
    ):
        if keyword not in ds:
            setattr(ds, keyword, "")
    when = identity.created.astimezone(UTC)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    # Encapsulated Document Series (C.24.1).
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = identity.series_number
    ds.SeriesDescription = "Compte rendu"
    ds.SeriesDate, ds.SeriesTime = date, time
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1).
    ds.Manufacturer = identity.manufacturer
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2).
    ds.InstanceNumber = identity.instance_number
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = identity.document_title[:64]
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic imaging study"
    ds.ConceptNameCodeSequence = [concept]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    # SOP Common (C.12.1).
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = identity.sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset as a Part 10 file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pdf_of_instance(ds: Dataset) -> bytes:
    """The PDF encapsulated in an Encapsulated PDF instance, without its padding byte."""
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength") or 0)
    return data[:length] if 0 < length <= len(data) else data.rstrip(b"\0")
