"""Documents attached to imaging requests and the desired delay, against a real ``simral serve
--hl7-port`` (DESIGN.md §7, flux 1 TransmissionDemandeIMG: "desired delay ... attached request
document and prior documents").

Site CHX's RIS sends an ORM^O01 (ANS Téléradiologie flux 1 shape, ANS test INS) carrying two PDFs
made with fpdf2 in OBX of type ED (the request letter, LOINC 55115-0; a prior imaging report,
18748-4) and wanting the answer within 3 hours (ORC-7.5): ACK AA, both documents kept with their
kind and SHA-256, the deadline is the 3 hours and not the contract's 12; the group's radiologist
and the site download the same bytes, a member of another site is refused, each download is in the
audit trail, ``simral check`` sees the blobs as indexed. A text file or a PDF over
``request_document_max_bytes`` in ED is refused (AE, ERR 102 at the OBX). A later ORU^R01 (the
CI-SIS CDA-R2 document flow the ANS guide names) adds a CDA R2 level 1 prior carrying a PDF. An IHE
OMI^O23 gives its delay in TQ1-8. The portal form of a site without a RIS uploads PDFs the same way.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fpdf import FPDF
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from sqlalchemy import select
from tests.simral_proc import SimralProcess
from tests.test_teleradiology_requests import (
    CHX_IPP_OID,
    CR,
    FS,
    PASSWORD,
    PLACER_OID,
    RIS_APP,
    RIS_FACILITY,
    VT,
    _header,
    _order_control,
    _patient,
    _segment,
)

from simral.app import open_app
from simral.archive.consistency import check
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import as_utc
from simral.patients.models import Hl7Message
from simral.reading.models import ImagingRequest, RequestDocument

MAX_BYTES = 64 * 1024
REQUEST_TYPE = "55115-0^Demande d'actes d'imagerie^LN"
PRIOR_TYPE = "18748-4^CR d'imagerie médicale^LN"


def make_pdf(title: str, *, lines: int = 3, compress: bool = True) -> bytes:
    """A real PDF (fpdf2): a title and ``lines`` lines of text."""
    document = FPDF()
    document.set_compression(compress)
    document.add_page()
    document.set_font("helvetica", size=12)
    document.cell(text=title, new_x="LMARGIN", new_y="NEXT")
    for n in range(lines):
        document.cell(
            text=f"Ligne {n + 1} : examen clinique sans particularité.", new_x="LMARGIN", new_y="NEXT"
        )
    return bytes(document.output())


REQUEST_PDF = make_pdf("Demande d'IRM cérébrale - Dr Hoda")
PRIOR_PDF = make_pdf("Compte rendu TDM cérébral du 12/03/2024", lines=6)


def cda_level1(pdf: bytes) -> bytes:
    """A minimal CDA R2 level 1 document (CI-SIS structuration minimale shape) carrying ``pdf``."""
    body = base64.b64encode(pdf).decode()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">'
        '<typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
        '<code code="18748-4" codeSystem="2.16.840.1.113883.6.1" displayName="CR d\'imagerie médicale"/>'
        "<title>CR radiographie thoracique</title>"
        '<effectiveTime value="20240115103000+0100"/>'
        '<component><nonXMLBody><text mediaType="application/pdf" representation="B64">'
        f"{body}</text></nonXMLBody></component></ClinicalDocument>"
    ).encode()


def _ed(data: bytes, subtype: str = "PDF") -> str:
    return f"^AP^{subtype}^Base64^{base64.b64encode(data).decode()}"


def order(
    control_id: str,
    placer: str,
    documents: list[tuple[str, str, str]],
    *,
    wanted_by: datetime | None = None,
) -> bytes:
    """ORM^O01 NW (flux 1 shape) with ``documents`` as OBX ED (type code, ED value, OBX-14 date) and
    the desired delay in ORC-7.5 (TQ end date/time)."""
    message = Message("ORM_O01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "ORM^O01^ORM_O01", control_id)
    _patient(message, "IPP-CHX-9")
    fields = _order_control("NW", placer)
    if wanted_by is not None:
        fields[7] = f"^^^^{wanted_by.astimezone(UTC):%Y%m%d%H%M%S}+0000"
    _segment(message, "ORC", fields)
    _segment(
        message,
        "OBR",
        {
            2: f"{placer}^^{PLACER_OID}^ISO",
            4: "TRANSMISSION_DEMANDE^Transmission d’une demande d’examen d'imagerie^TLR_OBR_PROCEDURE",
            13: "Céphalées brutales",
        },
    )
    _segment(
        message,
        "OBX",
        {1: "1", 2: "CE", 3: "MODALITE_IMAGERIE^Modalité^TLR_OBSERVATION", 5: "MR^IRM^DCM", 11: "O"},
    )
    for index, (type_code, value, date) in enumerate(documents, start=2):
        obx: dict[int, str | list[str]] = {1: str(index), 2: "ED", 3: type_code, 5: value, 11: "O"}
        if date:
            obx[14] = date
        _segment(message, "OBX", obx)
    return str(message.to_er7()).encode("utf-8")


def document_flow(control_id: str, placer: str, value: str) -> bytes:
    """ORU^R01 (CI-SIS "Transmission de documents CDA-R2 en HL7 v2", MSH-21 ``2.1^CISIS_CDA_HL7_V2``)
    carrying one more document for the request ``placer``."""
    message = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "ORU^R01^ORU_R01", control_id)
    message.msh.msh_21 = "2.1^CISIS_CDA_HL7_V2"
    _patient(message, "IPP-CHX-9")
    _segment(message, "ORC", {1: "SC", 2: f"{placer}^^{PLACER_OID}^ISO"})
    _segment(message, "OBR", {1: "1", 2: f"{placer}^^{PLACER_OID}^ISO", 4: PRIOR_TYPE})
    _segment(message, "OBX", {1: "1", 2: "ED", 3: PRIOR_TYPE, 5: value, 11: "F"})
    return str(message.to_er7()).encode("utf-8")


def ihe_order(control_id: str, placer: str, *, wanted_by: datetime) -> bytes:
    """IHE RAD SWF OMI^O23 NW with TQ1-8 (end date/time) and the request letter in OBX ED."""
    message = Message("OMI_O23", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "OMI^O23^OMI_O23", control_id)
    _patient(message, "IPP-CHX-9")
    _segment(message, "ORC", _order_control("NW", placer))
    _segment(message, "TQ1", {8: f"{wanted_by.astimezone(UTC):%Y%m%d%H%M%S}+0000", 9: "R^Routine^HL70485"})
    _segment(message, "OBR", {2: f"{placer}^^{PLACER_OID}^ISO", 4: "24590-2^IRM cerveau^LN"})
    _segment(
        message, "OBX", {1: "1", 2: "CE", 3: "MODALITE_IMAGERIE^^TLR_OBSERVATION", 5: "MR^^DCM", 11: "O"}
    )
    _segment(message, "OBX", {1: "2", 2: "ED", 3: REQUEST_TYPE, 5: _ed(REQUEST_PDF), 11: "O"})
    return str(message.to_er7()).encode("utf-8")


# ---------------------------------------------------------------------------- the platform


@dataclass
class Platform:
    simral: SimralProcess
    ctx: AppContext
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return self.simral.http_url

    def send(self, message: bytes) -> Message:
        """One message over MLLP; its parsed acknowledgement."""
        with socket.create_connection(("127.0.0.1", self.simral.hl7_port), timeout=60) as sock:
            sock.sendall(VT + message + FS + CR)
            buffer = b""
            while FS + CR not in buffer:
                data = sock.recv(65536)
                assert data, "connection closed before the acknowledgement"
                buffer += data
        text = buffer.split(FS + CR, 1)[0][1:].decode("utf-8")
        return parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)

    def get(self, login: str, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[login]}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    def request(self, placer: str) -> tuple[ImagingRequest, list[RequestDocument]]:
        with self.ctx.db.reading() as session:
            found = session.scalar(select(ImagingRequest).where(ImagingRequest.placer_number == placer))
            assert found is not None, f"no request {placer}"
            rows = list(
                session.scalars(
                    select(RequestDocument)
                    .where(RequestDocument.request_id == found.id)
                    .order_by(RequestDocument.id)
                )
            )
            session.expunge_all()
        return found, rows

    def count(self, placer: str) -> int:
        with self.ctx.db.reading() as session:
            return len(
                list(session.scalars(select(ImagingRequest.id).where(ImagingRequest.placer_number == placer)))
            )


def _ack(ack: Message) -> str:
    return str(ack.msa.msa_1.to_er7())


def _err(ack: Message) -> tuple[str, str, str]:
    return (
        ack.err.err_3.to_er7().split("^")[0],
        ack.err.err_2.to_er7(),
        ack.err.err_8.to_er7(),
    )


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    base = tmp_path_factory.mktemp("request-documents")
    data = ["--data-dir", str(base / "data")]
    simral = SimralProcess(
        base / "data",
        hl7=True,
        extra_env={
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_REQUEST_DOCUMENT_MAX_BYTES": str(MAX_BYTES),
        },
    )
    simral.cli(
        "organisations",
        "add",
        "CHX",
        "--name",
        "CH X",
        "--finess",
        "990000021",
        "--patient-id-oid",
        CHX_IPP_OID,
    )
    chy_oid = "1.2.250.1.999.22.1"
    simral.cli(
        "organisations", "add", "CHY", "--name", "CH Y", "--finess", "990000039", "--patient-id-oid", chy_oid
    )  # fmt: skip
    simral.cli(
        "organisations", "add", "TLRG", "--name", "Téléradiologie Grand Est", "--kind", "teleradiology-group"
    )
    for login, organisation, role, rpps in (
        ("radio_t", "TLRG", "radiologist", "10006100001"),
        ("tech_x", "CHX", "technologist", "10006100002"),
        ("tech_y", "CHY", "technologist", "10006100003"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", role, "--rpps", rpps,
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.cli(
        "ris", "add", "RIS_CHX", "--organisation", "CHX", "--host", "127.0.0.1", "--port", "9",
        "--application", RIS_APP, "--facility", RIS_FACILITY, *data,
    )  # fmt: skip
    simral.cli("contracts", "add", "CHX", "TLRG", "--modalities", "CT\\MR", "--routine-minutes", "720", *data)
    tokens = {login: simral.token_for(login) for login in ("radio_t", "tech_x", "tech_y")}
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            yield Platform(simral, ctx, tokens)
        finally:
            ctx.db.dispose()


# ------------------------------------------------------------------------------------ tests


def test_order_documents_and_desired_delay(platform: Platform) -> None:
    wanted_by = datetime.now(UTC) + timedelta(hours=3)
    ack = platform.send(
        order(
            "DOC-1",
            "OPN501",
            [(REQUEST_TYPE, _ed(REQUEST_PDF), "20260106134418"), (PRIOR_TYPE, _ed(PRIOR_PDF), "20240312")],
            wanted_by=wanted_by,
        )
    )
    assert _ack(ack) == "AA", ack.to_er7()
    request, documents = platform.request("OPN501")
    # The desired delay (3 h) comes before the contract's routine turnaround (12 h).
    assert request.desired_delay == "180 min"
    assert request.due_at is not None and abs((as_utc(request.due_at) - wanted_by).total_seconds()) < 90
    kinds = {row.kind: row for row in documents}
    assert sorted(kinds) == ["anteriorite", "demande"]
    for row, pdf in ((kinds["demande"], REQUEST_PDF), (kinds["anteriorite"], PRIOR_PDF)):
        assert row.sha256 == hashlib.sha256(pdf).hexdigest() and row.size == len(pdf)
        assert row.media_type == "application/pdf" and row.blob_key.startswith("documents/requests/")
    assert kinds["demande"].title == "Demande d'actes d'imagerie" and kinds["demande"].type_code == "55115-0"
    prior_date = kinds["anteriorite"].document_date
    assert prior_date is not None and prior_date.date().isoformat() == "2024-03-11"  # Paris midnight, in UTC
    # The message log keeps the message without the documents' bytes (they are in the blob store).
    with platform.ctx.db.reading() as session:
        kept = session.scalar(select(Hl7Message.raw).where(Hl7Message.control_id == "DOC-1"))
    assert kept is not None and base64.b64encode(PRIOR_PDF).decode()[:200] not in kept
    assert "characters not kept" in kept

    # The group's radiologist sees both on the request page and downloads identical bytes.
    page = platform.get("radio_t", f"/requests/{request.id}")
    assert page.status_code == 200 and "Documents joints" in page.text and "Antériorité" in page.text
    for row, pdf in ((kinds["demande"], REQUEST_PDF), (kinds["anteriorite"], PRIOR_PDF)):
        assert f"/requests/{request.id}/documents/{row.id}" in page.text
        download = platform.get("radio_t", f"/requests/{request.id}/documents/{row.id}")
        assert download.status_code == 200 and download.content == pdf
        assert download.headers["content-type"] == "application/pdf"
        assert download.headers["content-disposition"].startswith("inline; filename=")
    # So does the requesting site; a member of another site may not.
    assert (
        platform.get("tech_x", f"/requests/{request.id}/documents/{kinds['demande'].id}").content
        == REQUEST_PDF
    )
    assert (
        platform.get("tech_y", f"/requests/{request.id}/documents/{kinds['demande'].id}").status_code == 403
    )
    assert platform.get("tech_y", f"/requests/{request.id}").status_code == 403
    assert platform.get("radio_t", f"/requests/{request.id}/documents/999999").status_code == 404

    with platform.ctx.db.reading() as session:
        reads = list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == "imaging-request.document-read"))
        )
        added = session.scalar(select(AuditEvent).where(AuditEvent.action == "imaging-request.document-add"))
    readers = {(event.actor, event.detail["document"]) for event in reads if event.outcome == "success"}
    assert {
        ("user:radio_t", kinds["demande"].id),
        ("user:radio_t", kinds["anteriorite"].id),
        ("user:tech_x", kinds["demande"].id),
    } <= readers
    assert all(event.patient_id == "IPP-CHX-9" for event in reads)
    assert added is not None and {d["sha256"] for d in added.detail["documents"]} == {
        hashlib.sha256(REQUEST_PDF).hexdigest(),
        hashlib.sha256(PRIOR_PDF).hexdigest(),
    }
    # ``simral check`` counts the documents as indexed blobs, not orphans to sweep.
    report = check(platform.ctx)
    assert not (report.orphans or report.missing or report.mismatches), report


def test_a_cda_document_flow_adds_a_prior_to_the_request(platform: Platform) -> None:
    prior = make_pdf("Radiographie thoracique du 15/01/2024")
    ack = platform.send(document_flow("DOC-2", "OPN501", _ed(cda_level1(prior), "XML")))
    assert _ack(ack) == "AA", ack.to_er7()
    _request, documents = platform.request("OPN501")
    added = documents[-1]
    assert (added.kind, added.title, added.type_code) == (
        "anteriorite",
        "CR radiographie thoracique",
        "18748-4",
    )
    assert added.sha256 == hashlib.sha256(prior).hexdigest()  # the PDF the CDA carries, not the CDA
    assert added.document_date is not None
    assert as_utc(added.document_date) == datetime(2024, 1, 15, 9, 30, tzinfo=UTC)  # 10:30+01:00
    # A document for a request the site never sent: unknown key.
    refused = platform.send(document_flow("DOC-3", "OPN-UNKNOWN", _ed(prior)))
    assert _ack(refused) == "AE" and _err(refused)[0] == "204"


def test_a_non_pdf_attachment_refuses_the_order(platform: Platform) -> None:
    text = b"Compte rendu en texte brut, pas un PDF.\n"
    ack = platform.send(order("DOC-4", "OPN502", [(PRIOR_TYPE, _ed(text), "")]))
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "102" and location == "OBX^2^5"
    assert "not a PDF" in reason
    assert platform.count("OPN502") == 0


def test_an_oversize_attachment_refuses_the_order(platform: Platform) -> None:
    large = make_pdf("Dossier complet", lines=3000, compress=False)
    assert large.startswith(b"%PDF-") and len(large) > MAX_BYTES
    ack = platform.send(
        order("DOC-5", "OPN503", [(REQUEST_TYPE, _ed(REQUEST_PDF), ""), (PRIOR_TYPE, _ed(large), "")])
    )
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "102" and location == "OBX^3^5"
    assert str(MAX_BYTES) in reason
    assert platform.count("OPN503") == 0


def test_ihe_omi_desired_delay_in_tq1(platform: Platform) -> None:
    wanted_by = datetime.now(UTC) + timedelta(minutes=90)
    ack = platform.send(ihe_order("DOC-6", "OMI501", wanted_by=wanted_by))
    assert _ack(ack) == "AA", ack.to_er7()
    request, documents = platform.request("OMI501")
    assert request.desired_delay in ("90 min", "91 min")
    assert request.due_at is not None and abs((as_utc(request.due_at) - wanted_by).total_seconds()) < 90
    assert [row.kind for row in documents] == ["demande"]


def test_portal_upload_round_trip(platform: Platform) -> None:
    form = {
        "ipp": "IPP-CHX-78",
        "birth_name": "ESSAI",
        "first_birth_given_name": "LUCIE",
        "sex": "F",
        "birth_date": "1990-02-03",
        "modality": "CT",
        "anatomy": "Thorax",
        "priority": "routine",
        "desired_delay": "PT4H",
        "justification": "Toux persistante",
        "consent": "1",
    }
    headers = {"Authorization": f"Bearer {platform.tokens['tech_x']}"}
    form_page = platform.get("tech_x", "/requests/new").text
    assert 'enctype="multipart/form-data"' in form_page and 'name="prior_documents"' in form_page
    files = [
        ("request_document", ("demande-tdm.pdf", REQUEST_PDF, "application/pdf")),
        ("prior_documents", ("cr-2023.pdf", PRIOR_PDF, "application/pdf")),
    ]
    created = httpx.post(f"{platform.url}/requests", data=form, files=files, headers=headers, timeout=30)
    assert created.status_code == 303, created.text
    request_id = int(created.headers["location"].split("?")[0].rsplit("/", 1)[1])
    with platform.ctx.db.reading() as session:
        rows = list(session.scalars(select(RequestDocument).where(RequestDocument.request_id == request_id)))
        request = session.get(ImagingRequest, request_id)
        assert request is not None and request.due_at is not None
        assert abs((request.due_at - request.created_at).total_seconds() - 4 * 3600) < 5
    assert sorted((row.kind, row.title) for row in rows) == [
        ("anteriorite", "cr-2023"),
        ("demande", "demande-tdm"),
    ]
    for row in rows:
        download = platform.get("radio_t", f"/requests/{request_id}/documents/{row.id}")
        assert download.content == (REQUEST_PDF if row.kind == "demande" else PRIOR_PDF)
    # A file that is not a PDF: the form is refused and no request is made.
    before = len(platform.get("tech_x", "/requests").text.split('data-request="')) - 1
    bad = [("prior_documents", ("notes.pdf", b"juste du texte", "application/pdf"))]
    refused = httpx.post(f"{platform.url}/requests", data=form, files=bad, headers=headers, timeout=30)
    assert refused.status_code == 400 and "not a PDF" in refused.text
    assert len(platform.get("tech_x", "/requests").text.split('data-request="')) - 1 == before
