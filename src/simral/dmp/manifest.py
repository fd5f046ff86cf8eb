"""The imaging manifest of a study for the DMP and DRIM-M (DESIGN.md §8; IHE RAD XDS-I.b).

A DICOM Key Object Selection document (PS3.3 A.35.4, SOP Class 1.2.840.10008.5.1.4.1.1.88.59)
titled (113030, DCM, "Manifest") (PS3.16 CID 7010, template TID 2010), built with highdicom:

- Patient module: Patient ID = the INS, Issuer of Patient ID ``ASIP-SANTE-INS-NIR`` (``-NIA`` for
  an NIA) and Issuer of Patient ID Qualifiers (Universal Entity ID = the INS OID, type ISO), as
  the ANS DRIM-M sample KOS and DESIGN.md §6 ("in the DMP KOS, PatientID = INS") say;
- Key Object Document module (PS3.3 C.17.6.2): Referenced Request Sequence with the accession
  number and its issuer, the placer (and filler) order numbers and the requested procedure;
  Current Requested Procedure Evidence with, per series, a Retrieve URL (0008,1190) pointing at
  simral's WADO-RS series resource (PS3.18 §10.4.1.1.2), which DRIM-M consumers call;
- SR Document Content (TID 2010): one IMAGE item per image instance (COMPOSITE for other objects).

What is listed: every instance of the study, except

- the manifests themselves (title 113030, ours or anyone's) and IHE IOCM rejection notes (KOS
  titled with a CID 7011 code) together with the instances they reject (the rejection rule of
  :mod:`simral.lifecycle.rejection`, applied by every read path): those are withdrawn;
- the Encapsulated PDF of simral's own reports (:data:`simral.reading.publication.PUBLISHER_NAME`).
  The report is published to the DMP as its own document (CR-IMG CDA, classCode 10; DESIGN.md §8)
  and linked to the KOS entry through referenceIdList; XDS-I.b and DRIM-M make the KOS the
  manifest of the images (typeCode IMG-KOS). Listing the PDF would duplicate the report and force
  a new manifest version at each addendum. Documents the site itself stored in the study (a
  scanned request, a modality's dose report) are listed: they are part of the exam it sent.

Each version of a study's manifest has its own deterministic SOP Instance UID (:func:`manifest_uids`)
in one series per study, so a retried job stores the same instance (a duplicate, DESIGN.md §3).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal, visible_studies
from simral.archive import service as archive
from simral.archive.counts import not_rejected
from simral.archive.models import Instance, Series, Study
from simral.context import AppContext
from simral.lifecycle.rejection import document_title, rejection_code
from simral.patients.search import ins_namespace
from simral.reading.pdf import dataset_bytes
from simral.reading.publication import PUBLISHER_NAME as REPORT_PUBLISHER

#: Key Object Selection Document Storage (PS3.4 B.5).
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
#: Who archives the manifests (Instance.source of the stored KOS).
MANIFEST_PUBLISHER = "dmp-manifest"
#: Series Number of the manifest series (beside the report series, 9000).
MANIFEST_SERIES_NUMBER = 9001
#: Title of a manifest (PS3.16 CID 7010).
MANIFEST_TITLE = "113030"

#: The system principal of the manifest job (reads every study; stores for the organisation).
MANIFEST_READER = Principal(kind="system", name=MANIFEST_PUBLISHER, archive_wide=True, via="job")


class ManifestError(ValueError):
    """The manifest cannot be built (unknown study, nothing to list, incomplete identity)."""


@dataclass(frozen=True)
class ManifestPatient:
    """The INS identity the manifest is published under (DESIGN.md §6): only QUAL identities are
    published, which the caller checks. ``birth_date`` is YYYYMMDD; ``sex`` M, F or empty."""

    ins: str
    ins_oid: str
    family_name: str
    given_names: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class ManifestOrder:
    """The request the study fulfils (PS3.3 C.17.6.2.1 Referenced Request Sequence): the accession
    number and its issuer (OID), the placer (and filler) order numbers with their issuers (OIDs),
    the requested procedure (ID, description, code as (value, scheme, meaning))."""

    accession_number: str
    accession_issuer: str
    placer_number: str = ""
    placer_issuer: str = ""
    filler_number: str = ""
    filler_issuer: str = ""
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    requested_procedure_code: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class ManifestInstance:
    """One listed instance; an image (it has rows and columns) gets an IMAGE content item, any
    other object a COMPOSITE one (TID 2010)."""

    sop_class_uid: str
    sop_instance_uid: str
    rows: int | None = None
    columns: int | None = None

    @property
    def is_image(self) -> bool:
        return bool(self.rows and self.columns)


@dataclass(frozen=True)
class ManifestSeries:
    """One listed series and the WADO-RS URL DRIM-M consumers retrieve it from."""

    series_uid: str
    modality: str
    retrieve_url: str
    instances: tuple[ManifestInstance, ...]


@dataclass(frozen=True)
class ManifestContent:
    """Everything :func:`build_manifest` needs, read from the index by :func:`manifest_content`."""

    study_uid: str
    patient: ManifestPatient
    order: ManifestOrder
    series: tuple[ManifestSeries, ...]
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician: str = ""
    institution_name: str = ""
    #: Listed SOP Instance UIDs by series UID (what :func:`manifest_references` gives back).
    references: Mapping[str, frozenset[str]] = field(default_factory=dict)


def series_retrieve_url(base_url: str, study_uid: str, series_uid: str) -> str:
    """simral's WADO-RS series resource (PS3.18 §10.4.1.1.2) under ``base_url``."""
    return f"{base_url.rstrip('/')}/dicom-web/studies/{study_uid}/series/{series_uid}"


def manifest_uids(study_uid: str, version: int) -> tuple[str, str]:
    """SOP Instance UID of the manifest ``version`` of the study and Series Instance UID of the
    study's manifest series, both UUID-derived UIDs under 2.25 (PS3.5 B.2), so that a retried job
    builds the same instance."""
    if version < 1:
        raise ValueError("manifest versions start at 1")
    sop_uid = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"{study_uid}/dmp-manifest/{version}").int)
    series_uid = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"{study_uid}/dmp-manifest-series").int)
    return sop_uid, series_uid


# ------------------------------------------------------------------------------ reading the index


def _listed(session: Session, study: Study) -> dict[str, tuple[str, list[ManifestInstance]]]:
    """Series Instance UID → (modality, instances) of what a manifest of ``study`` lists: every
    instance not rejected, except manifests, IOCM rejection notes and simral's own report PDF."""
    rows = session.execute(
        select(
            Series.series_uid,
            Series.modality,
            Instance.sop_uid,
            Instance.sop_class_uid,
            Instance.rows,
            Instance.columns,
            Instance.source,
            Instance.id,
        )
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk == study.id, not_rejected())
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ).all()
    _, manifest_series = manifest_uids(study.study_uid, 1)
    kos_ids = [row.id for row in rows if row.sop_class_uid == KOS_SOP_CLASS]
    withdrawn: set[str] = set()
    if kos_ids:
        notes = select(Instance.sop_uid, Instance.meta).where(Instance.id.in_(kos_ids))
        for sop_uid, meta in session.execute(notes):
            value, scheme = document_title(meta or {})
            # Manifests, and IHE IOCM rejection notes (what they reject is already left out by
            # the lifecycle's ``not_rejected`` predicate, the rule every read path applies).
            if (scheme == "DCM" and value == MANIFEST_TITLE) or rejection_code(meta or {}) is not None:
                withdrawn.add(sop_uid)
    listed: dict[str, tuple[str, list[ManifestInstance]]] = {}
    for row in rows:
        if (
            row.sop_uid in withdrawn
            or row.series_uid == manifest_series
            or row.source in (MANIFEST_PUBLISHER, REPORT_PUBLISHER)
        ):
            continue
        _, instances = listed.setdefault(row.series_uid, (row.modality, []))
        instances.append(ManifestInstance(row.sop_class_uid, row.sop_uid, row.rows, row.columns))
    return listed


def study_references(session: Session, study_uid: str) -> dict[str, frozenset[str]]:
    """What a manifest of the study would reference now (series → SOP Instance UIDs); empty when
    the study is unknown. A change of it calls for a new manifest version (DESIGN.md §8)."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return {}
    return {
        series_uid: frozenset(i.sop_instance_uid for i in instances)
        for series_uid, (_, instances) in _listed(session, study).items()
    }


def manifest_content(
    session: Session,
    study_uid: str,
    *,
    patient: ManifestPatient,
    order: ManifestOrder,
    retrieve_base_url: str,
    institution_name: str = "",
    principal: Principal = MANIFEST_READER,
) -> ManifestContent:
    """Read what the manifest of ``study_uid`` lists from the index (see the module docstring for
    what is left out); raises :class:`ManifestError` when the study is unknown or nothing is left."""
    if not (patient.ins and patient.ins_oid):
        raise ManifestError("the manifest is published under an INS: matricule and OID are required")
    if not (order.accession_number and order.accession_issuer):
        raise ManifestError("the manifest needs the accession number and its issuer (referenceIdList)")
    study = session.scalar(visible_studies(principal, select(Study).where(Study.study_uid == study_uid)))
    if study is None:
        raise ManifestError(f"study {study_uid} is not in the archive")
    listed = _listed(session, study)
    if not listed:
        raise ManifestError(f"study {study_uid} has no instance to list in a manifest")
    series = tuple(
        ManifestSeries(
            series_uid=series_uid,
            modality=modality,
            retrieve_url=series_retrieve_url(retrieve_base_url, study_uid, series_uid),
            instances=tuple(instances),
        )
        for series_uid, (modality, instances) in listed.items()
    )
    return ManifestContent(
        study_uid=study_uid,
        patient=patient,
        order=order,
        series=series,
        study_date=study.study_date,
        study_time=study.study_time,
        study_id=study.study_id,
        study_description=study.description,
        referring_physician=study.referring_physician,
        institution_name=institution_name,
        references={s.series_uid: frozenset(i.sop_instance_uid for i in s.instances) for s in series},
    )


# ------------------------------------------------------------------------------------ building


def _issuer(oid: str) -> Dataset:
    """An HL7v2 Hierarchic Designator item (PS3.3 Table 10-17): Universal Entity ID of type ISO."""
    item = Dataset()
    item.UniversalEntityID = oid
    item.UniversalEntityIDType = "ISO"
    return item


def _referenced_request(content: ManifestContent) -> Dataset:
    """The Referenced Request Sequence item (PS3.3 C.17.6.2.1, Table C.17.6-2 Type 1/2 attributes)."""
    order = content.order
    item = Dataset()
    item.StudyInstanceUID = content.study_uid
    item.ReferencedStudySequence = []
    item.AccessionNumber = order.accession_number[:16]
    item.IssuerOfAccessionNumberSequence = [_issuer(order.accession_issuer)]
    item.PlacerOrderNumberImagingServiceRequest = order.placer_number[:64]
    if order.placer_number and order.placer_issuer:
        item.OrderPlacerIdentifierSequence = [_issuer(order.placer_issuer)]
    item.FillerOrderNumberImagingServiceRequest = order.filler_number[:64]
    if order.filler_number and order.filler_issuer:
        item.OrderFillerIdentifierSequence = [_issuer(order.filler_issuer)]
    item.RequestedProcedureID = order.requested_procedure_id[:16]
    item.RequestedProcedureDescription = order.requested_procedure_description[:64]
    codes_ = []
    if order.requested_procedure_code is not None:
        value, scheme, meaning = order.requested_procedure_code
        codes_.append(hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning))
    item.RequestedProcedureCodeSequence = codes_
    return item


def _sex(value: str) -> str:
    sex = value.strip().upper()[:1]
    return sex if sex in ("M", "F") else ("O" if sex else "")


def _evidence(content: ManifestContent) -> list[Dataset]:
    """The evidence items highdicom groups by series; the first one carries the Patient and General
    Study module values the document inherits (the INS identity, not the stored local one)."""
    evidence = []
    for series in content.series:
        for instance in series.instances:
            item = Dataset()
            item.StudyInstanceUID = content.study_uid
            item.SeriesInstanceUID = series.series_uid
            item.SOPInstanceUID = instance.sop_instance_uid
            item.SOPClassUID = instance.sop_class_uid
            if instance.is_image:  # highdicom makes IMAGE items of objects with Rows and Columns
                item.Rows, item.Columns = instance.rows, instance.columns
            evidence.append(item)
    patient = content.patient
    first = evidence[0]
    first.PatientID = patient.ins
    first.PatientName = f"{patient.family_name.upper()}^{patient.given_names}"
    first.PatientBirthDate = patient.birth_date
    first.PatientSex = _sex(patient.sex)
    first.AccessionNumber = content.order.accession_number[:16]
    first.StudyID = content.study_id
    first.StudyDate = content.study_date
    first.StudyTime = content.study_time
    first.ReferringPhysicianName = content.referring_physician
    return evidence


def build_manifest(content: ManifestContent, *, version: int, created: datetime) -> Dataset:
    """The KOS manifest (version ``version``, created at ``created``) of ``content``; the same
    arguments give the same bytes, so a retried job stores a duplicate."""
    if not content.series:
        raise ManifestError("a manifest lists at least one instance")
    sop_uid, series_uid = manifest_uids(content.study_uid, version)
    when = created.astimezone(UTC)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    objects = _evidence(content)
    selection = hd.ko.KeyObjectSelection(document_title=codes.DCM.Manifest, referenced_objects=objects)
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=objects,
        content=selection,
        series_instance_uid=series_uid,
        series_number=MANIFEST_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=version,
        manufacturer="simral",
        institution_name=content.institution_name[:64] or None,
        requested_procedures=[_referenced_request(content)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set="ISO_IR 192",
        series_date=date,
        series_time=time,
        content_date=date,
        content_time=time,
        series_description="Manifeste DMP",
    )
    # highdicom stamps its creation and its own Contributing Equipment item with the clock: use
    # ``created`` so that the same version gives the same bytes.
    document.InstanceCreationDate, document.InstanceCreationTime = DA(date), TM(time)
    for equipment in document.get("ContributingEquipmentSequence") or []:
        equipment.ContributionDateTime = DT(when.strftime("%Y%m%d%H%M%S"))
    # Patient module (C.7.1.1): the INS and its issuer (DESIGN.md §6, DRIM-M sample KOS).
    patient = content.patient
    document.IssuerOfPatientID = ins_namespace(patient.ins_oid)
    document.IssuerOfPatientIDQualifiersSequence = [_issuer(patient.ins_oid)]
    # General Study module (C.7.2.1).
    document.IssuerOfAccessionNumberSequence = [_issuer(content.order.accession_issuer)]
    if content.study_description:
        document.StudyDescription = content.study_description[:64]
    # Hierarchical Series Reference (PS3.3 Table 10-4): where DRIM-M consumers retrieve each series.
    urls = {s.series_uid: s.retrieve_url for s in content.series}
    for study_item in document.CurrentRequestedProcedureEvidenceSequence:
        for series_item in study_item.ReferencedSeriesSequence:
            series_item.RetrieveURL = urls[series_item.SeriesInstanceUID]
    return document


def manifest_references(dataset: Dataset, study_uid: str | None = None) -> dict[str, set[str]]:
    """Series Instance UID → SOP Instance UIDs a KOS lists in its Current Requested Procedure
    Evidence (PS3.3 C.17.6.2), of every study or only ``study_uid``; what a DRIM-M consumer's
    ``KOS-SOPInstanceUID`` gives access to."""
    found: dict[str, set[str]] = {}
    for study_item in dataset.get("CurrentRequestedProcedureEvidenceSequence") or []:
        if study_uid is not None and str(study_item.get("StudyInstanceUID", "")) != study_uid:
            continue
        for series_item in study_item.get("ReferencedSeriesSequence") or []:
            uids = found.setdefault(str(series_item.get("SeriesInstanceUID", "")), set())
            sops = series_item.get("ReferencedSOPSequence") or []
            uids.update(str(sop.get("ReferencedSOPInstanceUID", "")) for sop in sops)
            uids.discard("")
    found.pop("", None)
    return found


def manifest_bytes(dataset: Dataset) -> bytes:
    """The manifest as a Part 10 file (what the archive stores and the DMP receives)."""
    return dataset_bytes(dataset)


# ------------------------------------------------------------------------------------- storing


def store_manifest(ctx: AppContext, dataset: Dataset, *, organisation_code: str) -> str:
    """Archive the manifest through the one ingest path (DESIGN.md §3), for ``organisation_code``;
    the ingest outcome: ``stored``, ``duplicate`` (a retry stored the same bytes already),
    ``duplicate-conflict`` (another manifest is archived under this version's UID: the archive kept
    it) or ``replaced``. Raises :class:`RuntimeError` when the archive refuses it."""
    publisher = Principal(
        kind="system",
        name=MANIFEST_PUBLISHER,
        organisation=organisation_code,
        archive_wide=True,
        via="job",
    )
    fd, name = tempfile.mkstemp(prefix="manifest-", suffix=".dcm", dir=ctx.store.scratch_dir())
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(manifest_bytes(dataset))
        result = archive.ingest_file(
            ctx,
            path,
            principal=publisher,
            source=MANIFEST_PUBLISHER,
            move=True,
            expected_sop_uid=str(dataset.SOPInstanceUID),
            expected_study_uid=str(dataset.StudyInstanceUID),
        )
    finally:
        path.unlink(missing_ok=True)
    if result.outcome == "rejected":
        raise RuntimeError(f"the manifest was not archived: {result.reason}")
    return result.outcome
