"""Documents attached to an imaging request: the request document and prior documents
(DESIGN.md §7, flux 1 TransmissionDemandeIMG: "attached request document and prior documents").

A document arrives as bytes, from the site's RIS (an HL7 OBX of type ED, read by
:mod:`simral.hl7.orders`) or from the portal request form (a PDF upload). Whatever brought it:

- :func:`read_document` checks it: a PDF (it starts with ``%PDF-``, ISO 32000-2 §7.5.2), or a CDA R2
  level 1 document whose ``nonXMLBody`` carries a PDF in base64 (CI-SIS "structuration minimale",
  the shape the ANS volet "Transmission de documents CDA-R2 en HL7 v2" carries), whose PDF is kept;
  at most ``request_document_max_bytes``. Anything else is refused (:class:`ReadingError` 102);
- :func:`attach_documents` writes each document durably to the blob store under ``documents/…``
  (the same store as DICOM blobs, DESIGN.md §3 step 3) and records its metadata in
  :class:`RequestDocument` (kind, title, date, media type, size, SHA-256) in the caller's
  transaction, audited; a rolled-back transaction leaves only an orphan blob, swept by
  ``simral check``;
- :func:`get_document` / :func:`open_document`: who may see the request (its site, its group's
  radiologists, :func:`simral.reading.service.get_request`) may read its documents; each read is
  audited (PHI access).

Kinds (:data:`KINDS`): ``demande`` (the request letter), ``anteriorite`` (a prior report), ``autre``.
:func:`kind_of_type` maps the document type code (LOINC, JDV J07 XdsTypeCode): 55115-0 "Demande
d'actes d'imagerie" and 75496-0 "Demande d'acte de télémédecine" are requests, imaging report codes
are priors, anything else is ``autre``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import BinaryIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lxml import etree
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_request_exam
from simral.db.base import utcnow
from simral.reading.models import ImagingRequest, RequestDocument
from simral.reading.service import ReadingError, audit_request, get_request
from simral.storage.base import BlobStore

KIND_REQUEST = "demande"
KIND_PRIOR = "anteriorite"
KIND_OTHER = "autre"
KINDS = (KIND_REQUEST, KIND_PRIOR, KIND_OTHER)

PDF = "application/pdf"
PDF_MAGIC = b"%PDF-"
#: Document type codes (LOINC; JDV J07 XdsTypeCode and imaging report types) by kind.
REQUEST_TYPES = frozenset({"55115-0", "75496-0"})
PRIOR_TYPES = frozenset({"18748-4", "11528-7", "18726-0", "18782-3", "68604-8"})
#: Key namespace of request documents in the blob store.
KEY_PREFIX = "documents/requests"

try:
    _LOCAL = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - systems without tzdata
    _LOCAL = ZoneInfo("UTC")

_CDA = "urn:hl7-org:v3"
_NS = {"cda": _CDA}


@dataclass(frozen=True)
class DocumentUpload:
    """A checked document waiting to be attached (:func:`read_document` makes them)."""

    data: bytes
    kind: str
    title: str = ""
    document_date: datetime | None = None
    media_type: str = PDF
    #: The document type code as sent (LOINC ``code^display^system``'s code), if any.
    type_code: str = ""


def kind_of_type(code: str) -> str:
    """The kind of a document from its type code (LOINC, JDV J07)."""
    code = code.strip()
    if code in REQUEST_TYPES:
        return KIND_REQUEST
    if code in PRIOR_TYPES:
        return KIND_PRIOR
    return KIND_OTHER


def decoded_size(encoded_length: int) -> int:
    """The largest byte count ``encoded_length`` base64 characters decode to (to refuse an oversize
    document before decoding it)."""
    return encoded_length * 3 // 4


def _cda_date(value: str) -> datetime | None:
    """A CDA TS (``YYYYMMDD[HHMM[SS]][.f][+/-ZZZZ]``) in UTC; without an offset, French local time."""
    found = re.match(r"(\d{8,14})(?:\.\d+)?([+-]\d{4})?$", (value or "").strip())
    if found is None:
        return None
    try:
        moment = datetime.strptime(found.group(1).ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    if found.group(2):
        sign = -1 if found.group(2)[0] == "-" else 1
        minutes = int(found.group(2)[1:3]) * 60 + int(found.group(2)[3:5])
        return moment.replace(tzinfo=timezone(sign * timedelta(minutes=minutes))).astimezone(UTC)
    return moment.replace(tzinfo=_LOCAL).astimezone(UTC)


def _unwrap_cda(data: bytes, label: str) -> tuple[bytes, str, datetime | None, str]:
    """The PDF a CDA R2 level 1 document carries (``component/nonXMLBody/text`` with
    ``mediaType="application/pdf"`` and ``representation="B64"``), its title, date and type code."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True, load_dtd=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError:
        text = f"{label}: neither a PDF nor a well-formed XML (CDA R2) document"
        raise ReadingError(text, code="102") from None
    if root.tag != f"{{{_CDA}}}ClinicalDocument":
        raise ReadingError(f"{label}: an XML document that is not a CDA R2 ClinicalDocument", code="102")
    text = root.find("cda:component/cda:nonXMLBody/cda:text", _NS)
    if text is None or text.get("mediaType") != PDF or text.get("representation") != "B64":
        raise ReadingError(
            f"{label}: only a CDA R2 level 1 document carrying a PDF (nonXMLBody, "
            'mediaType="application/pdf", representation="B64") is accepted',
            code="102",
        )
    try:
        pdf = base64.b64decode("".join((text.text or "").split()), validate=True)
    except binascii.Error:
        raise ReadingError(f"{label}: the CDA nonXMLBody is not valid base64", code="102") from None
    title = " ".join("".join(root.findtext("cda:title", "", _NS)).split())
    effective = root.find("cda:effectiveTime", _NS)
    code = root.find("cda:code", _NS)
    return (
        pdf,
        title,
        _cda_date(effective.get("value", "") if effective is not None else ""),
        code.get("code", "") if code is not None else "",
    )


def read_document(
    data: bytes,
    *,
    max_bytes: int,
    label: str,
    kind: str = "",
    title: str = "",
    document_date: datetime | None = None,
    type_code: str = "",
) -> DocumentUpload:
    """A checked document: a PDF, or the PDF of a CDA R2 level 1 document (its title replaces the
    caller's, its date and type code complete what the caller did not give); :class:`ReadingError`
    (102) otherwise. ``label``
    names the document in error messages (an HL7 location, a form field)."""
    if len(data) > max_bytes:
        raise ReadingError(
            f"{label}: the document is {len(data)} bytes, more than the {max_bytes} accepted", code="102"
        )
    if not data:
        raise ReadingError(f"{label}: the document is empty", code="102")
    if not data.startswith(PDF_MAGIC):
        if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
            raise ReadingError(f"{label}: not a PDF document (no %PDF- header)", code="102")
        data, cda_title, cda_date, cda_code = _unwrap_cda(data, label)
        if not data.startswith(PDF_MAGIC):
            text = f"{label}: the CDA document does not carry a PDF (no %PDF- header)"
            raise ReadingError(text, code="102")
        if len(data) > max_bytes:
            raise ReadingError(
                f"{label}: the PDF is {len(data)} bytes, more than the {max_bytes} accepted", code="102"
            )
        title = cda_title or title  # the document's own title, more precise than its type
        document_date = document_date or cda_date
        type_code = type_code or cda_code
    if kind not in KINDS:
        kind = kind_of_type(type_code)
    return DocumentUpload(
        data=data,
        kind=kind,
        title=" ".join(title.split())[:256],
        document_date=document_date,
        media_type=PDF,
        type_code=type_code[:32],
    )


def attach_documents(
    session: Session,
    store: BlobStore,
    request: ImagingRequest,
    documents: list[DocumentUpload],
    *,
    principal: Principal,
    source: str,
) -> list[RequestDocument]:
    """Store ``documents`` durably and record them on ``request`` (the caller's transaction): the
    requesting site's members (or its RIS) add documents to its requests."""
    if not may_request_exam(principal, request.site_code):
        raise AccessDenied(f"{principal.audit_name} may not add documents to requests of {request.site_code}")
    attached: list[RequestDocument] = []
    for upload in documents:
        key = f"{KEY_PREFIX}/{request.id}/{uuid.uuid4().hex}.pdf"
        blob = store.put_stream(key, io.BytesIO(upload.data))
        row = RequestDocument(
            request_id=request.id,
            kind=upload.kind,
            title=upload.title,
            document_date=upload.document_date,
            media_type=upload.media_type,
            type_code=upload.type_code,
            size=blob.size,
            sha256=blob.sha256,
            store=store.name,
            blob_key=key,
            source=source[:128],
            created_at=utcnow(),
        )
        session.add(row)
        attached.append(row)
    if attached:
        session.flush()
        audit_request(
            session,
            "imaging-request.document-add",
            request,
            principal=principal,
            detail={
                "documents": [
                    {"id": row.id, "kind": row.kind, "size": row.size, "sha256": row.sha256}
                    for row in attached
                ]
            },
        )
    return attached


def list_documents(session: Session, request_id: int) -> list[RequestDocument]:
    """The request's documents: the request document first, then by date (newest first)."""
    rows = session.scalars(select(RequestDocument).where(RequestDocument.request_id == request_id))
    order = {KIND_REQUEST: 0, KIND_PRIOR: 1, KIND_OTHER: 2}

    def key(row: RequestDocument) -> tuple[int, float, int]:
        when = row.document_date or row.created_at
        return order.get(row.kind, 3), -when.timestamp() if when else 0.0, row.id

    return sorted(rows, key=key)


def get_document(
    session: Session, request_id: int, document_id: int, *, principal: Principal
) -> tuple[ImagingRequest, RequestDocument]:
    """A document of a request ``principal`` may see (:func:`get_request`'s rule), the read audited.
    :class:`ReadingError` 204 when there is no such document."""
    request = get_request(session, request_id, principal=principal, audited=False)
    document = session.get(RequestDocument, document_id)
    if document is None or document.request_id != request.id:
        raise ReadingError(f"no document {document_id} on imaging request {request_id}", code="204")
    audit_request(
        session,
        "imaging-request.document-read",
        request,
        principal=principal,
        detail={"document": document.id, "kind": document.kind, "sha256": document.sha256},
    )
    return request, document


def open_document(store: BlobStore, document: RequestDocument) -> BinaryIO:
    """The document's bytes (the caller closes the stream)."""
    return store.open(document.blob_key)


def indexed_blobs(session: Session) -> Iterator[tuple[str, int, str]]:
    """(key, size, SHA-256) of every request document blob, for ``simral check``."""
    query = select(RequestDocument.blob_key, RequestDocument.size, RequestDocument.sha256)
    yield from ((key, size, sha256) for key, size, sha256 in session.execute(query))
