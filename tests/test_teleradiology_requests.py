"""Imaging requests for remote interpretation against a real ``simral serve --hl7-port`` (ANS "Volet
Téléradiologie" flux 1 to 4, HL7 v2.5.1 over MLLP; DESIGN.md §7).

Site CHX (its RIS registered with ``simral ris add``) has its CT and MR read by the teleradiology
group TLRG (``simral contracts add``). A RIS test client sends messages built with hl7apy and shaped
like the ANS samples (``shared/conformance/teleradiologie/messages``; ANS test INS only) and runs a
small MLLP listener standing for the RIS, which receives the answers (flux 3) and acknowledges them.

Shown: flux 1 creates a request routed to the contracted group; a radiologist accepts it with a
protocol through the portal form and the RIS receives ORU^R01 ORC-1 OK with the protocol (base64
ED); a refusal reaches it as ORC-1 OC with the reason; flux 4 makes the request performed and opens
its reading task; a cancellation (flux 2) after the complement is refused (AE, ERR 206), before it
is accepted and the scheduled procedure DISCONTINUED; a RIS down at first gets the answer once it
comes up (job retry); a RIS that answers AE dead-letters the job; a message sent twice (same
MSH-10) is applied once; a second request with a used placer number is refused. Then in Chromium:
a radiologist opens /requests, opens the request and accepts it with a protocol.

The post-exam complement also comes from the modality (pynetdicom MPPS N-CREATE then N-SET
COMPLETED from CHX's registered modality: the request is performed with the exam date, equipment,
codes, products and dose the step carries, and a cancellation over MLLP is then refused AE 206,
changing nothing), merges with the RIS's without overwriting it, and from the portal form of a
site without a RIS (its technologist; not another organisation's user nor the group). The reading
deadline counts the desired delay from the request's reception, not again from the complement.
"""

from __future__ import annotations

import base64
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select, update
from tests.peers import free_port
from tests.portal_login import TotpDevice, login_page
from tests.simral_proc import SimralProcess

from simral.access.policy import Principal
from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.identity import service as identity
from simral.jobs.models import Job
from simral.patients.models import Hl7Message
from simral.reading import service as reading
from simral.reading.models import ImagingRequest, ReadingTask, ScheduledProcedure

PASSWORD = "Teleradio-Essai-2026!"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
NIR = "279035121518989"  # ANS test NIR (PAT-TROIS DOMINIQUE)
PLACER_OID = "1.2.250.1.748.12345678.12"
CHX_IPP_OID = "1.2.250.1.999.21.1"
RIS_APP, RIS_FACILITY = "StructureApp", "StructureFacility"
MODALITY_AE = "MODCHX"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"
PS = "ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"


# ------------------------------------------------------------------------------ the RIS side


class RisListener:
    """The RIS as an MLLP receiver: keeps each message received and acknowledges it (AA, or the
    code in ``reply``), as a RIS does for the platform's answers (ANS guide, acquittement)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reply = "AA"
        self.received: list[str] = []
        self._lock = threading.Condition()
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> None:
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        return
                    buffer += data
                    while FS + CR in buffer:
                        block, buffer = buffer.split(FS + CR, 1)
                        text = block[block.index(VT) + 1 :].decode("utf-8")
                        control_id = text.split("\r", 1)[0].split("|")[9]
                        with listener._lock:
                            listener.received.append(text)
                            listener._lock.notify_all()
                        ack = (
                            f"MSH|^~\\&|{RIS_APP}|{RIS_FACILITY}|SIMRAL|TLRG|20260106164419||ACK^R01^ACK|"
                            f"A{control_id}|P|2.5.1|||||FRA|UNICODE UTF-8\r"
                            f"MSA|{listener.reply}|{control_id}\r"
                        )
                        if listener.reply != "AA":
                            ack += "ERR||ORC^1^2|204^Unknown key identifier^HL70357|E||||"
                            ack += "demande inconnue du RIS\r"
                        self.request.sendall(VT + ack.encode("utf-8") + FS + CR)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30) -> Message:
        """The first received message matching ``predicate``, parsed with hl7apy (groups found)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for text in self.received:
                    if predicate(text):
                        return parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT)
                left = deadline - time.monotonic()
                assert left > 0, f"no matching message; received: {self.received}"
                self._lock.wait(left)


def _segment(message: Message, name: str, fields: dict[int, str | list[str]], parent: Any = None) -> None:
    """Add a segment with ER7 field values (a list: repetitions)."""
    segment = (parent or message).add_segment(name)
    for number, value in fields.items():
        key = f"{name}_{number}"
        if isinstance(value, list):
            for repetition in value:
                segment.add_field(key).value = repetition
        else:
            setattr(segment, key.lower(), value)


def _header(message: Message, trigger: str, control_id: str) -> None:
    msh = message.msh
    msh.msh_3, msh.msh_4, msh.msh_5, msh.msh_6 = RIS_APP, RIS_FACILITY, "TLRapp", "TLRfacility"
    msh.msh_7 = "20260106134418"
    msh.msh_9 = trigger
    msh.msh_10 = control_id
    msh.msh_11, msh.msh_12, msh.msh_17, msh.msh_18 = "P", "2.5.1", "FRA", "UNICODE UTF-8"
    msh.msh_21 = "1.0^CISIS_TLR_HL7_V2"


def _patient(message: Message, ipp: str | None) -> None:
    identifiers = [f"{NIR}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS^^20101207"]
    if ipp:
        identifiers.append(f"{ipp}^^^CHX&{CHX_IPP_OID}&ISO^PI")
    _segment(
        message,
        "PID",
        {
            3: identifiers,
            5: ["PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L"],
            7: "19790328",
            8: "F",
            11: ["28 Av de Breteuil^^PARIS^^75007^FRA^H", "^^^^^^BDL^^63220"],
            32: "VALI",
        },
    )
    _segment(message, "PV1", {2: "O", 19: "000897406^^^CHU-X&000897406&M^VN^^20210409"})


def _order_control(control: str, placer: str, *, reason: str = "") -> dict[int, str | list[str]]:
    fields: dict[int, str | list[str]] = {
        1: control,
        2: f"{placer}^^{PLACER_OID}^ISO",
        9: "20260106134418",
        12: f"801234567897^Hoda^Adam^^^DR^^^{PS}^D^^^IDNPS",
        14: "^PRN^CP^^^^^^^^^+3360708091",
        17: "STRUCTURE_IMAGERIE^^TLR_TYPE_ORGANISATION",
        21: "Structure-Y^^^^^ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO^FINEG^^^300017985",
    }
    if reason:
        fields[16] = f"^{reason}"
    return fields


def flux1(control_id: str, placer: str, *, ipp: str | None = "IPP-CHX-1", modality: str = "MR") -> bytes:
    """ORM^O01 ORC-1 NW, TransmissionDemandeIMG (messages/flux1_ORM_O01_transmission_demande.hl7)."""
    message = Message("ORM_O01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "ORM^O01^ORM_O01", control_id)
    _patient(message, ipp)
    _segment(message, "ORC", _order_control("NW", placer))
    obr = "TRANSMISSION_DEMANDE^Transmission d’une demande d’examen d'imagerie^TLR_OBR_PROCEDURE"
    _segment(
        message,
        "OBR",
        {
            2: f"{placer}^^{PLACER_OID}^ISO",
            4: obr,
            13: "Céphalées brutales, suspicion d'AVC",
            16: f"801234567897^Hoda^Adam^^^DR^^^{PS}^D^^^IDNPS",
        },
    )
    _segment(message, "NTE", {3: "Bilan étiologique avant prise en charge", 4: "FINALITE_EXAMEN^^HL70364"})
    observations: list[tuple[str, str, str, str, str]] = [
        ("CE", "MODALITE_IMAGERIE^Modalité d’imagerie^TLR_OBSERVATION", "", f"{modality}^IRM^DCM", ""),
        (
            "CE",
            "REGION_ANATOMIQUE^Localisation anatomique^TLR_OBSERVATION",
            "1.1",
            "774007^tête et/ou cou^SCT",
            "",
        ),
        (
            "CE",
            "REGION_ANATOMIQUE^Localisation anatomique^TLR_OBSERVATION",
            "1.2",
            "24028007^côté droit^SCT",
            "",
        ),
        ("FT", "11322-5^History of General health Narrative^LN", "", "HTA traitée", ""),
        ("NM", "8302-2^Body height^LN", "", "170", "cm"),
        ("NM", "29463-7^Body weight^LN", "", "68", "kg"),
        ("CE", "82810-3^Pregnancy status^LN", "", "N^^expandedYes-NoIndicator", ""),
    ]
    for index, (kind, code, sub_id, value, unit) in enumerate(observations, start=1):
        fields: dict[int, str | list[str]] = {1: str(index), 2: kind, 3: code, 5: value, 11: "O"}
        if sub_id:
            fields[4] = sub_id
        if unit:
            fields[6] = unit
        if code.startswith("11322-5"):
            fields[8] = "MAJEUR"
        _segment(message, "OBX", fields)
    return str(message.to_er7()).encode("utf-8")


def flux2(control_id: str, placer: str) -> bytes:
    """ORM^O01 ORC-1 CA, AnnulationDemandeIMG (messages/flux2_ORM_O01_annulation_demande.hl7)."""
    message = Message("ORM_O01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "ORM^O01^ORM_O01", control_id)
    _patient(message, "IPP-CHX-1")
    _segment(message, "ORC", _order_control("CA", placer, reason="Patient transféré"))
    _segment(
        message,
        "OBR",
        {
            2: f"{placer}^^{PLACER_OID}^ISO",
            4: "ANNULATION_DEMANDE^Annulation d’une demande^TLR_OBR_PROCEDURE",
        },
    )
    return str(message.to_er7()).encode("utf-8")


def flux4(control_id: str, placer: str, *, accession: str, study_uid: str) -> bytes:
    """OMI^O23 OBR-4 COMPLEMENT_POST_ACTE (messages/flux4_OMI_O23_complement_post_examen.hl7)."""
    message = Message("OMI_O23", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "OMI^O23^OMI_O23", control_id)
    _patient(message, "IPP-CHX-1")
    _segment(message, "ORC", {1: "SR", 2: f"{placer}^^{PLACER_OID}^ISO"})
    _segment(message, "TQ1", {6: "730^jours", 7: "20260106184418"})
    complement = (
        "COMPLEMENT_POST_ACTE^Transmission d'un complément d’information post-examen^TLR_OBR_PROCEDURE"
    )
    _segment(message, "OBR", {2: f"{placer}^^{PLACER_OID}^ISO", 4: complement})
    url = base64.b64encode(b"https://drimbox.chx.example/ohif/viewer?StudyInstanceUIDs=").decode()
    observations: list[tuple[str, str, str, str, str]] = [
        ("ED", "URL_PARTIELLE_VIEWER^URL partielle^TLR_OBSERVATION", "", f"^TEXT^^Base64^{url}", ""),
        ("CE", "CODE_ACTE_IMAGERIE^Code de l'acte^TLR_OBSERVATION", "", "24590-2^IRM cerveau^LN", ""),
        ("CE", "MODALITE_IMAGERIE^Modalité^TLR_OBSERVATION", "", "MR^IRM^DCM", ""),
        ("CE", "PRODUIT_ADMINISTRE^Produit administré^TLR_OBSERVATION", "1.1", "V09^^ATC", ""),
        ("NM", "PRODUIT_ADMINISTRE^Produit administré^TLR_OBSERVATION", "1.2", "0123456789", ""),
        ("NM", "PRODUIT_ADMINISTRE^Produit administré^TLR_OBSERVATION", "1.3", "15", "ml"),
        ("TX", "APPAREIL_IMAGERIE^Appareil^TLR_OBSERVATION", "1.1", "1234567896363", ""),
        ("TX", "APPAREIL_IMAGERIE^Appareil^TLR_OBSERVATION", "1.2", "Modèle X", ""),
    ]
    for index, (kind, code, sub_id, value, unit) in enumerate(observations, start=1):
        fields: dict[int, str | list[str]] = {1: str(index), 2: kind, 3: code, 5: value, 11: "F"}
        if sub_id:
            fields[4] = sub_id
        if unit:
            fields[6] = unit
        _segment(message, "OBX", fields)
    _segment(
        message,
        "IPC",
        {
            1: f"{accession}^^1.2.250.1.925.994044.27^ISO",
            2: "24590-2^^2.16.840.1.113883.6.1^ISO",
            3: study_uid,
            4: "24590-2^^2.16.840.1.113883.6.1^ISO",
        },
    )
    return str(message.to_er7()).encode("utf-8")


# ---------------------------------------------------------------------------- the platform


@dataclass
class Platform:
    simral: SimralProcess
    ctx: AppContext
    ris: RisListener
    tokens: dict[str, str]
    devices: dict[str, TotpDevice] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.simral.http_url

    def send(self, *messages: bytes) -> list[Message]:
        """Send framed messages over one MLLP connection; the parsed acknowledgements."""
        acks: list[Message] = []
        with socket.create_connection(("127.0.0.1", self.simral.hl7_port), timeout=30) as sock:
            sock.sendall(b"".join(VT + m + FS + CR for m in messages))
            buffer = b""
            while len(acks) < len(messages):
                data = sock.recv(65536)
                assert data, "connection closed before every acknowledgement"
                buffer += data
                while FS + CR in buffer:
                    block, buffer = buffer.split(FS + CR, 1)
                    text = block[1:].decode("utf-8")
                    acks.append(
                        parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
                    )
        return acks

    def request(self, placer: str) -> ImagingRequest:
        with self.ctx.db.reading() as session:
            found = session.scalar(select(ImagingRequest).where(ImagingRequest.placer_number == placer))
            assert found is not None, f"no request {placer}"
            session.expunge(found)
            return found

    def post(self, login: str, path: str, data: dict[str, str]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[login]}"}
        return httpx.post(f"{self.url}{path}", data=data, headers=headers, timeout=30, follow_redirects=False)

    def get(self, login: str, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[login]}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    def jobs_for(self, request_id: int) -> list[Job]:
        with self.ctx.db.reading() as session:
            rows = list(session.scalars(select(Job).where(Job.kind == "hl7.send").order_by(Job.id)))
            for row in rows:
                session.expunge(row)
        return [job for job in rows if job.payload.get("subject") == f"imaging-request:{request_id}"]


def _ack(ack: Message) -> tuple[str, str]:
    return ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()


def _err(ack: Message) -> tuple[str, str]:
    return ack.err.err_3.to_er7().split("^")[0], ack.err.err_8.to_er7()


def _wait(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    base = tmp_path_factory.mktemp("teleradiology")
    simral = SimralProcess(base / "data", hl7=True, extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    data = ["--data-dir", str(simral.data_dir)]
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
    simral.cli(
        "organisations", "add", "TLRG", "--name", "Téléradiologie Grand Est", "--kind", "teleradiology-group"
    )
    simral.cli("organisations", "add", "REGION", "--name", "GRADeS", "--kind", "regional-operator")
    simral.cli("organisations", "add", "CHY", "--name", "CH Y")
    simral.add_node("mod_chx", MODALITY_AE, 104, organisation="CHX")  # CHX's CT, reports its MPPS
    for login, organisation, role, rpps in (
        ("radio_t", "TLRG", "radiologist", "10006000001"),
        ("tech_x", "CHX", "technologist", "10006000002"),
        ("radio_x", "CHX", "radiologist", "10006000003"),
        ("admin", "REGION", "regional-admin", "10006000004"),
        ("tech_y", "CHY", "technologist", "10006000005"),
    ):
        simral.cli(
            "users",
            "add",
            login,
            "--organisation",
            organisation,
            "--role",
            role,
            "--rpps",
            rpps,
            "--name",
            login.replace("_", " ").title(),
            "--password-stdin",
            input=PASSWORD + "\n",
        )
    ris = RisListener(free_port())
    simral.cli(
        "ris", "add", "RIS_CHX", "--organisation", "CHX", "--host", "127.0.0.1", "--port", str(ris.port),
        "--application", RIS_APP, "--facility", RIS_FACILITY, *data,
    )  # fmt: skip
    simral.cli("contracts", "add", "CHX", "TLRG", "--modalities", "CT\\MR", "--routine-minutes", "720", *data)
    assert "CT\\MR" in simral.cli("contracts", "list", *data).stdout
    assert RIS_APP in simral.cli("ris", "list", *data).stdout
    tokens = {login: simral.token_for(login) for login in ("radio_t", "tech_x", "radio_x", "admin", "tech_y")}
    ris.start()
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            yield Platform(simral, ctx, ris, tokens)
        finally:
            ris.stop()
            ctx.db.dispose()


# ----------------------------------------------------------------------------------- tests


def test_flux1_creates_a_request_routed_to_the_contracted_group(platform: Platform) -> None:
    (ack,) = platform.send(flux1("TLR-1", "OPN101"))
    assert _ack(ack) == ("AA", "TLR-1")
    assert ack.msh.msh_9.to_er7() == "ACK^O01^ACK"
    request = platform.request("OPN101")
    assert (request.site_code, request.group_code, request.state) == ("CHX", "TLRG", "received")
    assert (request.placer_authority, request.modality, request.priority) == (PLACER_OID, "MR", "routine")
    assert [a["code"] for a in request.anatomy] == ["774007", "24028007"]
    assert request.identity_id is not None and request.patient["ins"] == NIR
    assert (request.height_cm, request.weight_kg, request.pregnancy) == (170.0, 68.0, "N")
    assert request.justification.startswith("Céphalées") and "[MAJEUR] HTA" in request.clinical_history
    assert request.requester["id"] == "801234567897" and request.requester["phone"] == "+3360708091"
    assert request.due_at is not None and request.created_at is not None
    assert abs((request.due_at - request.created_at).total_seconds() - 720 * 60) < 5

    listing = platform.get("radio_t", "/requests")
    assert (
        listing.status_code == 200 and "PAT-TROIS DOMINIQUE" in listing.text and "Céphalées" in listing.text
    )
    assert "Nouvelle demande" not in listing.text  # the group reviews, it does not request
    for login in ("tech_x", "radio_x"):  # the site's members follow its requests, and may request
        site_listing = platform.get(login, "/requests").text
        assert "Demandes de la structure" in site_listing and "PAT-TROIS" in site_listing
        assert "Nouvelle demande" in site_listing
    # A site without a contract for the modality: refused for now (AR), may be resent later.
    (refused,) = platform.send(flux1("TLR-1-US", "OPN199", modality="US"))
    assert _ack(refused)[0] == "AR" and "no reading contract" in _err(refused)[1]


def test_accept_in_the_portal_sends_the_protocol_to_the_ris(platform: Platform) -> None:
    request = platform.request("OPN101")
    protocol = "IRM cérébrale sans injection\nDiffusion, FLAIR, T2*, TOF"
    page = platform.get("radio_t", f"/requests/{request.id}")
    assert page.status_code == 200 and "Accepter la demande" in page.text
    answer = platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": protocol})
    assert answer.status_code == 303, answer.text
    oru = platform.ris.wait_for(lambda text: "ORU^R01" in text and "OPN101" in text)
    assert oru.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and oru.msh.msh_12.to_er7() == "2.5.1"
    assert oru.msh.msh_21.to_er7() == "1.0^CISIS_TLR_HL7_V2"
    order = oru.oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "OK"
    assert order.orc.orc_2.to_er7() == f"OPN101^^{PLACER_OID}^ISO"
    assert order.orc.orc_12.to_er7().startswith("810006000001^Radio T")
    assert order.orc.orc_17.to_er7() == "PLATEFORME_TLR^^TLR_TYPE_ORGANISATION"
    assert order.obr.obr_4.to_er7().split("^")[0] == "REPONSE_DEMANDE"
    obx = order.oru_r01_observation.obx
    assert obx.obx_2.to_er7() == "ED" and obx.obx_3.to_er7().split("^")[0] == "PROTOCOLE_IMAGERIE"
    ed = obx.obx_5.to_er7().split("^")
    assert ed[1:4] == ["TEXT", "", "Base64"] and base64.b64decode(ed[4]).decode("utf-8") == protocol
    assert oru.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7().startswith(NIR)

    accepted = platform.request("OPN101")
    assert accepted.state == "accepted" and accepted.answered_by == "radio_t"
    with platform.ctx.db.reading() as session:
        step = session.scalar(select(ScheduledProcedure).where(ScheduledProcedure.request_id == accepted.id))
        assert step is not None and step.state == "SCHEDULED" and step.modality == "MR"
        assert (
            0 < len(step.accession_number) <= 16 and step.study_uid.count(".") > 3 and step.station_ae == ""
        )
    _wait(lambda: [j.state for j in platform.jobs_for(accepted.id)] == ["done"], what="answer job done")
    # The site sees the answer; the radiologist of the site (not of the group) cannot answer.
    assert "Diffusion" in platform.get("tech_x", "/requests").text
    assert platform.post("radio_x", f"/requests/{accepted.id}/refuse", {"reason": "x"}).status_code == 403


def test_a_refusal_reaches_the_ris_with_its_reason(platform: Platform) -> None:
    (ack,) = platform.send(flux1("TLR-2", "OPN102"))
    assert _ack(ack)[0] == "AA"
    request = platform.request("OPN102")
    reason = "Indication non retenue : scanner préférable en urgence | à rediscuter"
    assert platform.post("radio_t", f"/requests/{request.id}/refuse", {"reason": reason}).status_code == 303
    oru = platform.ris.wait_for(lambda text: "OPN102" in text)
    order = oru.oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "OC"
    assert (
        order.orc.orc_16.to_er7()
        == "^Indication non retenue : scanner préférable en urgence \\F\\ à rediscuter"
    )
    assert "OBX|" not in oru.to_er7()
    assert platform.request("OPN102").state == "refused"
    # Answered once: a second answer is refused.
    again = platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "x"})
    assert again.status_code == 400 and "already answered" in again.text


def test_complement_opens_the_reading_task_and_cancellation_is_then_refused(platform: Platform) -> None:
    study_uid = "1.2.250.1.213.4.5.2.1.101"
    (ack,) = platform.send(flux4("TLR-4", "OPN101", accession="ACN101", study_uid=study_uid))
    assert _ack(ack) == ("AA", "TLR-4") and ack.msh.msh_9.to_er7() == "ACK^O23^ACK"
    request = platform.request("OPN101")
    assert (request.state, request.accession_number, request.study_uid) == ("performed", "ACN101", study_uid)
    complement = request.complement
    assert complement["viewer_url"].startswith("https://drimbox.chx.example/")
    assert complement["exam_codes"][0]["code"] == "24590-2" and complement["retention_days"] == 730
    assert complement["products"] == [
        {"type": "V09", "system": "ATC", "lot": "0123456789", "quantity": "15", "unit": "ml"}
    ]
    assert complement["equipment"] == [{"udi": "1234567896363", "model": "Modèle X"}]
    with platform.ctx.db.reading() as session:
        (task,) = session.scalars(select(ReadingTask).where(ReadingTask.request_id == request.id))
        assert (task.state, task.study_uid, task.group_code, task.site_code) == (
            "waiting",
            study_uid,
            "TLRG",
            "CHX",
        )
        assert task.due_at is not None
        step = session.scalar(select(ScheduledProcedure).where(ScheduledProcedure.request_id == request.id))
        assert step is not None and step.state == "COMPLETED"

    (cancel,) = platform.send(flux2("TLR-5", "OPN101"))
    assert _ack(cancel) == ("AE", "TLR-5")
    code, text = _err(cancel)
    assert code == "206" and "cannot be cancelled" in text and "complement received" in text
    assert platform.request("OPN101").state == "performed"


def test_cancellation_before_the_complement_discontinues_the_step(platform: Platform) -> None:
    (ack,) = platform.send(flux1("TLR-6", "OPN103"))
    assert _ack(ack)[0] == "AA"
    request = platform.request("OPN103")
    assert platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "TDM"}).status_code == 303
    platform.ris.wait_for(lambda text: "OPN103" in text)
    (cancel,) = platform.send(flux2("TLR-7", "OPN103"))
    assert _ack(cancel) == ("AA", "TLR-7")
    cancelled = platform.request("OPN103")
    assert (cancelled.state, cancelled.cancel_reason) == ("cancelled", "Patient transféré")
    with platform.ctx.db.reading() as session:
        step = session.scalar(select(ScheduledProcedure).where(ScheduledProcedure.request_id == request.id))
        assert step is not None and step.state == "DISCONTINUED"
    # Unknown request: AE 204.
    (unknown,) = platform.send(flux2("TLR-8", "OPN-NOPE"))
    assert _ack(unknown)[0] == "AE" and _err(unknown)[0] == "204"


def test_a_ris_down_at_first_gets_the_answer_when_it_comes_up(platform: Platform) -> None:
    (ack,) = platform.send(flux1("TLR-9", "OPN104"))
    assert _ack(ack)[0] == "AA"
    request = platform.request("OPN104")
    platform.ris.stop()
    try:
        assert (
            platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "P1"}).status_code == 303
        )
        _wait(
            lambda: any(
                j.attempts >= 1 and j.state == "queued" and j.last_error
                for j in platform.jobs_for(request.id)
            ),
            what="a failed first try",
        )
        (job,) = platform.jobs_for(request.id)
        assert "ConnectionRefusedError" in job.last_error
    finally:
        platform.ris.start()
    platform.ris.wait_for(lambda text: "OPN104" in text, timeout=60)
    _wait(lambda: [j.state for j in platform.jobs_for(request.id)] == ["done"], what="answer job done")


def test_a_ris_refusing_the_answer_dead_letters_the_job(platform: Platform) -> None:
    (ack,) = platform.send(flux1("TLR-10", "OPN105"))
    assert _ack(ack)[0] == "AA"
    request = platform.request("OPN105")
    platform.ris.reply = "AE"
    try:
        assert (
            platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "P2"}).status_code == 303
        )
        _wait(lambda: [j.state for j in platform.jobs_for(request.id)] == ["dead"], what="dead job")
    finally:
        platform.ris.reply = "AA"
    (job,) = platform.jobs_for(request.id)
    assert job.attempts == 1 and "answered AE: 204 Unknown key identifier at ORC^1^2" in job.last_error
    assert "demande inconnue" not in job.last_error  # ERR-8 free text is not logged (may quote PHI)
    dead = platform.simral.cli("jobs", "list", "--state", "dead")
    assert "RIS_CHX" in dead.stdout and "hl7.send" in dead.stdout
    page = platform.get("admin", "/admin/jobs")
    assert page.status_code == 200 and "RIS_CHX" in page.text


def test_duplicates_are_answered_once(platform: Platform) -> None:
    message = flux1("TLR-11", "OPN106", ipp=None)  # INS only in PID-3, as in the ANS sample
    first, second = platform.send(message, message)
    assert first.to_er7() == second.to_er7() and _ack(first) == ("AA", "TLR-11")
    with platform.ctx.db.reading() as session:
        assert len(list(session.scalars(select(Hl7Message).where(Hl7Message.control_id == "TLR-11")))) == 1
        requests = list(
            session.scalars(select(ImagingRequest).where(ImagingRequest.placer_number == "OPN106"))
        )
        assert len(requests) == 1
    # Resolved by its INS to the identity the first request created.
    assert requests[0].identity_id == platform.request("OPN101").identity_id
    # The same placer number in a new message: refused clearly.
    (duplicate,) = platform.send(flux1("TLR-12", "OPN106"))
    assert _ack(duplicate)[0] == "AE"
    code, text = _err(duplicate)
    assert code == "205" and "OPN106" in text and "already received" in text
    # A sender that is not a registered RIS: AR.
    stranger = flux1("TLR-13", "OPN107").replace(RIS_APP.encode(), b"OtherRIS")
    (refused,) = platform.send(stranger)
    assert _ack(refused)[0] == "AR" and "not a registered RIS" in _err(refused)[1]


def ihe_omi(control_id: str, control: str, placer: str, *, accession: str, study_uid: str) -> bytes:
    """IHE RAD SWF OMI^O23 (RAD-4 shape) as a RIS that schedules exams itself sends a new order (NW)
    or its cancellation (CA): TQ1-7 start, TQ1-9 priority, IPC with accession and Study Instance UID."""
    message = Message("OMI_O23", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _header(message, "OMI^O23^OMI_O23", control_id)
    _patient(message, "IPP-CHX-1")
    _segment(message, "ORC", _order_control(control, placer))
    _segment(message, "TQ1", {7: "20991231093000", 9: "S^Stat^HL70485"})
    _segment(message, "OBR", {2: f"{placer}^^{PLACER_OID}^ISO", 4: "24627-2^TDM thorax^LN", 13: "Dyspnée"})
    _segment(
        message, "OBX", {1: "1", 2: "CE", 3: "MODALITE_IMAGERIE^^TLR_OBSERVATION", 5: "CT^^DCM", 11: "O"}
    )
    _segment(message, "IPC", {1: f"{accession}^^1.2.250.1.925.994044.27^ISO", 3: study_uid, 4: "SPS1"})
    return str(message.to_er7()).encode("utf-8")


def test_ihe_omi_orders_are_accepted_too(platform: Platform) -> None:
    study_uid = "1.2.250.1.213.4.5.2.1.202"
    (ack,) = platform.send(ihe_omi("TLR-30", "NW", "OMI201", accession="ACN201", study_uid=study_uid))
    assert _ack(ack) == ("AA", "TLR-30")
    request = platform.request("OMI201")
    assert (request.priority, request.modality, request.accession_number) == ("urgent", "CT", "ACN201")
    assert request.appointment_at is not None and request.appointment_at.year == 2099
    assert platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "TDM"}).status_code == 303
    with platform.ctx.db.reading() as session:
        step = session.scalar(select(ScheduledProcedure).where(ScheduledProcedure.request_id == request.id))
        assert step is not None and (step.accession_number, step.study_uid) == ("ACN201", study_uid)
    (cancel,) = platform.send(ihe_omi("TLR-31", "CA", "OMI201", accession="ACN201", study_uid=study_uid))
    assert _ack(cancel) == ("AA", "TLR-31") and platform.request("OMI201").state == "cancelled"


def test_an_ihe_omi_sender_gets_orl_o22_answers(platform: Platform) -> None:
    """A RIS that ordered with IHE OMI^O23 gets ORL^O22 (HL7 v2.5.1 §4.4) answers, durable like flux
    3: accepted (ORC-1 OK, the protocol in NTE) and refused (ORC-1 UA per table 0119, ORC-16)."""
    for control_id, placer in (("TLR-40", "OMI401"), ("TLR-41", "OMI402")):
        (ack,) = platform.send(ihe_omi(control_id, "NW", placer, accession=f"AC{placer}", study_uid=""))
        assert _ack(ack) == ("AA", control_id)
    protocol = "TDM thoracique sans injection\nCoupes fines 1 mm | filtre parenchymateux"
    accepted = platform.request("OMI401")
    assert accepted.hl7_order["message"] == "OMI^O23" and accepted.hl7_order["control_id"] == "TLR-40"
    assert (
        platform.post("radio_t", f"/requests/{accepted.id}/accept", {"protocol": protocol}).status_code == 303
    )
    orl = platform.ris.wait_for(lambda text: "ORL^O22" in text and "OMI401" in text)
    assert orl.msh.msh_9.to_er7() == "ORL^O22^ORL_O22" and orl.msh.msh_12.to_er7() == "2.5.1"
    assert (orl.msa.msa_1.to_er7(), orl.msa.msa_2.to_er7()) == ("AA", "TLR-40")
    order = orl.orl_o22_response.orl_o22_patient.orl_o22_order
    assert (order.orc.orc_1.to_er7(), order.orc.orc_5.to_er7()) == ("OK", "SC")
    assert order.orc.orc_2.to_er7() == f"OMI401^^{PLACER_OID}^ISO"
    assert order.orc.orc_3.to_er7() == f"{accepted.id}^SIMRAL"
    assert order.orc.orc_12.to_er7().startswith("801234567897^Hoda^Adam")  # the requester, as ordered
    assert order.orc.orc_19.to_er7().startswith("810006000001^Radio T")  # who accepted
    assert order.orl_o22_timing.tq1.tq1_9.to_er7() == "S"
    assert order.orl_o22_observation_request.obr.obr_4.to_er7() == "24627-2^TDM thorax^LN"
    assert orl.nte.nte_4.to_er7().split("^")[0] == "PROTOCOLE_IMAGERIE"
    assert [line.to_er7() for line in orl.nte.nte_3] == [
        "TDM thoracique sans injection",
        "Coupes fines 1 mm \\F\\ filtre parenchymateux",
    ]
    assert orl.orl_o22_response.orl_o22_patient.pid.pid_3.to_er7().startswith(NIR)
    _wait(lambda: [j.state for j in platform.jobs_for(accepted.id)] == ["done"], what="ORL job done")

    refused = platform.request("OMI402")
    reason = "Examen non indiqué : échographie d'abord"
    assert platform.post("radio_t", f"/requests/{refused.id}/refuse", {"reason": reason}).status_code == 303
    orl = platform.ris.wait_for(lambda text: "ORL^O22" in text and "OMI402" in text)
    assert (orl.msa.msa_1.to_er7(), orl.msa.msa_2.to_er7()) == ("AA", "TLR-41")
    order = orl.orl_o22_response.orl_o22_patient.orl_o22_order
    assert (order.orc.orc_1.to_er7(), order.orc.orc_5.to_er7()) == ("UA", "CA")
    assert order.orc.orc_16.to_er7() == f"^{reason}"
    assert "NTE|" not in orl.to_er7() and "TQ1|" not in orl.to_er7()
    _wait(lambda: [j.state for j in platform.jobs_for(refused.id)] == ["done"], what="ORL job done")
    # Neither got the ANS flux 3 answer, which stays for the ORM^O01 requesters.
    assert not any("ORU^R01" in text and "OMI40" in text for text in platform.ris.received)


def test_a_site_without_ris_requests_through_the_portal(platform: Platform) -> None:
    form = {
        "ipp": "IPP-CHX-77",
        "birth_name": "ESSAI",
        "first_birth_given_name": "CLAIRE",
        "sex": "F",
        "birth_date": "1985-04-12",
        "modality": "CT",
        "anatomy": "Thorax",
        "priority": "urgent",
        "desired_delay": "PT4H",
        "justification": "Dyspnée aiguë, suspicion d'embolie pulmonaire",
        "consent": "1",
    }
    created = platform.post("tech_x", "/requests", form)
    assert created.status_code == 303, created.text
    with platform.ctx.db.reading() as session:
        request = session.scalar(select(ImagingRequest).where(ImagingRequest.source == "portal"))
        assert request is not None and (request.group_code, request.priority) == ("TLRG", "urgent")
        assert request.due_at is not None
        assert abs((request.due_at - request.created_at).total_seconds() - 3600) < 5  # urgent: 60 min
    listing = platform.get("radio_t", "/requests").text
    assert listing.index("ESSAI CLAIRE") < listing.index("PAT-TROIS")  # urgent first
    assert (
        platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "Angio-TDM"}).status_code
        == 303
    )
    assert platform.jobs_for(request.id) == []  # no RIS to answer: the site reads it in the portal
    assert "Angio-TDM" in platform.get("tech_x", f"/requests/{request.id}").text


def test_a_radiologist_accepts_a_request_in_the_browser(platform: Platform, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    (ack,) = platform.send(flux1("TLR-20", "OPN120"))
    assert _ack(ack)[0] == "AA"
    request = platform.request("OPN120")
    protocol = "IRM encéphalique : T1, T2 FLAIR, diffusion, T1 gadolinium 3D"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        radio = browser.new_context(locale="fr-FR", viewport={"width": 1366, "height": 900}).new_page()
        login_page(
            radio, platform.url, "radio_t", PASSWORD, platform.devices.setdefault("radio_t", TotpDevice())
        )
        radio.click("nav a[href='/requests']")
        radio.wait_for_load_state("domcontentloaded")
        assert "Demandes adressées au groupe" in radio.content()
        radio.screenshot(path=str(artifacts_dir / "requests-list.png"), full_page=True)
        radio.click(f"tr[data-request='{request.id}'] a")
        radio.wait_for_load_state("domcontentloaded")
        assert "Céphalées brutales" in radio.content() and "tête et/ou cou" in radio.content()
        radio.fill("textarea[name=protocol]", protocol)
        radio.screenshot(path=str(artifacts_dir / "request-answer-form.png"), full_page=True)
        radio.click(f"form[action='/requests/{request.id}/accept'] button")
        radio.wait_for_load_state("domcontentloaded")
        assert "Demande acceptée" in radio.content() and "T1 gadolinium" in radio.content()
        radio.screenshot(path=str(artifacts_dir / "request-accepted.png"), full_page=True)
        # The site's form for a new request (sites without a RIS).
        tech = browser.new_context(locale="fr-FR", viewport={"width": 1366, "height": 900}).new_page()
        login_page(
            tech, platform.url, "tech_x", PASSWORD, platform.devices.setdefault("tech_x", TotpDevice())
        )
        tech.goto(f"{platform.url}/requests")
        tech.click("a[href='/requests/new']")
        tech.wait_for_load_state("domcontentloaded")
        assert tech.locator("form.request-form textarea[name=justification]").count() == 1
        tech.screenshot(path=str(artifacts_dir / "request-new-form.png"), full_page=True)
        # The post-exam complement of an accepted portal request, entered in the browser (session
        # cookie and CSRF token).
        portal = {
            "ipp": "IPP-CHX-99", "birth_name": "NAVIGATEUR", "first_birth_given_name": "ANNE", "sex": "F",
            "birth_date": "1990-05-06", "modality": "CT", "anatomy": "Thorax", "priority": "routine",
            "justification": "Toux chronique", "consent": "1",
        }  # fmt: skip
        created = platform.post("tech_x", "/requests", portal)
        portal_id = int(created.headers["location"].split("?")[0].rsplit("/", 1)[1])
        assert (
            platform.post("radio_t", f"/requests/{portal_id}/accept", {"protocol": "TDM"}).status_code == 303
        )
        tech.goto(f"{platform.url}/requests/{portal_id}")
        form = tech.locator(f"form[action='/requests/{portal_id}/complement']")
        form.locator("input[name=performed_at]").fill("2026-01-09T14:05")
        form.locator("input[name=equipment_model]").fill("GE Revolution")
        form.locator("input[name=ctdivol_mgy]").fill("6.2")
        tech.screenshot(path=str(artifacts_dir / "request-complement-form.png"), full_page=True)
        form.locator("button[type=submit]").click()
        tech.wait_for_load_state("domcontentloaded")
        content = tech.content()
        assert "Complément post-examen enregistré" in content and "GE Revolution" in content
        assert "09/01/2026 14:05" in content and "IDSV (CTDIvol) 6.2 mGy" in content
        assert tech.locator(f"form[action='/requests/{portal_id}/cancel']").count() == 0
        browser.close()
    oru = platform.ris.wait_for(lambda text: "OPN120" in text)
    data = oru.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation.obx.obx_5.to_er7().split(
        "^"
    )[4]
    assert base64.b64decode(data).decode("utf-8") == protocol


def test_a_ris_bound_to_its_host_or_certificate_is_not_believed_from_elsewhere(platform: Platform) -> None:
    """A RIS registered with --check-host (or --tls-subject) is only believed from its host (or
    over TLS with its client certificate): a message naming it from another connection is refused
    (AR, ERR 204), applies nothing, does not take its control id, and is a security event."""
    data = ["--data-dir", str(platform.simral.data_dir)]
    platform.simral.cli(
        "ris", "add", "RIS_CHX_BOUND", "--organisation", "CHX", "--host", "192.0.2.10", "--port", "2575",
        "--application", "BoundRis", "--facility", RIS_FACILITY, "--check-host", *data,
    )  # fmt: skip
    platform.simral.cli(
        "ris", "add", "RIS_CHX_CERT", "--organisation", "CHX", "--host", "127.0.0.1", "--port", "2576",
        "--application", "CertRis", "--facility", RIS_FACILITY, "--tls-subject", "ris-chx.example", *data,
    )  # fmt: skip
    for application in ("BoundRis", "CertRis"):
        forged = flux1(f"FORGED-{application}", f"OPN-{application}").replace(
            f"|{RIS_APP}|".encode(), f"|{application}|".encode(), 1
        )
        (ack,) = platform.send(forged)
        assert _ack(ack) == ("AR", f"FORGED-{application}")
        assert _err(ack) == ("204", "sender not accepted from this connection")
        with platform.ctx.db.reading() as session:
            placer = f"OPN-{application}"
            assert (
                session.scalar(select(ImagingRequest).where(ImagingRequest.placer_number == placer)) is None
            )
    trail = platform.simral.cli("audit", "search", "--action", "hl7.refused", "--limit", "10").stdout
    assert "registered host only" in trail and "client certificate only" in trail, trail
    # The rule itself, for the certificate's three cases.
    with platform.ctx.db.reading() as session:

        def refusal(subject: str | None) -> str:
            return reading.ris_sender_refusal(
                session,
                application="CertRis",
                facility=RIS_FACILITY,
                address="127.0.0.1",
                tls_subject=subject,
            )

        assert "client certificate only" in refusal(None)
        assert "another subject" in refusal("intruder.example")
        assert refusal("ris-chx.example") == ""
        # The RIS registered without a binding is believed from anywhere (the network admits it).
        assert (
            reading.ris_sender_refusal(
                session, application=RIS_APP, facility=RIS_FACILITY, address="198.51.100.7", tls_subject=None
            )
            == ""
        )


# ----------------------------------------------------------------- the post-exam complement


def _accepted(platform: Platform, control_id: str, placer: str, modality: str) -> ScheduledProcedure:
    """A flux 1 request accepted by the group: its Scheduled Procedure Step (the worklist item)."""
    (ack,) = platform.send(flux1(control_id, placer, modality=modality))
    assert _ack(ack)[0] == "AA"
    request = platform.request(placer)
    assert platform.post("radio_t", f"/requests/{request.id}/accept", {"protocol": "TDM"}).status_code == 303
    platform.ris.wait_for(lambda text: placer in text)
    return _step(platform, request.id)


def _step(platform: Platform, request_id: int) -> ScheduledProcedure:
    with platform.ctx.db.reading() as session:
        step = session.scalar(select(ScheduledProcedure).where(ScheduledProcedure.request_id == request_id))
        assert step is not None
        session.expunge(step)
        return step


def _tasks(platform: Platform, request_id: int) -> list[ReadingTask]:
    with platform.ctx.db.reading() as session:
        tasks = list(session.scalars(select(ReadingTask).where(ReadingTask.request_id == request_id)))
        for task in tasks:
            session.expunge(task)
        return tasks


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _perform(platform: Platform, step: ScheduledProcedure, mpps_uid: str, modality: str) -> None:
    """CHX's modality performs the worklist item: MPPS N-CREATE IN PROGRESS, then N-SET COMPLETED
    with its equipment, contrast product (Billing Supplies and Devices) and dose (PS3.3 C.4.13-17)."""
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", platform.simral.dicom_port, ae_title=platform.simral.ae_title)
    assert assoc.is_established
    try:
        scheduled = Dataset()
        scheduled.StudyInstanceUID = step.study_uid
        scheduled.AccessionNumber = step.accession_number
        scheduled.ScheduledProcedureStepID = step.step_id
        scheduled.RequestedProcedureID = step.requested_procedure_id
        create = Dataset()
        create.ScheduledStepAttributesSequence = [scheduled]
        create.PatientName = "PAT-TROIS^DOMINIQUE"
        create.PatientID = "IPP-CHX-1"
        create.PerformedProcedureStepID = f"PPS-{step.step_id}"
        create.PerformedStationAETitle = MODALITY_AE
        create.PerformedStationName = "SCANNER-2"
        create.PerformedProcedureStepStartDate = "20260107"
        create.PerformedProcedureStepStartTime = "101500"
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        create.Modality = modality
        create.ProcedureCodeSequence = [_code("24627-2", "LN", "TDM thorax")]
        create.PerformedSeriesSequence = []
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0000, status
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = "20260107"
        done.PerformedProcedureStepEndTime = "103000"
        done.Manufacturer = "ACME"
        done.ManufacturerModelName = "CT-900"
        done.CTDIvol = 12.5
        done.CommentsOnRadiationDose = "DLP 512.3 mGy.cm"
        quantity = Dataset()
        quantity.Quantity = 80
        quantity.MeasuringUnitsSequence = [_code("ml", "UCUM", "millilitre")]
        supply = Dataset()
        supply.BillingItemSequence = [_code("V08AB02", "ATC", "iohexol")]
        supply.QuantitySequence = [quantity]
        done.BillingSuppliesAndDevicesSequence = [supply]
        done.PerformedSeriesSequence = []
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0000, status
    finally:
        assoc.release()


def test_mpps_completed_is_the_complement_and_cancellation_is_then_refused(platform: Platform) -> None:
    step = _accepted(platform, "TLR-140", "OPN140", "CT")
    # A request of the site's RIS: no portal complement (the RIS or the modality gives it).
    accepted = platform.request("OPN140")
    assert "/complement" not in platform.get("tech_x", f"/requests/{accepted.id}").text
    by_hand = platform.post("tech_x", f"/requests/{accepted.id}/complement", {"accession_number": "X1"})
    assert by_hand.status_code == 400 and "vient du RIS" in by_hand.text
    _perform(platform, step, "1.2.826.0.1.3680043.8.498.140140", "CT")
    request = platform.request("OPN140")
    assert (request.state, request.accession_number, request.study_uid) == (
        "performed",
        step.accession_number,
        step.study_uid,
    )
    complement = request.complement
    assert complement["performed_at"] == "2026-01-07T09:15:00+00:00"  # 10:15 in Paris (winter)
    assert complement["modality"] == "CT" and complement["origins"] == ["mpps"]
    assert complement["equipment"] == [{"model": "ACME CT-900", "station": "SCANNER-2 (MODCHX)"}]
    assert complement["exam_codes"] == [{"code": "24627-2", "system": "LN", "display": "TDM thorax"}]
    assert complement["products"] == [
        {"type": "V08AB02", "system": "ATC", "display": "iohexol", "quantity": "80", "unit": "ml"}
    ]
    assert complement["dose"] == {"ctdivol_mgy": "12.5", "dlp_mgycm": "512.3"}
    (task,) = _tasks(platform, request.id)
    assert (task.state, task.study_uid, task.group_code) == ("waiting", step.study_uid, "TLRG")
    # No desired delay: the contract's 720 minutes from the complement.
    received = datetime.fromisoformat(complement["received_at"])
    assert task.due_at is not None
    assert abs((as_utc(task.due_at) - received).total_seconds() - 720 * 60) < 2
    assert _step(platform, request.id).state == "COMPLETED"
    page = platform.get("tech_x", f"/requests/{request.id}").text
    assert "ACME CT-900" in page and "IDSV (CTDIvol) 12.5 mGy, PDL 512.3 mGy·cm" in page
    assert "modalité (MPPS)" in page and "07/01/2026 10:15" in page

    # The RIS cancels after the exam: refused as after its own complement (AE, ERR 206).
    (cancel,) = platform.send(flux2("TLR-141", "OPN140"))
    assert _ack(cancel) == ("AE", "TLR-141")
    code, text = _err(cancel)
    assert code == "206" and "cannot be cancelled" in text and "complement received" in text
    # The portal refuses it too, in French, saying why.
    refused = platform.post("tech_x", f"/requests/{request.id}/cancel", {"reason": "Erreur"})
    assert refused.status_code == 409 and "Annulation impossible" in refused.text
    assert "complément post-examen" in refused.text and "OPN140" in refused.text
    after = platform.request("OPN140")
    assert (after.state, after.cancel_reason, after.complement) == ("performed", "", complement)
    (unchanged,) = _tasks(platform, request.id)
    assert (unchanged.id, unchanged.state, unchanged.due_at) == (task.id, "waiting", task.due_at)
    assert _step(platform, request.id).state == "COMPLETED"


def test_mpps_after_the_ris_complement_only_fills_what_it_left_empty(platform: Platform) -> None:
    before = platform.request("OPN101")  # flux 4 received (test above): MR, ACN101, "Modèle X"
    assert before.state == "performed" and before.complement["origins"] == ["ris"]
    (task,) = _tasks(platform, before.id)
    _perform(platform, _step(platform, before.id), "1.2.826.0.1.3680043.8.498.101101", "MR")
    after = platform.request("OPN101")
    assert (after.state, after.accession_number, after.study_uid) == (
        "performed",
        "ACN101",
        "1.2.250.1.213.4.5.2.1.101",
    )
    kept = ("performed_at", "modality", "exam_codes", "products", "equipment", "viewer_url", "received_at")
    assert {key: after.complement[key] for key in kept} == {key: before.complement[key] for key in kept}
    assert after.complement["equipment"] == [{"udi": "1234567896363", "model": "Modèle X"}]
    # What the RIS did not say, the modality adds; it is one complement, one task.
    assert after.complement["dose"] == {"ctdivol_mgy": "12.5", "dlp_mgycm": "512.3"}
    assert after.complement["origins"] == ["mpps", "ris"]
    assert [(t.id, t.due_at) for t in _tasks(platform, before.id)] == [(task.id, task.due_at)]


def test_a_site_without_ris_sends_the_complement_in_the_portal(platform: Platform, tmp_path: Path) -> None:
    from tests.corpus import ct_series
    from tests.dcmtk_tools import storescu

    form = {
        "ipp": "IPP-CHX-88",
        "birth_name": "ESSAI",
        "first_birth_given_name": "PAUL",
        "sex": "M",
        "birth_date": "1970-02-03",
        "modality": "CT",
        "anatomy": "Abdomen",
        "priority": "routine",
        "desired_delay": "PT4H",
        "justification": "Douleur abdominale aiguë",
        "consent": "1",
    }
    created = platform.post("tech_x", "/requests", form)
    assert created.status_code == 303, created.text
    request_id = int(created.headers["location"].split("?")[0].rsplit("/", 1)[1])
    # Received three hours ago: the desired delay runs from then.
    received = utcnow() - timedelta(hours=3)
    with platform.ctx.db.unit_of_work() as session:
        session.execute(
            update(ImagingRequest).where(ImagingRequest.id == request_id).values(created_at=received)
        )
    assert (
        platform.post("radio_t", f"/requests/{request_id}/accept", {"protocol": "TDM AP"}).status_code == 303
    )
    step = _step(platform, request_id)
    # The site's PACS holds a study of the patient (stored by its modality under its IPP).
    stored_uid = "1.2.826.0.1.3680043.8.498.880088"
    paths = ct_series(
        tmp_path, slices=1, rows=16, cols=16, patient_id="IPP-CHX-88", patient_name="ESSAI^PAUL",
        study_uid=stored_uid, seed=88,
    )  # fmt: skip
    ds = dcmread(paths[0])
    ds.IssuerOfPatientID = ""
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = CHX_IPP_OID, "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    ds.save_as(paths[0])
    storescu(platform.simral, MODALITY_AE, paths)

    action = f'action="/requests/{request_id}/complement"'
    page = platform.get("tech_x", f"/requests/{request_id}").text
    assert "Complément post-examen" in page and action in page
    assert f'value="{step.accession_number}"' in page and f'value="{step.study_uid}"' in page
    assert f'<option value="{stored_uid}"' in page  # the site's study of this patient, to pick
    assert "Exam date and time" in platform.get("tech_x", f"/requests/{request_id}?lang=en").text
    assert action not in platform.get("radio_t", f"/requests/{request_id}").text
    data = {
        "accession_number": "ACN-P-88",
        "study_uid": stored_uid,
        "performed_at": "2026-01-08T09:30",
        "equipment_model": "Siemens Somatom",
        "product_type": "Iomeron 350",
        "product_lot": "L123",
        "product_quantity": "90",
        "product_unit": "ml",
        "ctdivol_mgy": "8,4",
        "dlp_mgycm": "310",
    }
    # Not for another organisation's technologist, nor for the reading group.
    assert platform.post("tech_y", f"/requests/{request_id}/complement", data).status_code == 403
    assert platform.post("radio_t", f"/requests/{request_id}/complement", data).status_code == 403
    assert _tasks(platform, request_id) == []

    done = platform.post("tech_x", f"/requests/{request_id}/complement", data)
    assert done.status_code == 303 and "done=complement" in done.headers["location"]
    with platform.ctx.db.reading() as session:
        request = session.get(ImagingRequest, request_id)
        assert request is not None
        session.expunge(request)
    assert (request.state, request.accession_number, request.study_uid) == (
        "performed",
        "ACN-P-88",
        stored_uid,
    )
    complement = request.complement
    assert complement["performed_at"] == "2026-01-08T08:30:00+00:00" and complement["origins"] == ["portal"]
    assert complement["products"] == [{"type": "Iomeron 350", "lot": "L123", "quantity": "90", "unit": "ml"}]
    assert complement["equipment"] == [{"model": "Siemens Somatom"}]
    assert complement["dose"] == {"ctdivol_mgy": "8.4", "dlp_mgycm": "310"}
    page = platform.get("tech_x", f"/requests/{request_id}?done=complement").text
    assert "Complément post-examen enregistré" in page and "Siemens Somatom" in page
    assert "IDSV (CTDIvol) 8.4 mGy, PDL 310 mGy·cm" in page and "08/01/2026 09:30" in page
    assert "formulaire du portail" in page

    # The reading deadline: the 4 hours desired run from the reception, not again from now.
    (task,) = _tasks(platform, request_id)
    assert task.study_uid == stored_uid and task.due_at is not None
    assert abs((as_utc(task.due_at) - (as_utc(received) + timedelta(hours=4))).total_seconds()) < 2

    # From now on the site cannot cancel it.
    refused = platform.post("tech_x", f"/requests/{request_id}/cancel", {"reason": "Erreur de patient"})
    assert refused.status_code == 409 and "Annulation impossible" in refused.text
    assert "Examen réalisé" in refused.text
    with platform.ctx.db.reading() as session:
        still = session.get(ImagingRequest, request_id)
        assert still is not None and still.state == "performed"
    assert [t.state for t in _tasks(platform, request_id)] == ["waiting"]


def _principal(platform: Platform, login: str) -> Principal:
    with platform.ctx.db.reading() as session:
        professional = identity.get_professional(session, login)
        assert professional is not None
        return identity.principal_for(session, professional)


def test_the_service_refuses_a_portal_complement_for_a_request_of_the_ris(platform: Platform) -> None:
    step = _accepted(platform, "TLR-150", "OPN150", "CT")
    before = platform.request("OPN150")
    assert before.source != reading.PORTAL_SOURCE and before.state == "accepted"
    given = reading.Complement(
        accession_number="ACN-P-150", study_uid="1.2.826.0.1.3680043.8.498.150150", modality="CT"
    )
    with pytest.raises(reading.ReadingError) as refused, platform.ctx.db.unit_of_work() as session:
        item = session.get(ImagingRequest, before.id)
        assert item is not None
        reading.record_complement(
            session, item, given, principal=_principal(platform, "tech_x"), origin=reading.COMPLEMENT_PORTAL
        )
    assert (refused.value.reason, refused.value.code) == ("complement_from_ris", "207")
    after = platform.request("OPN150")
    assert (after.state, after.accession_number, after.study_uid, after.complement) == (
        "accepted",
        before.accession_number,
        before.study_uid,
        before.complement,
    )
    assert _step(platform, before.id).state == step.state == "SCHEDULED"
    assert _tasks(platform, before.id) == []


def test_the_service_defaults_a_portal_complement_from_the_worklist_step(platform: Platform) -> None:
    form = {
        "ipp": "IPP-CHX-89",
        "birth_name": "ESSAI",
        "first_birth_given_name": "JEANNE",
        "sex": "F",
        "birth_date": "1968-05-06",
        "modality": "CT",
        "anatomy": "Thorax",
        "priority": "routine",
        "justification": "Dyspnée",
        "consent": "1",
    }
    created = platform.post("tech_x", "/requests", form)
    assert created.status_code == 303, created.text
    request_id = int(created.headers["location"].split("?")[0].rsplit("/", 1)[1])
    assert platform.post("radio_t", f"/requests/{request_id}/accept", {"protocol": "TDM"}).status_code == 303
    step = _step(platform, request_id)
    # The form left the accession number and the Study Instance UID empty: the step's are kept.
    given = reading.Complement(accession_number="", study_uid="", modality="CT")
    with platform.ctx.db.unit_of_work() as session:
        item = session.get(ImagingRequest, request_id)
        assert item is not None and item.source == reading.PORTAL_SOURCE
        assert (item.accession_number, item.study_uid) == ("", "")
        _, task = reading.record_complement(
            session, item, given, principal=_principal(platform, "tech_x"), origin=reading.COMPLEMENT_PORTAL
        )
        task_uid = task.study_uid
    with platform.ctx.db.reading() as session:
        request = session.get(ImagingRequest, request_id)
        assert request is not None
        assert (request.state, request.accession_number, request.study_uid) == (
            "performed",
            step.accession_number,
            step.study_uid,
        )
        assert request.complement["origins"] == ["portal"]
    assert task_uid == step.study_uid and step.accession_number and step.study_uid
