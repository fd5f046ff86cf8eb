"""XDS.b metadata as ebRIM 3.0 (IHE ITI TF-3 §4.2 "ebXML Registry Package", §4.1 attributes) for the
DMP (ANS CI-SIS "Volet Partage de Documents de Santé", DMP integration guide) and DRIM-M.

Builds the ``xds-b:ProvideAndRegisterDocumentSetRequest`` of ITI-41 (ITI TF-2b §3.41.4.1) — one
SubmissionSet, its DocumentEntries, the IHE DSG signature document of the submission and the
associations (HasMember, ``signs``, RPLC) — and the ``lcm:SubmitObjectsRequest`` of ITI-57 (ITI TF-2b
§3.57.4.1, availability status change). Pure translation: no database, no I/O.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from lxml import etree

from simral.xds.xades import SigningIdentity, sign_documents

# --------------------------------------------------------------------------- namespaces

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XOP = "http://www.w3.org/2004/08/xop/include"
NSMAP = {"rim": RIM, "lcm": LCM, "rs": RS, "xdsb": XDSB}

# --------------------------------------------------------------------------- ITI TF-3 Table 4.2.5-1 UUIDs

OBJECT_TYPE_STABLE_DOCUMENT = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_FACILITY_TYPE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE_SETTING = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_EVENT = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"

HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
SIGNS = "urn:ihe:iti:2007:AssociationType:signs"
UPDATE_AVAILABILITY_STATUS = "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"

STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
STATUS_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
#: DMP-specific availability statuses (CI-SIS JDV J52): logical deletion and archiving.
STATUS_DELETED = "urn:asip:ci-sis:2010:StatusType:Deleted"
STATUS_ARCHIVED = "urn:asip:ci-sis:2010:StatusType:Archived"

# referenceIdList ID types (ITI TF-3 §4.2.3.2.28, CXi component 5)
REF_ACCESSION = "urn:ihe:iti:xds:2013:accession"
REF_ORDER = "urn:ihe:iti:xds:2013:order"
REF_STUDY_UID = "urn:ihe:iti:xds:2016:studyInstanceUID"

#: Assigning authorities of French professional (IDNPS) and structure (IDNST) identifiers.
OID_IDNPS = "1.2.250.1.71.4.2.1"
OID_IDNST = "1.2.250.1.71.4.2.2"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Code:
    """A coded value (ebRIM Classification ``nodeRepresentation`` + ``codingScheme`` slot + Name)."""

    code: str
    scheme: str
    display: str

    def ce(self) -> str:
        """``code^display^scheme``, the CE form of authorRole / authorSpecialty values."""
        return f"{self.code}^{self.display}^{self.scheme}"


@dataclass(frozen=True)
class Author:
    """A health professional and their structure (ITI TF-3 §4.2.3.1.4 author, ANS IDNPS/IDNST)."""

    national_id: str  # IDNPS: "8" + RPPS
    family: str
    given: str
    role: Code | None
    specialty: Code | None
    institution_name: str
    institution_id: str  # IDNST: "1" + FINESS, "3" + SIRET (as the DMP wants it)

    def xcn(self) -> str:
        """The person as an XCN (authorPerson, legalAuthenticator)."""
        return f"{self.national_id}^{self.family}^{self.given}^^^^^^&{OID_IDNPS}&ISO^D^^^IDNPS"

    def xon(self) -> str:
        """The structure as an XON (authorInstitution)."""
        return f"{self.institution_name}^^^^^&{OID_IDNST}&ISO^IDNST^^^{self.institution_id}"


@dataclass(frozen=True)
class ReferenceId:
    """One referenceIdList value (CXi): an accession number, an order or a Study Instance UID."""

    value: str
    authority_oid: str
    id_type: str  # REF_ACCESSION | REF_ORDER | REF_STUDY_UID

    def cxi(self) -> str:
        return f"{self.value}^^^&{self.authority_oid}&ISO^{self.id_type}"


@dataclass(frozen=True)
class DocumentEntry:
    """One document and its XDSDocumentEntry attributes (ITI TF-3 Table 4.3.1-3)."""

    entry_uuid: str  # "urn:uuid:..."
    unique_id: str  # OID (CDA id / KOS SOP Instance UID)
    mime_type: str
    content: bytes
    title: str
    class_code: Code
    type_code: Code
    format_code: Code
    confidentiality: tuple[Code, ...]
    healthcare_facility_type: Code
    practice_setting: Code
    event_codes: tuple[Code, ...]
    reference_ids: tuple[ReferenceId, ...]
    creation_time: dt.datetime
    service_start: dt.datetime | None
    service_stop: dt.datetime | None
    language: str  # "fr-FR"
    author: Author
    legal_authenticator: Author | None
    patient_id: str  # INS: "matricule^^^&OID&ISO^NH"
    source_patient_id: str  # "id^^^&OID&ISO^PI"
    source_patient_info: tuple[str, ...]  # "PID-5|NOM^Prénom^^^^^L", "PID-7|YYYYMMDD", "PID-8|F"
    replaces_entry_uuid: str | None = None  # RPLC target (ITI TF-3 §4.2.2.2)
    comments: str | None = None

    @property
    def sha1(self) -> str:
        """The ``hash`` slot: SHA-1 of the content, hexadecimal (ITI TF-3 §4.2.3.2.11)."""
        return hashlib.sha1(self.content).hexdigest().upper()


@dataclass(frozen=True)
class SubmissionSet:
    """The XDSSubmissionSet (ITI TF-3 Table 4.3.1-2)."""

    unique_id: str
    source_id: str
    submission_time: dt.datetime
    author: Author
    content_type_code: Code
    title: str
    entry_uuid: str = field(default_factory=lambda: f"urn:uuid:{uuid.uuid4()}")
    comments: str | None = None


@dataclass(frozen=True)
class ProvideAndRegister:
    """An ITI-41 request body and its MTOM attachments (Content-ID without brackets → bytes)."""

    request: etree._Element
    attachments: dict[str, bytes]
    signature_entry: DocumentEntry | None  # the XAdES signature document's entry, when signed


# --------------------------------------------------------------------------- codes for the DMP

#: IHE DSG signature document entry (CI-SIS "signature du lot de soumission", DRIM-M XDS.xml sample).
SIGNATURE_CLASS = Code("urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1", "URN", "Digital Signature")
SIGNATURE_TYPE = Code("E1762", "ASTM", "Full Document")
SIGNATURE_FORMAT = Code("http://www.w3.org/2000/09/xmldsig#", "URN", "Default Signature Style")
SIGNATURE_PURPOSE_SOURCE = Code("1.2.840.10065.1.12.1.14", "1.2.840.10065.1.12", "Source")
CONFIDENTIALITY_NORMAL = Code("N", "2.16.840.1.113883.5.25", "Normal")

REPORT_CLASS = Code("10", "1.2.250.1.213.1.1.4.1", "Compte rendu")
REPORT_TYPE = Code("18748-4", "2.16.840.1.113883.6.1", "CR d'imagerie médicale")
REPORT_FORMAT_STRUCTURED = Code(
    "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013", "1.3.6.1.4.1.19376.1.2.3", "CR d'imagerie"
)
REPORT_FORMAT_PDF = Code(
    "urn:ihe:iti:xds-sd:pdf:2008", "1.3.6.1.4.1.19376.1.2.3", "Document à corps non structuré en PDF"
)
KOS_CLASS = Code("31", "1.2.250.1.213.1.1.4.1", "Imagerie médicale")
KOS_TYPE = Code("IMG-KOS", "1.2.250.1.213.1.1.4.12", "Reference d'objets d'un examen d'imagerie")
KOS_FORMAT = Code(
    "1.2.840.10008.5.1.4.1.1.88.59",
    "1.2.840.10008.2.6.1",
    "Document de Références d'objets d'imagerie selon profil IHE RAD XDS-I",
)


# --------------------------------------------------------------------------- helpers


def dtm(value: dt.datetime) -> str:
    """An XDS DTM in UTC, to the second (ITI TF-3 §4.2.3.1.6)."""
    if value.tzinfo is None:
        raise ValueError("XDS times must be timezone-aware")
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def new_uuid_urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def uuid_oid() -> str:
    """A fresh OID under 2.25 (ITU-T X.667): a unique id that collides with no site's OID arc."""
    return f"2.25.{uuid.uuid4().int}"


def _rim(tag: str) -> str:
    return f"{{{RIM}}}{tag}"


class _Ids:
    """Local ids for Classification / ExternalIdentifier / Association elements."""

    def __init__(self) -> None:
        self._n = 0

    def __call__(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"


def _slot(parent: etree._Element, name: str, values: Iterable[str]) -> etree._Element:
    slot = etree.SubElement(parent, _rim("Slot"), name=name)
    value_list = etree.SubElement(slot, _rim("ValueList"))
    for value in values:
        etree.SubElement(value_list, _rim("Value")).text = value
    return slot


def _localized(parent: etree._Element, tag: str, text: str) -> None:
    holder = etree.SubElement(parent, _rim(tag))
    etree.SubElement(holder, _rim("LocalizedString"), charset="UTF-8", value=text)
    holder[0].set("{http://www.w3.org/XML/1998/namespace}lang", "fr-FR")


def _coded(parent: etree._Element, scheme: str, obj_id: str, code: Code, ids: _Ids) -> None:
    cl = etree.SubElement(
        parent,
        _rim("Classification"),
        classificationScheme=scheme,
        classifiedObject=obj_id,
        id=ids("cl"),
        nodeRepresentation=code.code,
    )
    _slot(cl, "codingScheme", [code.scheme])
    _localized(cl, "Name", code.display)


def _author(parent: etree._Element, scheme: str, obj_id: str, author: Author, ids: _Ids) -> None:
    cl = etree.SubElement(
        parent,
        _rim("Classification"),
        classificationScheme=scheme,
        classifiedObject=obj_id,
        id=ids("cl"),
        nodeRepresentation="",
    )
    _slot(cl, "authorPerson", [author.xcn()])
    _slot(cl, "authorInstitution", [author.xon()])
    if author.role is not None:
        _slot(cl, "authorRole", [author.role.ce()])
    if author.specialty is not None:
        _slot(cl, "authorSpecialty", [author.specialty.ce()])


def _external_id(parent: etree._Element, scheme: str, obj_id: str, value: str, name: str, ids: _Ids) -> None:
    ei = etree.SubElement(
        parent,
        _rim("ExternalIdentifier"),
        id=ids("ei"),
        identificationScheme=scheme,
        registryObject=obj_id,
        value=value,
    )
    _localized(ei, "Name", name)


def _association(
    parent: etree._Element, kind: str, source: str, target: str, ids: _Ids, **slots: str
) -> etree._Element:
    association = etree.SubElement(
        parent,
        _rim("Association"),
        associationType=kind,
        id=new_uuid_urn(),
        sourceObject=source,
        targetObject=target,
    )
    for name, value in slots.items():
        _slot(association, name, [value])
    return association


def _submission_set(parent: etree._Element, submission: SubmissionSet, patient_id: str, ids: _Ids) -> None:
    ss_id = submission.entry_uuid
    package = etree.SubElement(parent, _rim("RegistryPackage"), id=ss_id)
    _slot(package, "submissionTime", [dtm(submission.submission_time)])
    _localized(package, "Name", submission.title)
    if submission.comments:
        _localized(package, "Description", submission.comments)
    _author(package, SS_AUTHOR, ss_id, submission.author, ids)
    _coded(package, SS_CONTENT_TYPE, ss_id, submission.content_type_code, ids)
    etree.SubElement(
        package,
        _rim("Classification"),
        classificationNode=SUBMISSION_SET_NODE,
        classifiedObject=ss_id,
        id=ids("cl"),
    )
    _external_id(package, SS_PATIENT_ID, ss_id, patient_id, "XDSSubmissionSet.patientId", ids)
    _external_id(package, SS_SOURCE_ID, ss_id, submission.source_id, "XDSSubmissionSet.sourceId", ids)
    _external_id(package, SS_UNIQUE_ID, ss_id, submission.unique_id, "XDSSubmissionSet.uniqueId", ids)


def _document_entry(
    parent: etree._Element, entry: DocumentEntry, submission_time: dt.datetime, ids: _Ids
) -> None:
    """ExtrinsicObject in ebRIM order: Slot*, Name, Description, Classification*, ExternalIdentifier*."""
    eo_id = entry.entry_uuid
    eo = etree.SubElement(
        parent,
        _rim("ExtrinsicObject"),
        id=eo_id,
        mimeType=entry.mime_type,
        objectType=OBJECT_TYPE_STABLE_DOCUMENT,
    )
    _slot(eo, "hash", [entry.sha1])
    _slot(eo, "size", [str(len(entry.content))])
    _slot(eo, "creationTime", [dtm(entry.creation_time)])
    _slot(eo, "submissionTime", [dtm(submission_time)])
    _slot(eo, "languageCode", [entry.language])
    if entry.legal_authenticator is not None:
        _slot(eo, "legalAuthenticator", [entry.legal_authenticator.xcn()])
    if entry.service_start is not None:
        _slot(eo, "serviceStartTime", [dtm(entry.service_start)])
    if entry.service_stop is not None:
        _slot(eo, "serviceStopTime", [dtm(entry.service_stop)])
    _slot(eo, "sourcePatientId", [entry.source_patient_id])
    if entry.source_patient_info:
        _slot(eo, "sourcePatientInfo", entry.source_patient_info)
    if entry.reference_ids:
        _slot(eo, "urn:ihe:iti:xds:2013:referenceIdList", [r.cxi() for r in entry.reference_ids])
    _localized(eo, "Name", entry.title)
    if entry.comments:
        _localized(eo, "Description", entry.comments)
    _author(eo, DE_AUTHOR, eo_id, entry.author, ids)
    _coded(eo, DE_CLASS, eo_id, entry.class_code, ids)
    _coded(eo, DE_TYPE, eo_id, entry.type_code, ids)
    for code in entry.confidentiality:
        _coded(eo, DE_CONFIDENTIALITY, eo_id, code, ids)
    _coded(eo, DE_FORMAT, eo_id, entry.format_code, ids)
    _coded(eo, DE_FACILITY_TYPE, eo_id, entry.healthcare_facility_type, ids)
    _coded(eo, DE_PRACTICE_SETTING, eo_id, entry.practice_setting, ids)
    for code in entry.event_codes:
        _coded(eo, DE_EVENT, eo_id, code, ids)
    _external_id(eo, DE_PATIENT_ID, eo_id, entry.patient_id, "XDSDocumentEntry.patientId", ids)
    _external_id(eo, DE_UNIQUE_ID, eo_id, entry.unique_id, "XDSDocumentEntry.uniqueId", ids)


def signature_entry(
    submission: SubmissionSet, documents: Sequence[DocumentEntry], content: bytes, *, unique_id: str
) -> DocumentEntry:
    """The DocumentEntry of the submission's signature document (IHE DSG §5.5.6.1, as in DRIM-M XDS.xml):
    class "Digital Signature", type E1762, format xmldsig, event "Source", language ``art``."""
    first = documents[0]
    references: list[ReferenceId] = []
    for document in documents:
        references.extend(r for r in document.reference_ids if r not in references)
    return DocumentEntry(
        entry_uuid=new_uuid_urn(),
        unique_id=unique_id,
        mime_type="text/xml",
        content=content,
        title="Source",
        class_code=SIGNATURE_CLASS,
        type_code=SIGNATURE_TYPE,
        format_code=SIGNATURE_FORMAT,
        confidentiality=(CONFIDENTIALITY_NORMAL,),
        healthcare_facility_type=first.healthcare_facility_type,
        practice_setting=first.practice_setting,
        event_codes=(SIGNATURE_PURPOSE_SOURCE,),
        reference_ids=tuple(references),
        creation_time=submission.submission_time,
        service_start=submission.submission_time,
        service_stop=submission.submission_time,
        language="art",
        author=submission.author,
        legal_authenticator=submission.author,
        patient_id=first.patient_id,
        source_patient_id=first.patient_id,
        source_patient_info=(),
    )


def provide_and_register_request(
    submission: SubmissionSet, documents: Sequence[DocumentEntry], signature: DocumentEntry | None
) -> ProvideAndRegister:
    """The ITI-41 body (ITI TF-2b §3.41.4.1.2): SubmitObjectsRequest + one ``xdsb:Document`` per entry,
    each an ``xop:Include`` of its MTOM attachment."""
    if not documents:
        raise ValueError("ITI-41: a submission needs at least one document")
    patients = {d.patient_id for d in documents}
    if len(patients) != 1:
        raise ValueError("ITI-41: all documents of a submission share one patientId (ITI TF-3 §4.1.4)")
    patient_id = patients.pop()
    entries = [*documents, *([signature] if signature is not None else [])]
    ids = _Ids()
    request = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap=NSMAP)
    submit = etree.SubElement(request, f"{{{LCM}}}SubmitObjectsRequest")
    objects = etree.SubElement(submit, _rim("RegistryObjectList"))
    _submission_set(objects, submission, patient_id, ids)
    for entry in entries:
        _document_entry(objects, entry, submission.submission_time, ids)
    for entry in entries:
        _association(
            objects, HAS_MEMBER, submission.entry_uuid, entry.entry_uuid, ids, SubmissionSetStatus="Original"
        )
    for entry in entries:
        if entry.replaces_entry_uuid is not None:
            _association(objects, RPLC, entry.entry_uuid, entry.replaces_entry_uuid, ids)
    if signature is not None:
        _association(
            objects, SIGNS, signature.entry_uuid, submission.entry_uuid, ids, SubmissionSetStatus="Original"
        )
    attachments: dict[str, bytes] = {}
    for n, entry in enumerate(entries, start=1):
        cid = f"doc{n}.{uuid.uuid4().hex}@simral"
        attachments[cid] = entry.content
        document = etree.SubElement(request, f"{{{XDSB}}}Document", id=entry.entry_uuid)
        etree.SubElement(document, f"{{{XOP}}}Include", nsmap={"xop": XOP}, href=f"cid:{cid}")
    return ProvideAndRegister(request=request, attachments=attachments, signature_entry=signature)


def availability_status_update(
    submission: SubmissionSet, patient_id: str, entry_uuid: str, *, original_status: str, new_status: str
) -> etree._Element:
    """ITI-57 Update Document Set (ITI TF-3 §4.1.16.4 / §4.2.2.3 UpdateAvailabilityStatus): a new
    SubmissionSet and an association from it to the DocumentEntry carrying the status change. For the
    DMP: ``STATUS_DELETED`` (TD3.3c logical deletion), ``STATUS_ARCHIVED`` / ``STATUS_APPROVED``."""
    ids = _Ids()
    submit = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap=NSMAP)
    objects = etree.SubElement(submit, _rim("RegistryObjectList"))
    _submission_set(objects, submission, patient_id, ids)
    _association(
        objects,
        UPDATE_AVAILABILITY_STATUS,
        submission.entry_uuid,
        entry_uuid,
        ids,
        OriginalStatus=original_status,
        NewStatus=new_status,
    )
    return submit


def metadata_update(
    submission: SubmissionSet, entry: DocumentEntry, *, logical_id: str, previous_version: str
) -> etree._Element:
    """ITI-57 Update DocumentEntry Metadata (ITI TF-3 §4.2.2.2.1 / §4.1.16.2): a new version of the
    entry (same logicalId, new entryUUID) with its changed attributes — for the DMP, masking to
    professionals / patient visibility through the confidentialityCode values ``MASQUE_PS``,
    ``INVISIBLE_PATIENT`` (JDV J08, 1.2.250.1.213.1.1.4.13)."""
    ids = _Ids()
    new_version = replace(entry, entry_uuid=new_uuid_urn(), replaces_entry_uuid=None)
    submit = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap=NSMAP)
    objects = etree.SubElement(submit, _rim("RegistryObjectList"))
    _submission_set(objects, submission, entry.patient_id, ids)
    _document_entry(objects, new_version, submission.submission_time, ids)
    objects[-1].set("lid", logical_id)
    _association(
        objects,
        HAS_MEMBER,
        submission.entry_uuid,
        new_version.entry_uuid,
        ids,
        SubmissionSetStatus="Original",
        PreviousVersion=previous_version,
    )
    return submit


def provide_and_register(
    submission: SubmissionSet, documents: Sequence[DocumentEntry], *, signer: SigningIdentity
) -> ProvideAndRegister:
    """The complete ITI-41 request: the documents, the XAdES signature document over them (IHE DSG,
    :mod:`simral.xds.xades`) as one more entry, its ``signs`` association, HasMember and RPLC."""
    if not documents:
        raise ValueError("ITI-41: a submission needs at least one document")
    content = sign_documents([(d.unique_id, d.content) for d in documents], signer)
    signature = signature_entry(submission, documents, content, unique_id=uuid_oid())
    return provide_and_register_request(submission, documents, signature)
