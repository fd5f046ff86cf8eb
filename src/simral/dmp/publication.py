"""The ``dmp.publish`` job: one ITI-41 submission of a report version and the study's manifest
(DESIGN.md §8; IHE ITI TF-2b §3.41, RAD TF-3 §4.68 XDS-I.b; ANS DMP integration guide).

For the documents of one job, in order:

1. The patient's INS must be QUAL (DESIGN.md §6); otherwise the documents *wait* with the reason.
2. TD0.2: the patient's DMP must exist and the professional be authorised; otherwise they wait.
3. The KOS manifest version is built (:mod:`simral.dmp.manifest`) with the time the document was
   queued (a retry rebuilds the same bytes) and stored in the study through the ingest path.
4. The report entry carries the CR-IMG CDA the report's publication produced. That CDA was frozen at
   signing from the request's copy of the patient, which names the INS only if it was QUAL then; the
   DMP's copy must name the patient by the now-qualified INS (CI-SIS "Volet Structuration minimale"
   §2.3.1, Référentiel INS): when its recordTarget lacks the identity's INS, the recordTarget is
   rebuilt from the qualified identity (INS, IPP, INS traits), everything else kept (same
   ClinicalDocument/id = the entry's uniqueId; hash, size and signature over the bytes sent). Each
   entry replacing a published one has its RPLC association; the XAdES signature document signs the
   lot.
5. The DMP's answer: success → published (the replaced entries are marked replaced); a registry
   error or no answer → the job is retried with backoff, and the documents are marked failed with
   the DMP's error after the last attempt (an operator may retry).

Everything the DMP needs to know about the professional is the signing radiologist (VIHF NameID,
author, legal authenticator of the report and of the KOS, as in the DRIM-M ``XDS.xml`` sample); the
organisation's certificates authenticate (mutual TLS) and sign (VIHF, XAdES). The installation is
named by configuration: ``dmp_sender_oid`` (TD0.2 sender) and ``dmp_lps_*`` (VIHF LPS fields). A
report received from the site's RIS (:mod:`simral.dmp.received`) is published as
received: its CDA bytes, with the author, legal authenticator, format, exam and patient the CDA and
the document entry carry (no imaging request needed).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lxml import etree
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.dmp import manifest as manifests
from simral.dmp import received as received_reports
from simral.dmp.models import (
    DMP_DELETED,
    DMP_FAILED,
    DMP_MASKED,
    DMP_PENDING,
    DMP_PUBLISHED,
    DMP_REPLACED,
    DMP_WAITING,
    KIND_REPORT,
    SOURCE_SIMRAL,
    DmpDocument,
    DmpOrganisation,
)
from simral.dmp.service import (
    REASON_INS,
    REASON_NO_INS,
    REASON_NOT_CONFIGURED,
    WITHDRAW_DELETE,
    payload_ids,
    set_state,
)
from simral.identity.models import Organisation
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.patients.models import STATUS_QUAL, AssigningAuthority, PatientIdentity
from simral.patients.service import identity_traits
from simral.reading import cda as cda_document
from simral.reading.models import REPORT_SIGNED, ImagingRequest, Report
from simral.storage.base import BlobStore
from simral.xds.client import DmpClient, DmpEndpoint, XdsRegistryError, XdsUnavailable
from simral.xds.metadata import (
    CONFIDENTIALITY_NORMAL,
    KOS_CLASS,
    KOS_FORMAT,
    KOS_TYPE,
    REF_ACCESSION,
    REF_ORDER,
    REF_STUDY_UID,
    REPORT_CLASS,
    REPORT_FORMAT_PDF,
    REPORT_FORMAT_STRUCTURED,
    REPORT_TYPE,
    STATUS_DELETED,
    Author,
    Code,
    DocumentEntry,
    ReferenceId,
    SubmissionSet,
    metadata_update,
    provide_and_register,
)
from simral.xds.vihf import VihfContext
from simral.xds.xades import SigningIdentity

log = logging.getLogger(__name__)

#: Who stores the manifest and calls the DMP (audited).
DMP_PUBLISHER = Principal(kind="system", name="dmp-publication", archive_wide=True, via="job")

#: Profession "Médecin" (TRE_G15-ProfessionSante) and specialty "Radio-diagnostic et imagerie
#: médicale" (TRE_R38-SpecialiteOrdinale) of the signing radiologist.
PROFESSION_DOCTOR = Code("10", "1.2.250.1.71.1.2.7", "Médecin")
SPECIALTY_RADIOLOGY = Code("SM44", "1.2.250.1.71.4.2.5", "Radio-diagnostic (SM)")
#: The same as an XDS authorSpecialty (JDV_J01-XdsAuthorSpecialty-CISIS: profession/specialty).
AUTHOR_SPECIALTY_RADIOLOGY = Code("G15_10/SM44", "1.2.250.1.213.1.1.4.5", "Médecin - Radio-diagnostic (SM)")
#: Secteur d'activité (TRE_R02) and healthcareFacilityType code system; practiceSetting (JDV_J04).
SECTOR_SYSTEM = "1.2.250.1.71.4.2.4"
PRACTICE_SETTING_SYSTEM = "1.2.250.1.213.1.1.4.9"
#: Labels of the usual TRE_R02-SecteurActivite codes (healthcareFacilityTypeCode, Secteur_Activite,
#: and the submission set's contentTypeCode, which may take its values from TRE_R02).
SECTOR_LABELS = {
    "SA01": "Etablissement public de santé",
    "SA02": "Hôpital militaire du Service de Santé des Armées",
    "SA03": "Etablissement privé PSPH",
    "SA04": "Etablissement privé non PSPH",
    "SA05": "Centre de santé",
    "SA07": "Cabinet individuel",
    "SA08": "Cabinet de groupe",
    "SA25": "Laboratoire de biologie médicale",
}
#: Code systems of the modality (DICOM CID 29, DCM) and of the anatomic region (SNOMED CT).
MODALITY_SYSTEM = "1.2.840.10008.2.16.4"
SNOMED_SYSTEM = "2.16.840.1.113883.6.96"
#: eventCodeList codingSchemes, as the DRIM-M ``XDS.xml`` samples give them: the CI-SIS value sets
#: JDV_ModaliteAcquisition_CISIS (1.2.250.1.213.1.1.5.618, DCM codes) and JDV_RegionAnatomique_CISIS
#: (1.2.250.1.213.1.1.5.695, SNOMED CT codes; DESIGN.md §7).
EVENT_MODALITY_SCHEME = "1.2.250.1.213.1.1.5.618"
EVENT_REGION_SCHEME = "1.2.250.1.213.1.1.5.695"
#: The registry version of an entry simral registered (ITI TF-3 §4.1.16: 1 at registration). An entry
#: is updated at most once through simral: masking (ITI-57) moves it out of ``published``.
REGISTERED_ENTRY_VERSION = "1"


@dataclass(frozen=True)
class _Lot:
    """What one submission needs, read in one session."""

    documents: list[DmpDocument]
    organisation: DmpOrganisation
    site: Organisation
    group: Organisation | None
    request: ImagingRequest | None
    identity: PatientIdentity
    reports: dict[int, Report]
    replaced: dict[int, str]
    #: The report received from the site's RIS (a lot whose source is not simral).
    received: received_reports.ReceivedReport | None = None
    #: The identity's assigning authority OID (sourcePatientId without a request).
    identity_authority: str = ""


class _Wait(Exception):
    """The lot cannot be published now: the documents wait with this reason."""


def _split_name(name: str) -> tuple[str, str]:
    """(family, given) of a display name "Given Family"."""
    parts = name.strip().split()
    if len(parts) < 2:
        return (name.strip(), "")
    return parts[-1].upper(), " ".join(parts[:-1])


def _structure_id(organisation: DmpOrganisation, site: Organisation) -> str:
    """IDNST of the structure: the configured one, else ``1`` + FINESS, else ``3`` + SIRET."""
    if organisation.structure_id:
        return organisation.structure_id
    if site.finess:
        return "1" + site.finess
    if site.siret:
        return "3" + site.siret
    raise PermanentFailure(f"{site.code} has neither FINESS nor SIRET: configure its DMP structure id")


def _read_lot(
    session: Session,
    ids: list[int],
    store: BlobStore,
    *,
    states: tuple[str, ...] = (DMP_PENDING, DMP_FAILED),
) -> _Lot | None:
    """The documents of ``ids`` in one of ``states`` and what their submission needs; raises
    :class:`_Wait` when the patient's INS is missing or not qualified."""
    documents = list(
        session.scalars(select(DmpDocument).where(DmpDocument.id.in_(ids)).order_by(DmpDocument.id))
    )
    documents = [d for d in documents if d.state in states]
    if not documents:
        return None
    code = documents[0].organisation_code
    organisation = session.scalar(select(DmpOrganisation).where(DmpOrganisation.organisation_code == code))
    site = session.scalar(select(Organisation).where(Organisation.code == code))
    if organisation is None or site is None or not organisation.enabled:
        raise PermanentFailure(f"{code} no longer publishes to the DMP through simral")
    first = documents[0]
    request = session.get(ImagingRequest, first.request_id) if first.request_id else None
    if request is None and (first.request_id or first.identity_id is None):
        raise PermanentFailure("the documents' imaging request no longer exists")
    identity_id = first.identity_id or (request.identity_id if request is not None else None)
    identity = session.get(PatientIdentity, identity_id) if identity_id else None
    if identity is None:
        raise _Wait(REASON_NO_INS)
    if not identity.ins_matricule:
        raise _Wait(REASON_NO_INS)
    if identity.status != STATUS_QUAL:
        raise _Wait(REASON_INS.format(status=identity.status))
    reports = {
        d.report_id: report
        for d in documents
        if d.report_id is not None and (report := session.get(Report, d.report_id)) is not None
    }
    if not reports and request is not None:
        # A manifest alone (the study's images changed): the professional responsible is the signer
        # of the latest report version.
        latest = session.scalar(
            select(Report)
            .where(Report.request_id == request.id, Report.state == REPORT_SIGNED)
            .order_by(Report.version.desc(), Report.id.desc())
            .limit(1)
        )
        if latest is not None:
            reports[latest.id] = latest
    received = None
    if first.source != SOURCE_SIMRAL:
        received_row = received_reports.report_document(session, documents)
        if received_row is None:
            raise PermanentFailure("no report received from the RIS for this study")
        try:
            received = received_reports.load(store, received_row)
        except received_reports.ReceivedReportError as exc:
            raise PermanentFailure(f"the received report cannot be read: {exc}") from None
        if received.cda.patient_ins != (identity.ins_matricule, identity.ins_oid):
            raise PermanentFailure("the received report's patient (recordTarget INS) is not the identity's")
    authority = session.get(AssigningAuthority, identity.authority_id)
    group_code = next(
        (r.organisation_code for r in reports.values()), request.group_code if request is not None else ""
    )
    group = (
        session.scalar(select(Organisation).where(Organisation.code == group_code)) if group_code else None
    )
    replaced_ids = [d.replaces_id for d in documents if d.replaces_id is not None]
    replaced = {
        row.id: row.entry_uuid
        for row in session.scalars(
            select(DmpDocument).where(
                DmpDocument.id.in_(replaced_ids), DmpDocument.state.in_((DMP_PUBLISHED, DMP_REPLACED))
            )
        )
    }
    for document in documents:
        session.expunge(document)
    return _Lot(
        documents,
        organisation,
        site,
        group,
        request,
        identity,
        reports,
        replaced,
        received,
        (authority.oid or "") if authority is not None else "",
    )


def _signer(organisation: DmpOrganisation) -> SigningIdentity:
    return SigningIdentity.from_files(
        Path(organisation.signing_cert_file), Path(organisation.signing_key_file)
    )


def _endpoint(ctx: AppContext, organisation: DmpOrganisation, organisation_site: Organisation) -> DmpEndpoint:
    """The DMP's endpoints, the organisation's TLS certificate and the TD0.2 sender: the configured
    ``dmp_sender_oid``, else the organisation's OID (as the SubmissionSet's sourceId)."""
    settings = ctx.settings
    return DmpEndpoint(
        iti41_url=settings.dmp_iti41_url,
        iti57_url=settings.dmp_iti57_url,
        td02_url=settings.dmp_td02_url,
        tls_certificate=Path(organisation.auth_cert_file),
        tls_key=Path(organisation.auth_key_file),
        ca_bundle=Path(settings.dmp_ca_file) if settings.dmp_ca_file else None,
        timeout=settings.dmp_timeout,
        sender_oid=settings.dmp_sender_oid or _source_oid(organisation_site),
        sender_name=settings.dmp_lps_name,
    )


def _professional(lot: _Lot) -> tuple[str, str]:
    """(national id, display name) of the professional responsible: the report's signer (the
    received CDA's author)."""
    if lot.received is not None:
        author = lot.received.cda.author
        return author.national_id, author.display_name
    for report in lot.reports.values():
        if report.author_national_id:
            return report.author_national_id, report.author_name or report.author
    raise PermanentFailure("no signing professional with a national id (RPPS) for this publication")


def _sector(code: str) -> Code:
    return Code(code, SECTOR_SYSTEM, SECTOR_LABELS.get(code, code))


def _ins(identity: PatientIdentity) -> str:
    return f"{identity.ins_matricule}^^^&{identity.ins_oid}&ISO^NH"


def _vihf(ctx: AppContext, lot: _Lot) -> VihfContext:
    national_id, name = _professional(lot)
    settings = ctx.settings
    return VihfContext(
        professional_id=national_id,
        professional_name=name,
        profession=PROFESSION_DOCTOR,
        specialty=SPECIALTY_RADIOLOGY,
        structure_id=_structure_id(lot.organisation, lot.site),
        sector=_sector(lot.organisation.activity_sector),
        patient_ins=_ins(lot.identity),
        lps_name=settings.dmp_lps_name,
        lps_version=settings.dmp_lps_version,
        lps_id=settings.dmp_lps_instance_id
        or f"{settings.dmp_lps_name}-{lot.organisation.organisation_code}",
        lps_homologation_id=settings.dmp_lps_id,
    )


def _cda_author(lot: _Lot, professional: received_reports.Professional) -> Author:
    """An author or legal authenticator of the received CDA (its structure, else the site's)."""
    return Author(
        national_id=professional.national_id,
        family=professional.family,
        given=professional.given,
        role=None,
        specialty=professional.specialty or AUTHOR_SPECIALTY_RADIOLOGY,
        institution_name=professional.organisation_name or lot.site.name,
        institution_id=professional.organisation_id or _structure_id(lot.organisation, lot.site),
    )


def _author(lot: _Lot) -> Author:
    if lot.received is not None:
        return _cda_author(lot, lot.received.cda.author)
    national_id, name = _professional(lot)
    family, given = _split_name(name)
    institution = lot.group or lot.site
    institution_id = (
        ("1" + institution.finess) if institution.finess else _structure_id(lot.organisation, lot.site)
    )
    return Author(
        national_id=national_id,
        family=family,
        given=given,
        role=None,
        specialty=AUTHOR_SPECIALTY_RADIOLOGY,
        institution_name=institution.name,
        institution_id=institution_id,
    )


def _event_code(code: Code) -> Code:
    """An eventCodeList value with its CI-SIS codingScheme: a DCM modality in JDV 5.618, a SNOMED CT
    region in JDV 5.695 (French label of the value set for a modality); other codes as they are."""
    if code.scheme == MODALITY_SYSTEM:
        return Code(code.code, EVENT_MODALITY_SCHEME, cda_document.modality_name(code.code))
    if code.scheme == SNOMED_SYSTEM:
        return Code(code.code, EVENT_REGION_SCHEME, code.display or code.code)
    return code


def _event_codes(lot: _Lot) -> tuple[Code, ...]:
    """eventCodeList: the exam's acquisition modality and anatomic regions (the received CDA's
    serviceEvent translations, else the request's), each once."""
    if lot.received is not None and lot.received.cda.event_codes:
        found = [_event_code(code) for code in lot.received.cda.event_codes]
        return tuple(dict.fromkeys(found))
    request = lot.request
    if request is None:
        return ()
    complement = request.complement or {}
    modality = str(complement.get("modality") or request.modality or "").upper()
    codes = [Code(modality, MODALITY_SYSTEM, modality)] if modality else []
    for region in complement.get("anatomy") or request.anatomy or []:
        system = str(region.get("system", ""))
        if region.get("code") and (system.replace(".", "").isdigit() or system.upper().startswith("SNOMED")):
            scheme = system if system.replace(".", "").isdigit() else SNOMED_SYSTEM
            codes.append(Code(str(region["code"]), scheme, str(region.get("display", region["code"]))))
    return tuple(dict.fromkeys(_event_code(code) for code in codes))


def _order(lot: _Lot, document: DmpDocument) -> manifests.ManifestOrder:
    """The exam's accession number and order: the document's (a received report), else the request's,
    else the received CDA's inFulfillmentOf."""
    request = lot.request
    accession, issuer = document.accession_number, document.accession_authority
    placer, placer_issuer = "", ""
    if request is not None:
        accession, issuer = accession or request.accession_number, issuer or request.accession_authority
        placer, placer_issuer = request.placer_number, request.placer_authority
    elif lot.received is not None:
        order = next((o for o in lot.received.cda.orders if o.placer_number), None)
        if order is not None:
            placer, placer_issuer = order.placer_number, order.placer_authority
    return manifests.ManifestOrder(
        accession_number=accession,
        accession_issuer=issuer or lot.site.accession_oid,
        placer_number=placer,
        placer_issuer=placer_issuer,
    )


def _reference_ids(lot: _Lot, document: DmpDocument) -> tuple[ReferenceId, ...]:
    order = _order(lot, document)
    refs = []
    if order.accession_number and order.accession_issuer:
        refs.append(ReferenceId(order.accession_number, order.accession_issuer, REF_ACCESSION))
    if order.placer_number and order.placer_issuer:
        refs.append(ReferenceId(order.placer_number, order.placer_issuer, REF_ORDER))
    refs.append(ReferenceId(document.study_uid, "1.2.840.10008", REF_STUDY_UID))
    return tuple(refs)


def _patient_info(lot: _Lot) -> tuple[tuple[str, ...], str]:
    """(sourcePatientInfo, sourcePatientId) from the request's patient, else the identity (PID-5 birth
    name L, PID-7, PID-8)."""
    identity = lot.identity
    patient = (lot.request.patient if lot.request is not None else None) or {
        "birth_name": identity.birth_name,
        "first_birth_given_name": identity.first_birth_given_name,
        "birth_date": identity.birth_date,
        "sex": identity.sex,
        "ipp": identity.local_id,
        "ipp_oid": lot.identity_authority,
    }
    family, given = str(patient.get("birth_name", "")).upper(), patient.get("first_birth_given_name", "")
    info = (
        f"PID-5|{family}^{given}^^^^^L",
        f"PID-7|{patient.get('birth_date', '')}",
        f"PID-8|{patient.get('sex', 'U') or 'U'}",
    )
    source = f"{patient.get('ipp', '')}^^^&{patient.get('ipp_oid', '')}&ISO^PI"
    return info, source


def _exam_time(lot: _Lot) -> tuple[datetime | None, datetime | None]:
    """(serviceStartTime, serviceStopTime): the received CDA's serviceEvent, else the exam time."""
    if lot.received is not None and lot.received.cda.service_start is not None:
        return lot.received.cda.service_start, lot.received.cda.service_stop
    complement = (lot.request.complement or {}) if lot.request is not None else {}
    performed = complement.get("performed_at") or ""
    try:
        at = as_utc(datetime.fromisoformat(performed)) if performed else None
    except ValueError:
        at = None
    return at, at


def _manifest(ctx: AppContext, lot: _Lot, document: DmpDocument) -> bytes:
    """Build (the same bytes on every try) and archive the manifest version; its DICOM bytes."""
    identity = lot.identity
    patient = manifests.ManifestPatient(
        ins=identity.ins_matricule,
        ins_oid=identity.ins_oid,
        family_name=identity.birth_name,
        given_names=identity.first_birth_given_name or identity.birth_given_names,
        birth_date=identity.birth_date,
        sex=identity.sex,
    )
    order = _order(lot, document)
    base = ctx.settings.dmp_retrieve_url or (ctx.settings.public_url.rstrip("/") + "/dicom-web")
    with ctx.db.reading() as session:
        content = manifests.manifest_content(
            session,
            document.study_uid,
            patient=patient,
            order=order,
            retrieve_base_url=base.removesuffix("/dicom-web"),
            institution_name=lot.site.name,
        )
    dataset = manifests.build_manifest(content, version=document.version, created=as_utc(document.created_at))
    manifests.store_manifest(ctx, dataset, organisation_code=lot.organisation.organisation_code)
    return manifests.manifest_bytes(dataset)


def _qualified_patient(lot: _Lot) -> dict[str, Any]:
    """The patient as the DMP's CDA names them: the qualified identity (INS, its traits) and the IPP
    the request named (else the identity's own local id), in the shape of the request's copy."""
    identity = lot.identity
    named: Mapping[str, Any] = (lot.request.patient if lot.request is not None else None) or {}
    ipp, ipp_oid = named.get("ipp", ""), named.get("ipp_oid", "")
    if not ipp:
        ipp, ipp_oid = identity.local_id, lot.identity_authority
    return {"ipp": ipp, "ipp_oid": ipp_oid, **identity_traits(identity)}


def _report_cda(lot: _Lot, cda: bytes) -> bytes:
    """The report's CDA as the DMP gets it: as published when its recordTarget names the identity's
    qualified INS, else with the recordTarget rebuilt from the qualified identity (see the module
    docstring, step 4)."""
    identity = lot.identity
    try:
        root = etree.fromstring(cda, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise PermanentFailure(f"the report's published CDA is not well-formed: {exc}") from None
    ns = {"cda": cda_document.CDA_NS}
    named = {
        (element.get("root"), element.get("extension"))
        for element in root.iterfind("cda:recordTarget/cda:patientRole/cda:id", ns)
    }
    if (identity.ins_oid, identity.ins_matricule) in named:
        return cda
    return cda_document.with_record_target(cda, _qualified_patient(lot))


def _entry(
    ctx: AppContext,
    lot: _Lot,
    document: DmpDocument,
    *,
    confidentiality: tuple[Code, ...] = (CONFIDENTIALITY_NORMAL,),
) -> DocumentEntry:
    info, source_patient = _patient_info(lot)
    facility = _sector(lot.organisation.facility_type_code)
    practice = Code(
        lot.organisation.practice_setting_code,
        PRACTICE_SETTING_SYSTEM,
        lot.organisation.practice_setting_code,
    )
    exam_start, exam_stop = _exam_time(lot)
    author = _author(lot)
    title = "Compte rendu d'imagerie médicale"
    if document.kind == KIND_REPORT and lot.received is not None:
        # The report as the RIS sent it: its bytes, its own title, author and legal authenticator.
        header = lot.received.cda
        content = lot.received.content
        mime, title = "text/xml", header.title or title
        format_code = REPORT_FORMAT_STRUCTURED if header.structured else REPORT_FORMAT_PDF
        codes = (REPORT_CLASS, REPORT_TYPE, format_code)
        created = header.effective_time or document.created_at
        legal = _cda_author(lot, header.legal_authenticator) if header.legal_authenticator else author
    elif document.kind == KIND_REPORT:
        report = lot.reports.get(document.report_id or 0)
        cda = str((report.published or {}).get("cda", "")) if report is not None else ""
        if report is None or not cda:
            raise PermanentFailure(f"report {document.report_id} has no published CDA")
        content = _report_cda(lot, cda.encode("utf-8"))
        mime = "text/xml"
        codes = (REPORT_CLASS, REPORT_TYPE, REPORT_FORMAT_STRUCTURED)
        created = report.signed_at or report.updated_at
        legal = author
    else:
        content = _manifest(ctx, lot, document)
        mime, title = "application/dicom", "Manifeste d'imagerie (KOS)"
        codes = (KOS_CLASS, KOS_TYPE, KOS_FORMAT)
        created = document.created_at
        # The professional responsible for the exam, as for the report (DRIM-M XDS.xml: the KOS
        # entry has a legalAuthenticator): the received CDA's legal authenticator, else the signer.
        signer = lot.received.cda.legal_authenticator if lot.received is not None else None
        legal = _cda_author(lot, signer) if signer else author
    return DocumentEntry(
        entry_uuid=document.entry_uuid,
        unique_id=document.unique_id,
        mime_type=mime,
        content=content,
        title=title,
        class_code=codes[0],
        type_code=codes[1],
        format_code=codes[2],
        confidentiality=confidentiality,
        healthcare_facility_type=facility,
        practice_setting=practice,
        event_codes=_event_codes(lot),
        reference_ids=_reference_ids(lot, document),
        creation_time=as_utc(created),
        service_start=exam_start,
        service_stop=exam_stop,
        language="fr-FR",
        author=author,
        legal_authenticator=legal,
        patient_id=_ins(lot.identity),
        source_patient_id=source_patient,
        source_patient_info=info,
        replaces_entry_uuid=lot.replaced.get(document.replaces_id) if document.replaces_id else None,
    )


def _source_oid(site: Organisation) -> str:
    """SubmissionSet.sourceId: an OID of the publishing organisation (its patient-id authority, else
    a UUID-derived OID of its code, PS3.5 B.2)."""
    return site.patient_id_oid or "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"simral/{site.code}").int)


def _finish(
    ctx: AppContext,
    lot: _Lot,
    *,
    state: str,
    reason: str = "",
    submission_uid: str = "",
    sizes: dict[int, Any],
) -> None:
    with ctx.db.unit_of_work() as session:
        now = utcnow()
        for document in lot.documents:
            row = session.get(DmpDocument, document.id, with_for_update=True)
            if row is None or row.state in (DMP_PUBLISHED, DMP_REPLACED):
                continue
            row.state, row.reason, row.updated_at = state, reason, now
            if state == DMP_PUBLISHED:
                row.published_at = now
                row.submission_uid = submission_uid
                row.size, sha1 = sizes.get(row.id, (row.size, row.sha1))
                if row.kind == KIND_REPORT:
                    row.sha1 = sha1
                if row.replaces_id is not None:
                    previous = session.get(DmpDocument, row.replaces_id)
                    if previous is not None and previous.state == DMP_PUBLISHED:
                        previous.state, previous.updated_at = DMP_REPLACED, now
        audit.record(
            session,
            action="dmp.publish",
            outcome="success"
            if state == DMP_PUBLISHED
            else ("warning" if state == DMP_WAITING else "failure"),
            principal=DMP_PUBLISHER,
            study_uid=lot.documents[0].study_uid,
            patient_id=lot.identity.ins_matricule,
            patient_issuer=lot.identity.ins_oid,
            detail={
                "organisation": lot.organisation.organisation_code,
                "documents": [
                    {"id": d.id, "kind": d.kind, "version": d.version, "entry": d.entry_uuid}
                    for d in lot.documents
                ],
                "state": state,
                "reason": reason,
                "submission": submission_uid,
            },
        )


def publish_lot(ctx: AppContext, job: ClaimedJob) -> None:
    """Publish one job's documents (see the module docstring); raises to have the job retried."""
    ids = payload_ids(job.payload)
    if not ctx.settings.dmp_iti41_url:
        _mark(ctx, ids, DMP_WAITING, REASON_NOT_CONFIGURED)
        return
    try:
        with ctx.db.reading() as session:
            lot = _read_lot(session, ids, ctx.store)
    except _Wait as wait:
        _mark(ctx, ids, DMP_WAITING, str(wait))
        return
    if lot is None:
        return
    vihf = _vihf(ctx, lot)
    signer = _signer(lot.organisation)
    with DmpClient(_endpoint(ctx, lot.organisation, lot.site), signer) as client:
        status = client.check_patient(vihf, ins=lot.identity.ins_matricule, ins_oid=lot.identity.ins_oid)
        if not status.exists or not status.authorised:
            reason = (
                "Le patient n'a pas de DMP (TD0.2)."
                if not status.exists
                else "Accès au DMP non autorisé (TD0.2 : "
                + f"{status.authorisation or status.reason or 'refus'})."
            )
            _finish(ctx, lot, state=DMP_WAITING, reason=reason, sizes={})
            return
        entries = [_entry(ctx, lot, document) for document in lot.documents]
        submission = SubmissionSet(
            unique_id="2.25." + str(uuid.uuid4().int),
            source_id=_source_oid(lot.site),
            submission_time=utcnow(),
            author=_author(lot),
            content_type_code=_sector(lot.organisation.activity_sector),
            title="Compte rendu et images d'imagerie médicale",
        )
        request = provide_and_register(submission, entries, signer=signer)
        client.provide_and_register(request, vihf)
    sizes = {d.id: (len(e.content), e.sha1.lower()) for d, e in zip(lot.documents, entries, strict=True)}
    _finish(ctx, lot, state=DMP_PUBLISHED, submission_uid=submission.unique_id, sizes=sizes)
    log.info("DMP: %d document(s) published for %s", len(entries), lot.organisation.organisation_code)


def publish_documents(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`~simral.dmp.service.DMP_PUBLISH`: each lot on its own."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        ids = payload_ids(job.payload)
        try:
            publish_lot(ctx, job)
            outcomes[job.id] = None
        except PermanentFailure as exc:
            outcomes[job.id] = exc
            _mark(ctx, ids, DMP_FAILED, str(exc))
        except XdsRegistryError as exc:
            reason = "Erreur du DMP : " + ", ".join(f"{e.code} {e.context}".strip() for e in exc.errors)
            outcomes[job.id] = f"registry error {', '.join(exc.codes)}"
            _mark(ctx, ids, DMP_FAILED if job.attempts >= job.max_attempts else DMP_PENDING, reason)
        except XdsUnavailable as exc:
            outcomes[job.id] = f"DMP unavailable: {exc}"
            _mark(
                ctx,
                ids,
                DMP_FAILED if job.attempts >= job.max_attempts else DMP_PENDING,
                "Le DMP n'a pas répondu.",
            )
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
            if job.attempts >= job.max_attempts:
                _mark(ctx, ids, DMP_FAILED, f"{type(exc).__name__}: {exc}")
    return outcomes


def _mark(ctx: AppContext, ids: list[int], state: str, reason: str) -> None:
    with ctx.db.unit_of_work() as session:
        set_state(session, ids, state, reason)


# ------------------------------------------------------------------------------- withdrawal


#: confidentialityCode masking an entry to professionals (JDV_J08-XdsConfidentialityCode-CISIS).
MASKED_TO_PROFESSIONALS = Code("MASQUE_PS", "1.2.250.1.213.1.1.4.13", "Masqué aux professionnels de santé")


def _submission(lot: _Lot, title: str) -> SubmissionSet:
    return SubmissionSet(
        unique_id="2.25." + str(uuid.uuid4().int),
        source_id=_source_oid(lot.site),
        submission_time=utcnow(),
        author=_author(lot),
        content_type_code=_sector(lot.organisation.activity_sector),
        title=title,
    )


def withdraw_one(ctx: AppContext, document_id: int, action: str) -> None:
    """ITI-57 for one published entry: logical deletion (availabilityStatus ``Deleted``, CI-SIS) or a
    new version of its metadata masked to professionals (``MASQUE_PS``); the entry's state follows."""
    try:
        with ctx.db.reading() as session:
            lot = _read_lot(session, [document_id], ctx.store, states=(DMP_PUBLISHED,))
    except _Wait as wait:
        raise PermanentFailure(str(wait)) from None
    if lot is None:
        return
    document = lot.documents[0]
    signer = _signer(lot.organisation)
    with DmpClient(_endpoint(ctx, lot.organisation, lot.site), signer) as client:
        if action == WITHDRAW_DELETE:
            client.update_status(
                _submission(lot, "Suppression d'un document"),
                _vihf(ctx, lot),
                patient_id=_ins(lot.identity),
                entry_uuid=document.entry_uuid,
                new_status=STATUS_DELETED,
            )
            state = DMP_DELETED
        else:
            entry = _entry(
                ctx, lot, document, confidentiality=(CONFIDENTIALITY_NORMAL, MASKED_TO_PROFESSIONALS)
            )
            body = metadata_update(
                _submission(lot, "Masquage d'un document"),
                entry,
                logical_id=document.entry_uuid,
                previous_version=REGISTERED_ENTRY_VERSION,
            )
            client.update_metadata(body, _vihf(ctx, lot))
            state = DMP_MASKED
    with ctx.db.unit_of_work() as session:
        row = session.get(DmpDocument, document_id, with_for_update=True)
        if row is None:
            return
        row.state, row.reason, row.updated_at = state, "", utcnow()
        audit.record(
            session,
            action="dmp.withdraw",
            principal=DMP_PUBLISHER,
            study_uid=row.study_uid,
            patient_id=lot.identity.ins_matricule,
            patient_issuer=lot.identity.ins_oid,
            detail={"document": row.id, "kind": row.kind, "entry": row.entry_uuid, "action": action},
        )


def withdraw_documents(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`~simral.dmp.service.DMP_WITHDRAW`."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        try:
            withdraw_one(ctx, int(job.payload["document"]), str(job.payload["action"]))
            outcomes[job.id] = None
        except PermanentFailure as exc:
            outcomes[job.id] = exc
        except XdsRegistryError as exc:
            outcomes[job.id] = f"registry error {', '.join(exc.codes)}"
        except XdsUnavailable as exc:
            outcomes[job.id] = f"DMP unavailable: {exc}"
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
    return outcomes
