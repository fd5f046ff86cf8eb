"""Media export: studies as a ZIP laid out for IHE PDI (ITI TF-1 §15, PS3.10 / PS3.11 file-set).

The ZIP holds a DICOM File-set: ``DICOMDIR`` at the root (Basic Directory IOD, PS3.3 F.2, built
with pydicom's :class:`~pydicom.fileset.FileSet`) and the instances under PS3.10 file IDs
(``PT000000/ST000000/SE000000/IM000000``: upper-case, at most 8 characters per component), plus
``README.TXT`` naming the content and the exporting platform, and the studies' reports (DICOM
Encapsulated PDF instances) once more as plain PDF files under ``REPORTS/`` for the patient.
Instances are exported with their stored data sets; only what the principal may see goes in
(access policy), and the export is audited (PS3.15 A.5.3.6 "Export"). The archive is built in a
scratch folder on disk, never in memory, one instance at a time.

A de-identified export (teaching, research) passes each instance through a
:class:`~simral.sharing.deidentify.Deidentifier` (PS3.15 Annex E) on its way into the file-set;
its pseudonym map is stored as a :class:`~simral.sharing.models.DeidentifiedExport` row, in the
same transaction as the audit records, and read back only by its author or an administrator.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pycdlib
from pydicom import dcmread
from pydicom.fileset import FileSet
from sqlalchemy.orm import Session

from simral import __version__
from simral.access.policy import AccessDenied, Principal, may_manage
from simral.archive import service as archive
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.reading.pdf import pdf_of_instance
from simral.sharing.deidentify import Deidentifier
from simral.sharing.models import DeidentifiedExport

log = logging.getLogger(__name__)

FILE_SET_ID = "SIMRAL"
#: Non-DICOM content beside the file-set (IHE PDI allows it outside the DICOM folders).
REPORTS_FOLDER = "REPORTS"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


class ExportError(ValueError):
    """Nothing to export (no such study, or none visible to the principal)."""


@dataclass
class ExportResult:
    """What went into the archive."""

    path: Path
    instances: int = 0
    studies: list[str] = field(default_factory=list)
    #: (SOP Instance UID, reason) of instances that could not be described in a DICOMDIR.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: The stored pseudonym map of a de-identified export (its ``deidentified_export`` id).
    deidentified_export: int | None = None
    #: Reports (Encapsulated PDF instances) also written as PDF files under ``REPORTS/``.
    reports: int = 0


def _report_pdf(path: Path, scratch: Path, number: int) -> Path:
    """The PDF of an Encapsulated PDF instance (PS3.3 A.45.1), as a file the patient can open."""
    folder = scratch / "reports"
    folder.mkdir(exist_ok=True)
    target = folder / f"CR{number:04d}.PDF"
    target.write_bytes(pdf_of_instance(dcmread(path)))
    return target


def _readme(result: ExportResult, patient_ids: set[str], deidentifier: Deidentifier | None = None) -> str:
    if deidentifier is not None:
        return _deidentified_readme(result, patient_ids, deidentifier)
    lines = [
        "DICOM media exported by simral (regional tele-imaging platform), IHE PDI layout.",
        "",
        "DICOMDIR           DICOM directory of this file-set (PS3.10); open it with any DICOM viewer.",
        "PT*/ST*/SE*/IM*    the images (DICOM Part 10 files).",
        *([f"{REPORTS_FOLDER}/           the reports (PDF)."] if result.reports else []),
        "",
        f"Studies: {len(result.studies)}    Images: {result.instances}    Patients: {len(patient_ids)}",
        f"Exporting software: simral {__version__}",
        "",
        "These files contain personal health data: keep them confidential.",
    ]
    if result.skipped:
        lines += ["", "Not included (no DICOMDIR record for their kind):"]
        lines += [f"  {uid}: {reason}" for uid, reason in result.skipped]
    return "\r\n".join(lines) + "\r\n"


def _deidentified_readme(result: ExportResult, patient_ids: set[str], deidentifier: Deidentifier) -> str:
    options = ", ".join(deidentifier.options.chosen()) or "none"
    lines = [
        "De-identified DICOM media exported by simral (regional tele-imaging platform), IHE PDI layout.",
        "",
        "De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.",
        f"Options: {options}",
        "Patients are named by pseudonyms; UIDs are replaced consistently within this export.",
        "Pixel data are unchanged: images with burned-in annotation are not included.",
        "",
        "DICOMDIR           DICOM directory of this file-set (PS3.10).",
        "PT*/ST*/SE*/IM*    the images (DICOM Part 10 files).",
        "",
        f"Studies: {len(result.studies)}    Images: {result.instances}    Patients: {len(patient_ids)}",
        f"Exporting software: simral {__version__}",
    ]
    if result.skipped:
        lines += ["", f"Not included: {len(result.skipped)} instance(s)."]
    return "\r\n".join(lines) + "\r\n"


def _write_iso(destination: Path, entries: list[tuple[Path, str]]) -> None:
    """An ISO 9660 Level 1 image of the file-set (PS3.12 Annex F: 120 mm CD-R media, the file IDs
    already PS3.10-conformant: upper case, 8 characters, no extension except README.TXT and the
    report PDFs), built with pycdlib; files are streamed from disk when the image is written."""
    image = pycdlib.PyCdlib()
    image.new(interchange_level=1, vol_ident=FILE_SET_ID)
    folders: set[str] = set()
    handles = []
    try:
        for path, name in entries:
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/" + "/".join(parts[:depth])
                if folder not in folders:
                    image.add_directory(folder)
                    folders.add(folder)
            leaf = parts[-1] if "." in parts[-1] else parts[-1] + "."
            handle = path.open("rb")
            handles.append(handle)
            image.add_fp(handle, path.stat().st_size, "/" + "/".join([*parts[:-1], leaf]) + ";1")
        image.write(str(destination))
    finally:
        image.close()
        for handle in handles:
            handle.close()


def export_pdi(
    ctx: AppContext,
    principal: Principal,
    study_uids: list[str],
    destination: Path,
    *,
    deidentifier: Deidentifier | None = None,
    image: Literal["zip", "iso"] = "zip",
) -> ExportResult:
    """Write the visible instances of ``study_uids`` as a PDI ZIP (or a CD image, ``image="iso"``)
    at ``destination`` (audited); with ``deidentifier``, each instance de-identified and the
    pseudonym map stored."""
    result = ExportResult(destination)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=ctx.store.scratch_dir()))
    try:
        file_set = FileSet()
        file_set.ID = FILE_SET_ID
        patient_ids: set[str] = set()
        per_study: dict[str, int] = {}
        #: The reports stored in the studies (Encapsulated PDF), also given as plain PDF files.
        reports: list[Path] = []
        for study_uid in dict.fromkeys(study_uids):
            with ctx.db.reading() as session:
                instances = archive.find_instances(session, principal=principal, study_uid=study_uid)
            for instance in instances:
                with archive.local_copy(ctx, instance.blob_key) as path:
                    try:
                        if deidentifier is None:
                            added = file_set.add(path)
                            if instance.sop_class_uid == ENCAPSULATED_PDF:
                                reports.append(_report_pdf(path, scratch, len(reports) + 1))
                        else:
                            dataset = dcmread(path)
                            refused = deidentifier.refuses(dataset)
                            if refused:
                                result.skipped.append((instance.sop_uid, refused))
                                continue
                            added = file_set.add(deidentifier.apply(dataset))
                    except (ValueError, KeyError, AttributeError) as exc:
                        result.skipped.append((instance.sop_uid, str(exc)[:200]))
                        continue
                patient_ids.add(str(getattr(added, "PatientID", "")))
                per_study[study_uid] = per_study.get(study_uid, 0) + 1
                result.instances += 1
        if not result.instances:
            raise ExportError("no visible instance to export")
        result.studies = list(per_study)
        media = scratch / "media"
        media.mkdir()
        file_set.write(media)
        result.reports = len(reports)
        readme = _readme(result, patient_ids, deidentifier)
        (media / "README.TXT").write_text(readme, encoding="ascii", errors="replace")
        entries = [(media / "DICOMDIR", "DICOMDIR"), (media / "README.TXT", "README.TXT")]
        for path in sorted(media.rglob("*")):
            relative = path.relative_to(media).as_posix()
            if path.is_file() and relative not in ("DICOMDIR", "README.TXT"):
                entries.append((path, relative))
        entries += [(report, f"{REPORTS_FOLDER}/{report.name}") for report in reports]
        partial = destination.with_name(destination.name + ".partial")
        if image == "iso":
            _write_iso(partial, entries)
        else:
            with zipfile.ZipFile(
                partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True
            ) as archive_zip:
                for path, name in entries:
                    archive_zip.write(path, name)
        partial.replace(destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if deidentifier is not None:
        result.deidentified_export = _record_deidentified(ctx, principal, result, per_study, deidentifier)
        return result
    for study_uid, count in per_study.items():
        audit.record_now(
            ctx,
            action="study.export",
            principal=principal,
            study_uid=study_uid,
            detail={"format": "IHE PDI ZIP", "instances": count, "skipped": len(result.skipped)},
        )
    return result


def _record_deidentified(
    ctx: AppContext,
    principal: Principal,
    result: ExportResult,
    per_study: dict[str, int],
    deidentifier: Deidentifier,
) -> int:
    """Store the pseudonym map and audit the export, in one transaction; the row's id."""
    options = deidentifier.options.chosen()
    with ctx.db.unit_of_work() as session:
        row = DeidentifiedExport(
            created_by=principal.audit_name,
            created_by_organisation=principal.organisation,
            created_at=utcnow(),
            options=options,
            study_uids=" ".join(per_study),
            instances=result.instances,
            pseudonym_map=deidentifier.pseudonym_map(),
        )
        session.add(row)
        session.flush()
        for study_uid, count in per_study.items():
            audit.record(
                session,
                action="study.export-deidentified",
                principal=principal,
                study_uid=study_uid,
                detail={
                    "format": "IHE PDI ZIP, PS3.15 Annex E de-identified",
                    "options": options,
                    "instances": count,
                    "skipped": len(result.skipped),
                    "deidentified_export": row.id,
                },
            )
        return row.id


def get_deidentified_export(session: Session, *, principal: Principal, export_id: int) -> DeidentifiedExport:
    """A de-identified export with its pseudonym map, for its author or an administrator of the
    author's organisation (audited: reading the map re-identifies the export)."""
    row = session.get(DeidentifiedExport, export_id)
    if row is None:
        raise ExportError("no such de-identified export")
    if row.created_by != principal.audit_name and not may_manage(
        principal, row.created_by_organisation or None
    ):
        raise AccessDenied("only the exporter or an administrator reads a pseudonym map")
    for study_uid in row.study_uids.split():
        audit.record(
            session,
            action="deidentified-export.read",
            principal=principal,
            study_uid=study_uid,
            detail={"deidentified_export": row.id},
        )
    return row


def deidentified_export_document(row: DeidentifiedExport) -> dict[str, Any]:
    """The JSON shape of a de-identified export, its pseudonym map included."""
    return {
        "id": row.id,
        "created_by": row.created_by,
        "organisation": row.created_by_organisation,
        "created_at": row.created_at.isoformat(),
        "options": list(row.options),
        "study_uids": row.study_uids.split(),
        "instances": row.instances,
        "pseudonym_map": row.pseudonym_map,
    }
