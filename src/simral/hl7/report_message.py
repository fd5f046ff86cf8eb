"""The signed report to the requesting site's RIS, ANS Téléradiologie flux 5 "Compte rendu": an
ORU^R01^ORU_R01 (HL7 v2.5) carrying the CR-IMG CDA as CI-SIS "Transmission de documents CDA-R2 en
HL7 v2" specifies it (MSH-21 ``2.1^CISIS_CDA_HL7_V2``), built with hl7apy.

- PID: the patient as the request named them; the INS only when the identity is qualified (QUAL).
- ORC-1 ``RE`` (observations to follow), ORC-2 / OBR-2 the placer number, OBR-3 the accession
  number, OBR-4 the document type (LOINC 18748-4), OBR-7 the exam date, OBR-25 ``F``.
- OBX 1: OBX-2 ``ED``, OBX-3 the document type, OBX-5 ``^TEXT^XML^Base64^<the CDA in base64>``,
  OBX-11 ``F`` for the first version and ``C`` (a correction replacing the earlier result, HL7
  table 0085) for an addendum, OBX-14 the signature time, OBX-16 the signer.
- OBX 2: ``DESTDMP`` ``Y``: the RIS publishes the document to the DMP unchanged (DESIGN.md §7).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from simral.hl7.answers import Party, Responder, _text, _xcn, add_msh, add_pid
from simral.patients.models import STATUS_QUAL

VERSION = "2.5"
#: MSH-21 of the CI-SIS volet "Transmission de documents CDA-R2 en HL7 v2" (version ^ name).
PROFILE = "2.1^CISIS_CDA_HL7_V2"
#: Document type (LOINC, JDV J07 XdsTypeCode) of an imaging report.
DOCUMENT_TYPE = "18748-4^CR d'imagerie médicale^LN"


@dataclass(frozen=True)
class ReportMessage:
    """What the message says beyond the CDA itself."""

    control_id: str
    patient: dict[str, Any]
    placer_number: str
    placer_authority: str
    accession_number: str
    accession_authority: str
    signed_at: datetime
    exam_at: datetime | None
    version: int


def _hl7_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _ei(number: str, authority: str) -> str:
    kind = "ISO" if authority else ""
    return f"{_text(number)}^^{_text(authority)}^{kind}"


def build_report_message(
    cda: bytes, report: ReportMessage, *, receiver: Party, platform: Party, signer: Responder
) -> str:
    """The ORU^R01 (segments separated by CR) carrying ``cda``."""
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = add_msh(message, "ORU^R01^ORU_R01", report.control_id, platform=platform, receiver=receiver)
    msh.msh_19 = "FRA"
    msh.msh_21 = PROFILE

    patient = dict(report.patient)
    if patient.get("status") != STATUS_QUAL:
        patient["ins"] = ""  # Référentiel INS: the INS is only used for a qualified identity
    add_pid(message, patient)
    pv1 = message.add_segment("PV1")
    pv1.pv1_2 = "N"  # not applicable: the report is not tied to an encounter of ours

    placer = _ei(report.placer_number, report.placer_authority)
    orc = message.add_segment("ORC")
    orc.orc_1 = "RE"
    orc.orc_2 = placer
    if report.accession_number:
        orc.orc_3 = _ei(report.accession_number, report.accession_authority)
    orc.orc_12 = _xcn(signer)
    orc.orc_21 = (
        f"{_text(platform.name)}^^^^^ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO^FINEG^^^{_text(platform.finess)}"
        if platform.finess
        else _text(platform.name)
    )
    obr = message.add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_2 = placer
    if report.accession_number:
        obr.obr_3 = _ei(report.accession_number, report.accession_authority)
    obr.obr_4 = DOCUMENT_TYPE
    obr.obr_7 = _hl7_time(report.exam_at or report.signed_at)
    obr.obr_22 = _hl7_time(report.signed_at)
    obr.obr_25 = "F"

    document = message.add_segment("OBX")
    document.obx_1 = "1"
    document.obx_2 = "ED"
    document.obx_3 = DOCUMENT_TYPE
    document.obx_5 = "^TEXT^XML^Base64^" + base64.b64encode(cda).decode("ascii")
    document.obx_11 = "F" if report.version <= 1 else "C"
    document.obx_14 = _hl7_time(report.signed_at)
    document.obx_16 = _xcn(signer)
    dmp = message.add_segment("OBX")
    dmp.obx_1 = "2"
    dmp.obx_2 = "CE"
    dmp.obx_3 = "DESTDMP^Destinataire DMP^MetaDMPMSS"
    dmp.obx_5 = "Y"
    dmp.obx_11 = "F"
    return str(message.to_er7()) + "\r"
