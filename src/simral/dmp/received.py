"""Reports received from a site's RIS and published to the DMP on its behalf (DESIGN.md §7 flux 5,
§8; the DRIMbox "source" trigger).

A site's RIS sends its signed imaging report as a CDA R2 document in HL7 v2 (CI-SIS "Transmission de
documents CDA-R2 en HL7 v2": ORU^R01 or MDM^T02 / T10), read by :mod:`simral.hl7.report_flow`. When
the site lets simral publish for it (:func:`simral.dmp.service.publishing_organisation`):

- :func:`read_report` reads the CDA header with lxml (HL7 CDA R2 header; CI-SIS CR-IMG 2024.01,
  templateId 1.2.250.1.213.1.1.1.45): document id, setId and versionNumber, type, structured body or
  level 1 (nonXMLBody), the patient's INS (recordTarget), the author and legal authenticator (RPPS
  ids, root 1.2.250.1.71.4.2.1), the orders and accession numbers (inFulfillmentOf, DICOM PS3.20
  ``ps3-20:accessionNumber``), the studies (documentationOf/serviceEvent/id), their time, modality and
  anatomy; what is missing or inconsistent refuses the message (:class:`ReceivedReportError`);
- :func:`receive_report` keeps the CDA bytes as received in the blob store (``documents/dmp/…``,
  written durably before the acknowledgement, DESIGN.md §3 step 3), creates the report's
  :class:`~simral.dmp.models.DmpDocument` (replacing the previous version of the same setId, or the
  document the CDA's relatedDocument RPLC names) and a manifest of the study
  (:func:`~simral.dmp.service.manifest_document`), queues one ``dmp.publish`` job and audits the
  reception (``dmp.report-received``), all in the caller's transaction;
- :func:`load` gives the publication job the CDA back (its bytes, read again, and what they say).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lxml import etree
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.audit import service as audit
from simral.dmp.models import DMP_PENDING, KIND_REPORT, DmpDocument
from simral.dmp.service import enqueue_documents, manifest_document, new_entry_uuid, publishing_organisation
from simral.patients.models import PatientIdentity
from simral.patients.service import is_ins_oid
from simral.storage.base import BlobStore
from simral.xds.metadata import Code

#: Key namespace of received reports in the blob store.
KEY_PREFIX = "documents/dmp"
#: LOINC "CR d'imagerie médicale" and the CI-SIS CR-IMG template.
IMAGING_REPORT_TYPE = "18748-4"
CR_IMG_TEMPLATE = "1.2.250.1.213.1.1.1.45"
#: Identifier roots of the national directories (ANS): RPPS-based IDNPS, structures (IDNST).
OID_IDNPS = "1.2.250.1.71.4.2.1"
OID_IDNST = "1.2.250.1.71.4.2.2"
#: Code systems of the serviceEvent translations kept as event codes (modality, anatomy).
DCM_SYSTEM = "1.2.840.10008.2.16.4"
SNOMED_SYSTEM = "2.16.840.1.113883.6.96"

_CDA = "urn:hl7-org:v3"
_NS = {"cda": _CDA, "ps3-20": "urn:dicom-org:ps3-20"}

try:
    _LOCAL = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - systems without tzdata
    _LOCAL = ZoneInfo("UTC")


class ReceivedReportError(ValueError):
    """A received report that cannot be published: ``code`` is the HL7 table 0357 error code."""

    def __init__(self, message: str, *, code: str = "102") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Professional:
    """A health professional of the CDA header (author, legalAuthenticator)."""

    national_id: str  # IDNPS: "8" + RPPS
    family: str
    given: str
    specialty: Code | None
    organisation_name: str
    organisation_id: str  # IDNST, when the CDA gives it

    @property
    def display_name(self) -> str:
        return f"{self.given} {self.family}".strip()


@dataclass(frozen=True)
class OrderRef:
    """One inFulfillmentOf/order: the placer number and the accession number, with their OIDs."""

    placer_number: str
    placer_authority: str
    accession_number: str
    accession_authority: str


@dataclass(frozen=True)
class ReportCda:
    """What the publication needs from a received CDA header (HL7 CDA R2 §4.2)."""

    unique_id: str
    set_id: str
    version: int
    type_code: str
    title: str
    effective_time: datetime | None
    structured: bool
    cr_img: bool
    patient_ins: tuple[str, str] | None
    author: Professional
    legal_authenticator: Professional | None
    orders: tuple[OrderRef, ...]
    study_uids: tuple[str, ...]
    service_start: datetime | None
    service_stop: datetime | None
    event_codes: tuple[Code, ...]
    replaces: tuple[str, ...]


@dataclass(frozen=True)
class ReceivedReport:
    """A received report as the publication job reads it back: the bytes and their header."""

    content: bytes
    cda: ReportCda


# ------------------------------------------------------------------------------ reading the CDA


def _parse(data: bytes) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True, load_dtd=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise ReceivedReportError(f"the CDA is not well-formed XML: {exc}"[:200]) from None
    if root.tag != f"{{{_CDA}}}ClinicalDocument":
        raise ReceivedReportError("the document is not a CDA R2 ClinicalDocument")
    return root


def is_imaging_report(data: bytes) -> bool:
    """Whether ``data`` is an imaging report CDA (LOINC 18748-4 or the CR-IMG template), to choose
    the flow (:func:`read_report` does the checks); :class:`ReceivedReportError` for an XML document
    that is not well-formed."""
    if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return False
    root = _parse(data)
    code = root.find("cda:code", _NS)
    templates = {t.get("root", "") for t in root.iterfind("cda:templateId", _NS)}
    return (code is not None and code.get("code") == IMAGING_REPORT_TYPE) or CR_IMG_TEMPLATE in templates


def cda_time(value: str) -> datetime | None:
    """A CDA TS (``YYYYMMDD[HH[MM[SS]]][.f][+/-ZZZZ]``) in UTC; without an offset, French local time."""
    text = (value or "").strip()
    offset: timezone | None = None
    for sign in ("+", "-"):
        head, found, zone = text.rpartition(sign)
        if found and len(head) >= 8 and len(zone) == 4 and zone.isdigit():
            minutes = int(zone[:2]) * 60 + int(zone[2:])
            offset = timezone((1 if sign == "+" else -1) * timedelta(minutes=minutes))
            text = head
            break
    digits = text.split(".")[0]
    if len(digits) < 8 or not digits.isdigit():
        return None
    try:
        moment = datetime.strptime(digits[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return moment.replace(tzinfo=offset or _LOCAL).astimezone(UTC)


def _text(element: etree._Element | None, path: str) -> str:
    return " ".join((element.findtext(path, "", _NS) or "").split()) if element is not None else ""


def _ii(element: etree._Element | None) -> str:
    """An II as an XDS uniqueId (ITI TF-3 §4.2.3.2.26): ``root`` or ``root^extension``."""
    if element is None or not element.get("root"):
        return ""
    extension = element.get("extension", "")
    return f"{element.get('root')}^{extension}" if extension else str(element.get("root"))


def _professional(entity: etree._Element | None, what: str) -> Professional:
    """assignedAuthor / assignedEntity: the IDNPS id (root 1.2.250.1.71.4.2.1), name, specialty."""
    if entity is None:
        raise ReceivedReportError(f"the CDA has no {what}", code="101")
    national_id = next(
        (i.get("extension", "") for i in entity.iterfind("cda:id", _NS) if i.get("root") == OID_IDNPS), ""
    )
    if not national_id:
        raise ReceivedReportError(
            f"the CDA {what} has no national id (id root {OID_IDNPS}, RPPS)", code="101"
        )
    person = entity.find("cda:assignedPerson/cda:name", _NS)
    code = entity.find("cda:code", _NS)
    organisation = entity.find("cda:representedOrganization", _NS)
    organisation_id = ""
    if organisation is not None:
        organisation_id = next(
            (
                i.get("extension", "")
                for i in organisation.iterfind("cda:id", _NS)
                if i.get("root") == OID_IDNST
            ),
            "",
        )
    return Professional(
        national_id=national_id,
        family=_text(person, "cda:family").upper(),
        given=" ".join(g.text.strip() for g in person.iterfind("cda:given", _NS) if g.text)
        if person is not None
        else "",
        specialty=Code(code.get("code", ""), code.get("codeSystem", ""), code.get("displayName", ""))
        if code is not None and code.get("code") and code.get("codeSystem")
        else None,
        organisation_name=_text(organisation, "cda:name"),
        organisation_id=organisation_id,
    )


def _event_codes(events: list[etree._Element]) -> tuple[Code, ...]:
    """The modality (DCM) and anatomy (SNOMED CT) translations of the serviceEvent codes."""
    codes: list[Code] = []
    for event in events:
        for translation in event.iterfind("cda:code/cda:translation", _NS):
            system = translation.get("codeSystem", "")
            if system in (DCM_SYSTEM, SNOMED_SYSTEM) and translation.get("code"):
                code = Code(str(translation.get("code")), system, translation.get("displayName", "") or "")
                if code not in codes:
                    codes.append(code)
    return tuple(codes)


def read_report(data: bytes) -> ReportCda:
    """The header of a received imaging report CDA; :class:`ReceivedReportError` when it is not one
    or lacks what the DMP needs (document id, the patient's INS, an author with an RPPS id)."""
    root = _parse(data)
    code = root.find("cda:code", _NS)
    type_code = code.get("code", "") if code is not None else ""
    templates = {t.get("root", "") for t in root.iterfind("cda:templateId", _NS)}
    cr_img = CR_IMG_TEMPLATE in templates
    if type_code != IMAGING_REPORT_TYPE and not cr_img:
        raise ReceivedReportError(
            f"the CDA is not an imaging report (code {type_code or 'absent'}, LOINC {IMAGING_REPORT_TYPE} "
            "or templateId 1.2.250.1.213.1.1.1.45 expected)",
            code="103",
        )
    unique_id = _ii(root.find("cda:id", _NS))
    if not unique_id:
        raise ReceivedReportError("the CDA has no document id (ClinicalDocument/id)", code="101")
    structured = root.find("cda:component/cda:structuredBody", _NS) is not None
    body = root.find("cda:component/cda:nonXMLBody/cda:text", _NS)
    if not structured and (body is None or body.get("mediaType") != "application/pdf"):
        raise ReceivedReportError(
            "the CDA has neither a structuredBody nor a nonXMLBody carrying a PDF", code="102"
        )
    patient_ins = next(
        (
            (str(i.get("extension")), str(i.get("root")))
            for i in root.iterfind("cda:recordTarget/cda:patientRole/cda:id", _NS)
            if is_ins_oid(i.get("root", "")) and i.get("extension")
        ),
        None,
    )
    if patient_ins is None:
        raise ReceivedReportError("the CDA recordTarget carries no INS", code="101")
    version_text = root.find("cda:versionNumber", _NS)
    try:
        version = int(version_text.get("value", "1")) if version_text is not None else 1
    except ValueError:
        raise ReceivedReportError("the CDA versionNumber is not an integer") from None
    effective = root.find("cda:effectiveTime", _NS)
    legal = root.find("cda:legalAuthenticator/cda:assignedEntity", _NS)
    orders = tuple(
        OrderRef(
            placer_number=(placer.get("extension", "") if placer is not None else ""),
            placer_authority=(placer.get("root", "") if placer is not None else ""),
            accession_number=(accession.get("extension", "") if accession is not None else ""),
            accession_authority=(accession.get("root", "") if accession is not None else ""),
        )
        for order in root.iterfind("cda:inFulfillmentOf/cda:order", _NS)
        for placer, accession in [(order.find("cda:id", _NS), order.find("ps3-20:accessionNumber", _NS))]
    )
    events = list(root.iterfind("cda:documentationOf/cda:serviceEvent", _NS))
    study_uids = tuple(
        str(i.get("root"))
        for event in events
        for i in event.iterfind("cda:id", _NS)
        if i.get("root") and not i.get("extension")
    )
    lows = [t for e in events if (t := cda_time(_attr(e, "cda:effectiveTime/cda:low"))) is not None]
    highs = [t for e in events if (t := cda_time(_attr(e, "cda:effectiveTime/cda:high"))) is not None]
    replaces = tuple(
        _ii(parent)
        for related in root.iterfind("cda:relatedDocument", _NS)
        if related.get("typeCode") == "RPLC"
        for parent in related.iterfind("cda:parentDocument/cda:id", _NS)
        if _ii(parent)
    )
    return ReportCda(
        unique_id=unique_id,
        set_id=_ii(root.find("cda:setId", _NS)) or unique_id,
        version=version,
        type_code=type_code,
        title=_text(root, "cda:title"),
        effective_time=cda_time(effective.get("value", "") if effective is not None else ""),
        structured=structured,
        cr_img=cr_img,
        patient_ins=patient_ins,
        author=_professional(root.find("cda:author/cda:assignedAuthor", _NS), "author"),
        legal_authenticator=_professional(legal, "legalAuthenticator") if legal is not None else None,
        orders=orders,
        study_uids=study_uids,
        service_start=min(lows) if lows else None,
        service_stop=max(highs) if highs else None,
        event_codes=_event_codes(events),
        replaces=replaces,
    )


def _attr(element: etree._Element, path: str) -> str:
    found = element.find(path, _NS)
    return found.get("value", "") if found is not None else ""


# ---------------------------------------------------------------------------------- reception


@dataclass(frozen=True)
class Exam:
    """The exam a received report is about, as the message names it (IPC, OBR, ORC) and the CDA
    completes it: the Study Instance UID, the accession number and its issuer, the request."""

    study_uid: str
    accession_number: str = ""
    accession_authority: str = ""
    request_id: int | None = None


def _previous(session: Session, organisation: str, cda: ReportCda) -> DmpDocument | None:
    """The version this one replaces: the latest of the same setId, else the entry its
    relatedDocument RPLC names."""
    previous = session.scalar(
        select(DmpDocument)
        .where(
            DmpDocument.organisation_code == organisation,
            DmpDocument.kind == KIND_REPORT,
            DmpDocument.set_id == cda.set_id,
        )
        .order_by(DmpDocument.version.desc(), DmpDocument.id.desc())
        .limit(1)
    )
    if previous is None and cda.replaces:
        previous = session.scalar(
            select(DmpDocument)
            .where(
                DmpDocument.organisation_code == organisation,
                DmpDocument.kind == KIND_REPORT,
                DmpDocument.unique_id.in_(cda.replaces),
            )
            .order_by(DmpDocument.id.desc())
            .limit(1)
        )
    return previous


def receive_report(
    session: Session,
    store: BlobStore,
    *,
    site_code: str,
    content: bytes,
    cda: ReportCda,
    identity: PatientIdentity,
    exam: Exam,
    principal: Principal,
    source: str,
) -> list[DmpDocument]:
    """Keep a report received from the site's RIS and queue its DMP publication (module docstring)
    in the caller's transaction; the new document entries (none when this version is known already).
    :class:`ReceivedReportError` when the site does not publish through simral, the CDA's patient is
    not ``identity`` or the version is older than the one known."""
    organisation = publishing_organisation(session, site_code)
    if organisation is None:
        raise ReceivedReportError(f"simral does not publish to the DMP for {site_code}", code="207")
    code = organisation.organisation_code
    if (
        cda.patient_ins is not None
        and identity.ins_matricule
        and ((identity.ins_matricule, identity.ins_oid) != cda.patient_ins)
    ):
        raise ReceivedReportError("the CDA recordTarget INS is not the INS of the message's PID", code="204")
    known = session.scalar(
        select(DmpDocument).where(
            DmpDocument.organisation_code == code, DmpDocument.unique_id == cda.unique_id
        )
    )
    if known is not None:
        return []
    previous = _previous(session, code, cda)
    if previous is not None and previous.set_id == cda.set_id and previous.version >= cda.version:
        raise ReceivedReportError(
            f"version {cda.version} of the document is not newer than version {previous.version}",
            code="102",
        )
    key = f"{KEY_PREFIX}/{code}/{uuid.uuid4().hex}.xml"
    blob = store.put_stream(key, io.BytesIO(content))
    report = DmpDocument(
        organisation_code=code,
        kind=KIND_REPORT,
        study_uid=exam.study_uid,
        request_id=exam.request_id,
        identity_id=identity.id,
        source=source[:64],
        version=cda.version,
        unique_id=cda.unique_id,
        set_id=cda.set_id,
        entry_uuid=new_entry_uuid(),
        replaces_id=previous.id if previous is not None else None,
        state=DMP_PENDING,
        content_key=key,
        content_sha256=blob.sha256,
        size=blob.size,
        accession_number=exam.accession_number,
        accession_authority=exam.accession_authority,
    )
    documents = [report]
    manifest = manifest_document(session, code, exam.study_uid, request_id=exam.request_id)
    if manifest is not None:
        manifest.identity_id = identity.id
        manifest.source = report.source
        manifest.accession_number = exam.accession_number
        manifest.accession_authority = exam.accession_authority
        documents.append(manifest)
    session.add_all(documents)
    session.flush()
    enqueue_documents(session, documents)
    audit.record(
        session,
        action="dmp.report-received",
        principal=principal,
        study_uid=exam.study_uid,
        patient_id=identity.ins_matricule or identity.local_id,
        patient_issuer=identity.ins_oid,
        detail={
            "organisation": code,
            "source": report.source,
            "document": report.id,
            "version": cda.version,
            "replaces": previous.id if previous is not None else None,
            "manifest": manifest.id if manifest is not None else None,
            "request": exam.request_id,
            "sha256": blob.sha256,
            "size": blob.size,
        },
    )
    return documents


# --------------------------------------------------------------------------------- read back


def report_document(session: Session, documents: list[DmpDocument]) -> DmpDocument | None:
    """The received report of a lot: its report entry, else (a manifest alone) the latest received
    report of the same study and organisation."""
    for document in documents:
        if document.kind == KIND_REPORT and document.content_key:
            return document
    first = documents[0]
    return session.scalar(
        select(DmpDocument)
        .where(
            DmpDocument.organisation_code == first.organisation_code,
            DmpDocument.study_uid == first.study_uid,
            DmpDocument.kind == KIND_REPORT,
            DmpDocument.content_key != "",
        )
        .order_by(DmpDocument.id.desc())
        .limit(1)
    )


def load(store: BlobStore, document: DmpDocument) -> ReceivedReport:
    """The received CDA of ``document`` (bytes as received) and its header."""
    with store.open(document.content_key) as stream:
        content = stream.read()
    return ReceivedReport(content, read_report(content))


def indexed_blobs(session: Session) -> list[tuple[str, int, str]]:
    """(key, size, SHA-256) of every received report blob, for ``simral check``."""
    query = select(DmpDocument.content_key, DmpDocument.size, DmpDocument.content_sha256).where(
        DmpDocument.content_key != ""
    )
    return [(key, size, sha256) for key, size, sha256 in session.execute(query)]
