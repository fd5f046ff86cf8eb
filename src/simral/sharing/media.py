"""Media export: studies as a ZIP laid out for IHE PDI (ITI TF-1 §15, PS3.10 / PS3.11 file-set).

The ZIP holds a DICOM File-set: ``DICOMDIR`` at the root (Basic Directory IOD, PS3.3 F.2, built
with pydicom's :class:`~pydicom.fileset.FileSet`) and the instances under PS3.10 file IDs
(``PT000000/ST000000/SE000000/IM000000``: upper-case, at most 8 characters per component), plus
``README.TXT`` naming the content and the exporting platform. Instances are exported with their
stored data sets; only what the principal may see goes in (access policy), and the export is
audited (PS3.15 A.5.3.6 "Export"). The archive is built in a scratch folder on disk, never in
memory, one instance at a time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.fileset import FileSet

from simral import __version__
from simral.access.policy import Principal
from simral.archive import service as archive
from simral.audit import service as audit
from simral.context import AppContext

log = logging.getLogger(__name__)

FILE_SET_ID = "SIMRAL"


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


def _readme(result: ExportResult, patient_ids: set[str]) -> str:
    lines = [
        "DICOM media exported by simral (regional tele-imaging platform), IHE PDI layout.",
        "",
        "DICOMDIR           DICOM directory of this file-set (PS3.10); open it with any DICOM viewer.",
        "PT*/ST*/SE*/IM*    the images (DICOM Part 10 files).",
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


def export_pdi(
    ctx: AppContext, principal: Principal, study_uids: list[str], destination: Path
) -> ExportResult:
    """Write the visible instances of ``study_uids`` as a PDI ZIP at ``destination`` (audited)."""
    result = ExportResult(destination)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=ctx.store.scratch_dir()))
    try:
        file_set = FileSet()
        file_set.ID = FILE_SET_ID
        patient_ids: set[str] = set()
        per_study: dict[str, int] = {}
        for study_uid in dict.fromkeys(study_uids):
            with ctx.db.reading() as session:
                instances = archive.find_instances(session, principal=principal, study_uid=study_uid)
            for instance in instances:
                with archive.local_copy(ctx, instance.blob_key) as path:
                    try:
                        added = file_set.add(path)
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
        (media / "README.TXT").write_text(_readme(result, patient_ids), encoding="ascii", errors="replace")
        partial = destination.with_name(destination.name + ".partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive_zip:
            archive_zip.write(media / "DICOMDIR", "DICOMDIR")
            archive_zip.write(media / "README.TXT", "README.TXT")
            for path in sorted(media.rglob("*")):
                relative = path.relative_to(media).as_posix()
                if path.is_file() and relative not in ("DICOMDIR", "README.TXT"):
                    archive_zip.write(path, relative)
        partial.replace(destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for study_uid, count in per_study.items():
        audit.record_now(
            ctx,
            action="study.export",
            principal=principal,
            study_uid=study_uid,
            detail={"format": "IHE PDI ZIP", "instances": count, "skipped": len(result.skipped)},
        )
    return result
