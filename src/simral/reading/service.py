"""Imaging requests for remote interpretation (DESIGN.md §7; ANS "Volet Téléradiologie", flux 1 to 4).

The lifecycle of a request, whatever brought it (the site's RIS over HL7, or the portal form for
sites without a RIS):

- :func:`receive_request` (flux 1 TransmissionDemandeIMG): the patient is resolved with the identity
  service, the request is given its subspecialty and routed to a teleradiology group by the site's
  :class:`ReadingContract` (the rules of :mod:`simral.reading.routing`: subspecialty, modality, on-call
  schedule) and given a deadline; :func:`set_subspecialty` corrects the subspecialty;
- :func:`accept_request` / :func:`refuse_request` (flux 3 RéponseDemandeIMG): a radiologist of the
  group answers; an accepted request becomes a Scheduled Procedure Step (Modality Worklist, PS3.4
  K.6.1.2). A request that came from a RIS gets its answer (ORU^R01, or ORL^O22 for an IHE OMI^O23
  order) through the job queue, in the same transaction;
- :func:`cancel_request` (flux 2 AnnulationDemandeIMG): allowed until the post-exam complement
  arrived; the scheduled step is DISCONTINUED and any open reading task cancelled;
- :func:`record_complement` (flux 4): accession number, Study Instance UID, exam date, exam codes,
  equipment, products, dose, viewer URL; the request is performed and its reading task opened. It
  comes from the site's RIS (OMI^O23), the portal form of sites without a RIS, or the modality's
  MPPS COMPLETED (:mod:`simral.reading.mpps`), which only fills what the others left empty.

The reading task's deadline (:func:`reading_deadline`) counts the requester's desired delay from the
request's reception and the contract's turnaround from the moment the exam is available.

Every operation asks :mod:`simral.access.policy` and writes an audit record; nothing commits here.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import case, delete, select
from sqlalchemy.orm import Session

from simral.access.policy import (
    AccessDenied,
    Principal,
    may_manage,
    may_perform_procedures,
    may_request_exam,
    may_review_requests,
    may_store,
    peer_binding_refusal,
    visible_studies,
)
from simral.archive.models import Study, StudyOrganisation
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.hl7 import answers
from simral.hl7.client import enqueue_message
from simral.identity.models import Organisation
from simral.patients import service as patients
from simral.patients.models import PatientIdentity
from simral.patients.service import AuthorityRef, Ins, Traits
from simral.reading import routing
from simral.reading.models import (
    PRIORITIES,
    PRIORITY_ROUTINE,
    PRIORITY_URGENT,
    REQUEST_ACCEPTED,
    REQUEST_CANCELLED,
    REQUEST_PERFORMED,
    REQUEST_RECEIVED,
    REQUEST_REFUSED,
    REQUEST_REPORTED,
    STEP_COMPLETED,
    STEP_DISCONTINUED,
    STEP_IN_PROGRESS,
    STEP_SCHEDULED,
    TASK_CANCELLED,
    TASK_REPORTED,
    ImagingRequest,
    ReadingContract,
    ReadingTask,
    RisEndpoint,
    ScheduledProcedure,
)
from simral.reading.tasks import open_task

#: ``source`` of the requests made with the portal form.
PORTAL_SOURCE = "portal"


class ReadingError(ValueError):
    """A request operation that cannot be done. ``code`` is the HL7 table 0357 condition an HL7
    adapter answers with (204 unknown key, 205 duplicate key, 206 record locked, 101 required field
    missing, 207 other); ``circumstantial`` errors (no contract, unknown RIS) may succeed when the
    message is sent again later (ANS guide, acquittement: AR). ``reason`` names the rule broken
    for callers that word the refusal themselves (``complement_from_ris``: a portal complement
    for a request that came from the site's RIS, :func:`record_complement`)."""

    def __init__(
        self, message: str, *, code: str = "207", circumstantial: bool = False, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.circumstantial = circumstantial
        self.reason = reason


# ----------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class PatientRef:
    """The patient as a request names them: IPP (in its authority) and/or INS, traits, status."""

    traits: Traits
    ipp: str = ""
    ipp_authority: AuthorityRef | None = None
    ins: Ins | None = None
    status: str | None = None
    attributes: str | None = None
    #: PV1-19 visit number (the appointment id, ANS guide "contraintes communes").
    visit_number: str = ""


@dataclass(frozen=True)
class RequestDetails:
    """The clinical and administrative content of a request (flux 1: ORC, OBR, NTE, OBX)."""

    placer_number: str
    placer_authority: str = ""
    requested_at: datetime | None = None
    priority: str = PRIORITY_ROUTINE
    desired_delay: str = ""
    justification: str = ""
    clinical_history: str = ""
    purpose: str = ""
    modality: str = ""
    #: [{"code", "system", "display", "sub_id"}] (JDV 1.2.250.1.213.1.1.5.695, SNOMED CT).
    anatomy: list[dict[str, str]] = field(default_factory=list)
    pregnancy: str = ""
    height_cm: float | None = None
    weight_kg: float | None = None
    consent: bool = False
    appointment_at: datetime | None = None
    #: {"id", "family", "given", "authority", "phone", "facility"} (ORC-12 / ORC-14 / ORC-21).
    requester: dict[str, str] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)
    #: Accession number, its issuer and the Study Instance UID, when the RIS scheduled the exam
    #: itself and sent them with the order (IHE SWF OMI^O23 IPC segment).
    accession_number: str = ""
    accession_authority: str = ""
    study_uid: str = ""
    #: The subspecialty chosen by the requester (:data:`simral.reading.routing.SUBSPECIALTIES`);
    #: empty: derived from ``anatomy``.
    subspecialty: str = ""
    #: The HL7 order it came in (:attr:`ImagingRequest.hl7_order`: message type, control id, OBR-4),
    #: which shapes its answer (:mod:`simral.hl7.answers`); empty for the portal form.
    hl7_order: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Complement:
    """The post-exam complement (flux 4: IPC, TQ1 and OBX groups)."""

    accession_number: str
    study_uid: str
    accession_authority: str = ""
    performed_at: datetime | None = None
    #: TQ1-6: how long the site keeps the images, in days.
    retention_days: int | None = None
    #: CODE_ACTE_IMAGERIE (LOINC, JDV 1.2.250.1.213.1.1.5.687; CCAM allowed): [{"code", "system", "display"}].
    exam_codes: list[dict[str, str]] = field(default_factory=list)
    requested_procedure: str = ""
    modality: str = ""
    anatomy: list[dict[str, str]] = field(default_factory=list)
    #: PRODUIT_ADMINISTRE occurrences: [{"type", "system", "lot", "quantity", "unit"}].
    products: list[dict[str, str]] = field(default_factory=list)
    #: APPAREIL_IMAGERIE occurrences: [{"udi", "model"}] (from an MPPS also "station").
    equipment: list[dict[str, str]] = field(default_factory=list)
    viewer_url: str = ""
    #: The dose delivered (ionising exams; DESIGN.md §7 report structure), with the keys of
    #: :data:`simral.reading.reports.DOSE_FIELDS` but ``equipment``: ``ctdivol_mgy``,
    #: ``dlp_mgycm``, ``dap_gycm2``, ``fluoro_seconds``; decimal texts.
    dose: dict[str, str] = field(default_factory=dict)


#: Where a post-exam complement came from (``complement["origins"]`` of the request).
COMPLEMENT_RIS = "ris"
COMPLEMENT_PORTAL = "portal"
#: The modality's MPPS COMPLETED (PS3.4 F.7): it fills what the RIS or the site left empty and
#: never overwrites what they gave.
COMPLEMENT_MPPS = "mpps"
COMPLEMENT_ORIGINS = (COMPLEMENT_RIS, COMPLEMENT_PORTAL, COMPLEMENT_MPPS)
#: Dose keys a complement keeps (decimal numbers as text).
DOSE_KEYS = ("ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "fluoro_seconds")


# ------------------------------------------------------------------------- configuration


def _may_configure(principal: Principal, site_code: str) -> None:
    if not may_manage(principal, site_code):
        raise AccessDenied(f"{principal.audit_name} may not configure the teleradiology of {site_code}")


def _organisation(session: Session, code: str) -> Organisation:
    found = session.scalar(select(Organisation).where(Organisation.code == code))
    if found is None:
        raise ReadingError(f"no organisation with code {code!r}", code="204")
    return found


def add_ris_endpoint(
    session: Session,
    *,
    name: str,
    site_code: str,
    host: str,
    port: int,
    application: str = "",
    facility: str = "",
    tls: bool = False,
    check_host: bool = False,
    tls_subject: str = "",
    principal: Principal,
) -> RisEndpoint:
    """Register a site's RIS: the HL7 sender it is known by (MSH-3/MSH-4) and where answers go.

    With ``check_host`` its messages are accepted from ``host`` only; with ``tls_subject`` only over
    MLLP TLS with a verified client certificate of that subject CN (:func:`ris_sender_refusal`)."""
    _may_configure(principal, site_code)
    _organisation(session, site_code)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ReadingError(f"invalid RIS endpoint name {name!r} (letters, digits, . _ -; up to 64)")
    if not 0 < port < 65536:
        raise ReadingError(f"invalid port {port}")
    if session.scalar(select(RisEndpoint.id).where(RisEndpoint.name == name)) is not None:
        raise ReadingError(f"a RIS endpoint named {name!r} already exists", code="205")
    endpoint = RisEndpoint(
        name=name,
        site_code=site_code,
        application=application or name,
        facility=facility,
        host=host,
        port=port,
        tls=tls,
        check_host=check_host,
        tls_subject=tls_subject.strip(),
        created_at=utcnow(),
    )
    session.add(endpoint)
    session.flush()
    audit.record(
        session,
        action="ris-endpoint.create",
        principal=principal,
        detail={
            "name": name,
            "site": site_code,
            "host": host,
            "port": port,
            "tls": tls,
            "check_host": check_host,
            "tls_subject": tls_subject.strip(),
        },
    )
    return endpoint


def list_ris_endpoints(session: Session) -> list[RisEndpoint]:
    """Every registered RIS, by name."""
    return list(session.scalars(select(RisEndpoint).order_by(RisEndpoint.name)))


def remove_ris_endpoint(session: Session, name: str, *, principal: Principal) -> None:
    """Forget a RIS (answers still queued for it fail permanently)."""
    endpoint = session.scalar(select(RisEndpoint).where(RisEndpoint.name == name))
    if endpoint is None:
        raise ReadingError(f"no RIS endpoint named {name!r}", code="204")
    _may_configure(principal, endpoint.site_code)
    session.delete(endpoint)
    audit.record(
        session,
        action="ris-endpoint.delete",
        principal=principal,
        detail={"name": name, "site": endpoint.site_code},
    )


def ris_sender_refusal(
    session: Session, *, application: str, facility: str, address: str, tls_subject: str | None
) -> str:
    """Why a message naming ``application``/``facility`` (MSH-3/MSH-4) may not be taken from this
    connection, or "" when it may: a registered RIS bound to its host (``check_host``) or to a
    client certificate (``tls_subject``) is only believed from there. A sender that is no
    registered RIS is the network's to admit (the listener's exposure and TLS)."""
    endpoint = find_ris_endpoint(session, application, facility)
    if endpoint is None:
        return ""
    return ris_endpoint_refusal(endpoint, address=address, tls_subject=tls_subject)


def ris_endpoint_refusal(endpoint: RisEndpoint, *, address: str, tls_subject: str | None) -> str:
    """Why the registered RIS ``endpoint`` is not believed on this connection (its host or client
    certificate binding, :func:`simral.access.policy.peer_binding_refusal`), or ""."""
    refused = peer_binding_refusal(
        bound_host=endpoint.host,
        check_host=endpoint.check_host,
        bound_subject=endpoint.tls_subject,
        address=address,
        subject=tls_subject,
    )
    return f"RIS {endpoint.name} {refused}" if refused else ""


def find_ris_endpoint(session: Session, application: str, facility: str) -> RisEndpoint | None:
    """The RIS that sends as ``application``/``facility`` (MSH-3/MSH-4): the one registered with
    both, else one registered with the application alone."""
    candidates = session.scalars(
        select(RisEndpoint).where(RisEndpoint.application == application).order_by(RisEndpoint.id)
    )
    return patients.sender_for_facility(list(candidates), facility)


def _modalities(value: str) -> str:
    items = [m.strip().upper() for m in re.split(r"[\\,\s]+", value) if m.strip()]
    for item in items:
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", item):
            raise ReadingError(f"invalid modality {item!r} (a DICOM CS value such as CT or MR)")
    return "\\".join(items)


def add_contract(
    session: Session,
    *,
    site_code: str,
    group_code: str,
    modalities: str = "",
    urgent_minutes: int = 60,
    routine_minutes: int = 24 * 60,
    subspecialties: str = "",
    principal: Principal,
) -> ReadingContract:
    """A site's exams (of ``modalities``, backslash-separated, or all; needing one of
    ``subspecialties``, or any) are read by ``group_code``."""
    _may_configure(principal, site_code)
    _organisation(session, site_code)
    group = _organisation(session, group_code)
    if group.kind != "teleradiology-group":
        raise ReadingError(f"{group_code} is a {group.kind}, not a teleradiology-group")
    if urgent_minutes <= 0 or routine_minutes <= 0:
        raise ReadingError("deadlines are positive numbers of minutes")
    existing = session.scalar(
        select(ReadingContract).where(
            ReadingContract.site_code == site_code, ReadingContract.group_code == group_code
        )
    )
    if existing is not None:
        raise ReadingError(f"{site_code} already has a contract with {group_code}", code="205")
    try:
        covered = routing.parse_subspecialties(subspecialties)
    except routing.ScheduleError as exc:
        raise ReadingError(str(exc), code="103") from exc
    contract = ReadingContract(
        site_code=site_code,
        group_code=group_code,
        modalities=_modalities(modalities),
        subspecialties=covered,
        urgent_minutes=urgent_minutes,
        routine_minutes=routine_minutes,
        active=True,
        created_at=utcnow(),
    )
    session.add(contract)
    session.flush()
    audit.record(
        session,
        action="reading-contract.create",
        principal=principal,
        detail={
            "site": site_code,
            "group": group_code,
            "modalities": contract.modalities,
            "subspecialties": contract.subspecialties,
            "urgent_minutes": urgent_minutes,
            "routine_minutes": routine_minutes,
        },
    )
    return contract


def list_contracts(session: Session) -> list[ReadingContract]:
    """Every contract, by site and group."""
    return list(
        session.scalars(
            select(ReadingContract).order_by(ReadingContract.site_code, ReadingContract.group_code)
        )
    )


def remove_contract(session: Session, *, site_code: str, group_code: str, principal: Principal) -> None:
    """End a contract (requests already routed stay with their group)."""
    _may_configure(principal, site_code)
    result = session.execute(
        delete(ReadingContract).where(
            ReadingContract.site_code == site_code, ReadingContract.group_code == group_code
        )
    )
    if not getattr(result, "rowcount", 0):
        raise ReadingError(f"no contract between {site_code} and {group_code}", code="204")
    audit.record(
        session,
        action="reading-contract.delete",
        principal=principal,
        detail={"site": site_code, "group": group_code},
    )


def route(
    session: Session,
    *,
    site_code: str,
    modality: str,
    subspecialty: str = "",
    now: datetime | None = None,
) -> ReadingContract | None:
    """The active contract reading an exam of ``modality`` needing ``subspecialty`` for
    ``site_code`` at ``now`` (default: the clock): :func:`simral.reading.routing.route`."""
    return routing.route(
        session,
        site_code=site_code,
        modality=modality,
        subspecialty=subspecialty,
        now=now if now is not None else utcnow(),
    )


# ------------------------------------------------------------------------------- deadlines

_ISO_DURATION = re.compile(r"^P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?$")
_PLAIN_DURATION = re.compile(r"^(\d+)\s*(min|mn|m|minutes?|h|heures?|hours?|j|jours?|d|days?)?$")


def parse_delay(value: str) -> timedelta | None:
    """A desired delay: an ISO 8601 duration (``PT4H``, ``P2D``) or ``<n> min|h|j|d``; a bare
    number is minutes. None when empty; :class:`ReadingError` when unreadable."""
    text = value.strip()
    if not text:
        return None
    iso = _ISO_DURATION.match(text.upper())
    if iso and any(iso.groups()):
        weeks, days, hours, minutes = (int(g or 0) for g in iso.groups())
        return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes)
    plain = _PLAIN_DURATION.match(text.lower())
    if plain:
        number, unit = int(plain.group(1)), (plain.group(2) or "min")
        if unit.startswith(("h",)):
            return timedelta(hours=number)
        if unit.startswith(("j", "d")):
            return timedelta(days=number)
        return timedelta(minutes=number)
    raise ReadingError(f"unreadable desired delay {value!r} (e.g. PT4H, P2D, 90 min)", code="102")


def deadline(
    start: datetime,
    *,
    priority: str,
    desired_delay: str,
    contract: ReadingContract | None,
    appointment_at: datetime | None = None,
) -> datetime | None:
    """The earliest of: the contract's turnaround for the priority, the requester's desired delay,
    the appointment (an answer is needed before the exam)."""
    candidates: list[datetime] = []
    if contract is not None:
        minutes = contract.urgent_minutes if priority == PRIORITY_URGENT else contract.routine_minutes
        candidates.append(start + timedelta(minutes=minutes))
    delay = parse_delay(desired_delay)
    if delay is not None:
        candidates.append(start + delay)
    if appointment_at is not None:
        candidates.append(appointment_at)
    return min(candidates) if candidates else None


def reading_deadline(
    request: ImagingRequest, *, contract: ReadingContract | None, available_at: datetime
) -> datetime | None:
    """When the report of ``request``'s exam is due: the earliest of the contract's turnaround for
    the priority, counted from ``available_at`` (the exam is there to read: the post-exam
    complement or the images arrived), and the requester's desired delay counted from the request's
    reception (flux 1 carries it as the requester's wish; the HL7 adapter turns its end date/time
    into a delay from reception, the portal form offers it as a delay from sending). Counting the
    desired delay again from the complement would push the deadline past what was asked.

    Nothing when neither applies (the caller keeps the request's own deadline)."""
    candidates: list[datetime] = []
    if contract is not None:
        minutes = contract.urgent_minutes if request.priority == PRIORITY_URGENT else contract.routine_minutes
        candidates.append(available_at + timedelta(minutes=minutes))
    delay = parse_delay(request.desired_delay)
    received = as_utc(request.created_at)
    if delay is not None and received is not None:
        candidates.append(received + delay)
    return min(candidates) if candidates else None


# ---------------------------------------------------------------------------- the patient


def _patient_record(patient: PatientRef) -> dict[str, Any]:
    """The patient as the request named them (display and answer messages)."""
    traits = patient.traits
    return {
        "ipp": patient.ipp,
        "ipp_namespace": patient.ipp_authority.namespace if patient.ipp_authority else "",
        "ipp_oid": patient.ipp_authority.oid if patient.ipp_authority else "",
        "ins": patient.ins.matricule if patient.ins else "",
        "ins_oid": patient.ins.oid if patient.ins else "",
        "birth_name": traits.birth_name,
        "birth_given_names": traits.birth_given_names,
        "first_birth_given_name": traits.first_birth_given_name,
        "used_name": traits.used_name,
        "used_given_name": traits.used_given_name,
        "sex": traits.sex,
        "birth_date": traits.birth_date,
        "birth_place_code": traits.birth_place_code,
        "status": patient.status or "",
        "visit_number": patient.visit_number,
    }


def _identity_principal(principal: Principal) -> Principal:
    """Who feeds the identity service for a request: the principal itself when it may, else the
    platform on its behalf (a referring physician's request form names a patient; the request
    rights were checked already)."""
    if principal.kind == "system" or may_store(principal):
        return principal
    return Principal(
        kind="system",
        name=f"request-form:{principal.name}"[:100],
        organisation=principal.organisation,
        address=principal.address,
        via=principal.via,
    )


def _resolve_patient(
    session: Session,
    patient: PatientRef,
    *,
    site_code: str,
    principal: Principal,
    source: str,
    allow_test_ins: bool,
) -> PatientIdentity | None:
    """The identity the request is about: created or updated from the IPP (PAM France rules), else
    the identity already known with this INS (the site's first); None when only an unknown INS."""
    if patient.ipp:
        result = patients.upsert_identity(
            session,
            local_id=patient.ipp,
            authority=patient.ipp_authority or AuthorityRef(organisation_code=site_code),
            traits=patient.traits,
            ins=patient.ins,
            status=patient.status,
            attributes=patient.attributes,
            principal=_identity_principal(principal),
            source=source,
            allow_test_ins=allow_test_ins,
        )
        return result.identity
    if patient.ins is None:
        raise ReadingError("the request names no patient: an IPP or an INS is required", code="101")
    ins = patients.check_ins(patient.ins, allow_test=allow_test_ins)
    known = patients.identities_by_ins(session, ins)
    site_authority = patients.organisation_authority_id(session, site_code)
    for identity in known:
        if identity.authority_id == site_authority:
            return identity
    return known[0] if known else None


def audit_request(
    session: Session, action: str, request: ImagingRequest, *, principal: Principal, detail: dict[str, Any]
) -> None:
    """Audit an action on an imaging request, naming its patient (the request's IPP and INS)."""
    patient = request.patient or {}
    audit.record(
        session,
        action=action,
        principal=principal,
        study_uid=request.study_uid,
        patient_id=patient.get("ipp") or patient.get("ins", ""),
        patient_issuer=patient.get("ipp_oid") or patient.get("ipp_namespace") or patient.get("ins_oid", ""),
        detail={
            "request": request.id,
            "site": request.site_code,
            "group": request.group_code,
            "placer": request.placer_number,
            **detail,
        },
    )


# ------------------------------------------------------------------------------ requests


def receive_request(
    session: Session,
    *,
    site_code: str,
    patient: PatientRef,
    details: RequestDetails,
    principal: Principal,
    source: str,
    allow_test_ins: bool = False,
) -> ImagingRequest:
    """Record a new request (flux 1) routed to its reading group, with its deadline.

    Refused: a placer number already used by the site in the same authority (205), a request
    without modality (101), a site without a contract for the modality (circumstantial).
    """
    if not may_request_exam(principal, site_code):
        raise AccessDenied(f"{principal.audit_name} may not request exams for {site_code}")
    number = details.placer_number.strip()
    if not number or len(number) > 64:
        raise ReadingError("the placer order number (ORC-2) is required (up to 64 characters)", code="101")
    if details.priority not in PRIORITIES:
        raise ReadingError(f"unknown priority {details.priority!r}", code="103")
    authority = details.placer_authority.strip()
    if len(authority) > 64:
        # Stored as given or not at all: a cut value would miss the duplicate check below and then
        # collide with the request it duplicates (the HL7 fuzzer's ORM sent twice).
        raise ReadingError(
            "the placer order number's assigning authority (ORC-2.3) is longer than 64 characters",
            code="102",
        )
    duplicate = session.scalar(
        select(ImagingRequest).where(
            ImagingRequest.site_code == site_code,
            ImagingRequest.placer_number == number,
            ImagingRequest.placer_authority == authority,
        )
    )
    if duplicate is not None:
        raise ReadingError(
            f"request {number} ({authority or 'no authority'}) of {site_code} was already received "
            f"on {duplicate.created_at:%Y-%m-%d %H:%M} UTC (state {duplicate.state}): a new request "
            "needs a new placer order number",
            code="205",
        )
    modality = details.modality.strip().upper()[:16]
    if not modality:
        raise ReadingError("the requested modality (OBX MODALITE_IMAGERIE) is required", code="101")
    try:
        subspecialty = routing.exam_subspecialty(details.subspecialty, details.anatomy)
    except routing.ScheduleError as exc:
        raise ReadingError(str(exc), code="103") from exc
    now = utcnow()
    contract = route(session, site_code=site_code, modality=modality, subspecialty=subspecialty, now=now)
    if contract is None:
        needing = f" ({subspecialty})" if subspecialty else ""
        raise ReadingError(
            f"no reading contract of {site_code} covers modality {modality}{needing} (simral contracts add)",
            circumstantial=True,
        )
    identity = _resolve_patient(
        session,
        patient,
        site_code=site_code,
        principal=principal,
        source=source,
        allow_test_ins=allow_test_ins,
    )
    request = ImagingRequest(
        site_code=site_code,
        group_code=contract.group_code,
        placer_number=number,
        placer_authority=authority,
        identity_id=identity.id if identity is not None else None,
        patient=_patient_record(patient),
        requested_at=details.requested_at,
        priority=details.priority,
        desired_delay=details.desired_delay.strip()[:32],
        due_at=deadline(
            now,
            priority=details.priority,
            desired_delay=details.desired_delay,
            contract=contract,
            appointment_at=details.appointment_at,
        ),
        justification=details.justification,
        clinical_history=details.clinical_history,
        purpose=details.purpose,
        modality=modality,
        anatomy=list(details.anatomy),
        subspecialty=subspecialty,
        pregnancy=details.pregnancy[:8],
        height_cm=details.height_cm,
        weight_kg=details.weight_kg,
        consent=details.consent,
        appointment_at=details.appointment_at,
        requester=dict(details.requester),
        documents=list(details.documents),
        state=REQUEST_RECEIVED,
        accession_number=details.accession_number[:16],
        accession_authority=details.accession_authority[:64],
        study_uid=details.study_uid[:64],
        source=source[:128],
        hl7_order=dict(details.hl7_order),
        created_at=now,
        updated_at=now,
    )
    session.add(request)
    session.flush()
    audit_request(
        session,
        "imaging-request.receive",
        request,
        principal=principal,
        detail={
            "modality": modality,
            "subspecialty": subspecialty,
            "priority": request.priority,
            "source": request.source,
        },
    )
    return request


def get_request(
    session: Session, request_id: int, *, principal: Principal, audited: bool = True
) -> ImagingRequest:
    """A request its group's radiologists or its site's members may see (the reading is audited)."""
    request = session.get(ImagingRequest, request_id)
    if request is None:
        raise ReadingError(f"no imaging request {request_id}", code="204")
    if not (
        may_review_requests(principal, request.group_code) or may_request_exam(principal, request.site_code)
    ):
        raise AccessDenied(f"{principal.audit_name} may not see imaging request {request_id}")
    if audited:
        audit_request(session, "imaging-request.read", request, principal=principal, detail={})
    return request


def find_by_placer(
    session: Session, *, site_code: str, placer_number: str, placer_authority: str
) -> ImagingRequest | None:
    """The site's request with this placer order number (ORC-2)."""
    return session.scalar(
        select(ImagingRequest).where(
            ImagingRequest.site_code == site_code,
            ImagingRequest.placer_number == placer_number.strip(),
            ImagingRequest.placer_authority == placer_authority.strip(),
        )
    )


#: What a professional does with requests, by the organisation they act for (:func:`workspace`).
WORKSPACE_GROUP = "group"
WORKSPACE_SITE = "site"


def workspace(session: Session, principal: Principal) -> str:
    """``group`` for a radiologist acting for a teleradiology group (reviews the requests routed to
    it), ``site`` for a clinical member acting for another organisation (requests exams), else
    empty."""
    if principal.kind != "user" or not principal.organisation:
        return ""
    kind = session.scalar(select(Organisation.kind).where(Organisation.code == principal.organisation))
    if kind == "teleradiology-group":
        return WORKSPACE_GROUP if may_review_requests(principal, principal.organisation) else ""
    return WORKSPACE_SITE if may_request_exam(principal, principal.organisation) else ""


def list_requests(session: Session, *, principal: Principal, limit: int = 200) -> list[ImagingRequest]:
    """The requests ``principal`` works on (:func:`workspace`): routed to its group, or made by its
    site. Waiting ones first, urgent first, then by deadline."""
    organisation = principal.organisation
    query = select(ImagingRequest)
    role = workspace(session, principal)
    if role == WORKSPACE_GROUP:
        query = query.where(ImagingRequest.group_code == organisation)
    elif role == WORKSPACE_SITE:
        query = query.where(ImagingRequest.site_code == organisation)
    else:
        return []
    order = (
        case(
            (ImagingRequest.state == REQUEST_RECEIVED, 0),
            (ImagingRequest.state == REQUEST_ACCEPTED, 1),
            else_=2,
        ),
        case((ImagingRequest.priority == PRIORITY_URGENT, 0), else_=1),
        ImagingRequest.due_at.is_(None),
        ImagingRequest.due_at,
        ImagingRequest.id.desc(),
    )
    return list(session.scalars(query.order_by(*order).limit(limit)))


def _for_review(session: Session, request_id: int, principal: Principal) -> ImagingRequest:
    request = session.get(ImagingRequest, request_id)
    if request is None:
        raise ReadingError(f"no imaging request {request_id}", code="204")
    if not may_review_requests(principal, request.group_code):
        raise AccessDenied(
            f"{principal.audit_name} may not answer requests of {request.group_code or 'no group'}"
        )
    if request.state != REQUEST_RECEIVED:
        raise ReadingError(f"request {request.placer_number} was already answered (state {request.state})")
    return request


def _send_answer(
    session: Session,
    request: ImagingRequest,
    *,
    principal: Principal,
    step: ScheduledProcedure | None = None,
) -> int | None:
    """Queue the answer for the RIS the request came from, in this transaction: flux 3 ORU^R01, or
    ORL^O22 for an IHE OMI^O23 order (:mod:`simral.hl7.answers`); None for a portal request (the
    site reads the answer in the portal)."""
    if not request.source.startswith("hl7:"):
        return None
    name = request.source[4:]
    endpoint = session.scalar(select(RisEndpoint).where(RisEndpoint.name == name))
    if endpoint is None or endpoint.site_code != request.site_code:
        raise ReadingError(
            f"the RIS {name} of {request.site_code} that sent the request is no longer registered "
            "(simral ris add): its answer cannot be sent",
            circumstantial=True,
        )
    group = session.scalar(select(Organisation).where(Organisation.code == request.group_code))
    control_id = f"TLR{request.id}{uuid.uuid4().hex[:10].upper()}"
    message = answers.build(
        request,
        step=step,
        control_id=control_id,
        receiver=answers.Party(application=endpoint.application, facility=endpoint.facility),
        platform=answers.Party(
            application="SIMRAL",
            facility=request.group_code,
            name=group.name if group is not None else request.group_code,
            finess=group.finess if group is not None else "",
        ),
        responder=answers.Responder(
            national_id=principal.national_id, name=principal.display_name or principal.name
        ),
    )
    return enqueue_message(
        session,
        endpoint=endpoint,
        message=message,
        control_id=control_id,
        subject=f"imaging-request:{request.id}",
    )


def _generated_accession(request: ImagingRequest) -> str:
    """An Accession Number (SH, ≤ 16 characters) unique on the platform: ``TLR`` + the request id."""
    return f"TLR{request.id:07d}"[:16]


def _procedure_description(request: ImagingRequest) -> str:
    regions = [str(item.get("display") or item.get("code", "")) for item in request.anatomy or []]
    return " ".join([request.modality, *regions]).strip()[:64]


def accept_request(
    session: Session, request_id: int, *, protocol: str, principal: Principal
) -> tuple[ImagingRequest, ScheduledProcedure]:
    """Accept a request with its imaging protocol (flux 3, ORC-1 OK): the exam is scheduled on the
    Modality Worklist of the site and the answer queued for the site's RIS."""
    request = _for_review(session, request_id, principal)
    text = protocol.strip()
    if not text:
        raise ReadingError("an accepted request needs its imaging protocol", code="101")
    now = utcnow()
    request.state = REQUEST_ACCEPTED
    request.protocol = text
    request.answered_by = principal.name[:128]
    request.answered_at = now
    request.updated_at = now
    step = ScheduledProcedure(
        request_id=request.id,
        site_code=request.site_code,
        step_id=f"SPS{request.id}"[:16],
        requested_procedure_id=f"RP{request.id}"[:16],
        accession_number=request.accession_number or _generated_accession(request),
        study_uid=request.study_uid or str(generate_uid()),
        modality=request.modality,
        station_ae="",
        start_at=request.appointment_at or now,
        description=_procedure_description(request),
        state=STEP_SCHEDULED,
        created_at=now,
        updated_at=now,
    )
    session.add(step)
    session.flush()
    job = _send_answer(session, request, principal=principal, step=step)
    audit_request(
        session,
        "imaging-request.accept",
        request,
        principal=principal,
        detail={"accession": step.accession_number, "study": step.study_uid, "answer_job": job},
    )
    return request, step


def refuse_request(session: Session, request_id: int, *, reason: str, principal: Principal) -> ImagingRequest:
    """Refuse a request with its reason (flux 3 ORC-1 OC, or ORL^O22 ORC-1 UA; ORC-16); the answer is
    queued for the RIS."""
    request = _for_review(session, request_id, principal)
    text = reason.strip()
    if not text:
        raise ReadingError("a refusal needs its reason", code="101")
    now = utcnow()
    request.state = REQUEST_REFUSED
    request.refusal_reason = text
    request.answered_by = principal.name[:128]
    request.answered_at = now
    request.updated_at = now
    job = _send_answer(session, request, principal=principal)
    audit_request(session, "imaging-request.refuse", request, principal=principal, detail={"answer_job": job})
    return request


def _check_site(request: ImagingRequest, principal: Principal) -> None:
    if not may_request_exam(principal, request.site_code):
        raise AccessDenied(f"{principal.audit_name} may not change requests of {request.site_code}")


def _open_tasks(session: Session, request_id: int) -> list[ReadingTask]:
    """The request's reading tasks not yet reported nor cancelled."""
    return list(
        session.scalars(
            select(ReadingTask).where(
                ReadingTask.request_id == request_id,
                ReadingTask.state.not_in((TASK_REPORTED, TASK_CANCELLED)),
            )
        )
    )


def cancel_request(
    session: Session, request: ImagingRequest, *, reason: str, principal: Principal
) -> ImagingRequest:
    """Cancel a request (flux 2): allowed until the post-exam complement arrived (ANS guide, flux 2);
    its scheduled step is DISCONTINUED and its open reading tasks cancelled. Cancelling a cancelled
    request changes nothing."""
    _check_site(request, principal)
    if request.state == REQUEST_CANCELLED:
        return request
    if request.state in (REQUEST_PERFORMED, REQUEST_REPORTED):
        when = request.updated_at.strftime("%Y-%m-%d %H:%M") if request.updated_at else "?"
        raise ReadingError(
            f"request {request.placer_number} cannot be cancelled: the exam was performed and its "
            f"post-exam complement received ({when} UTC); it is {request.state}",
            code="206",
        )
    now = utcnow()
    request.state = REQUEST_CANCELLED
    request.cancel_reason = reason.strip()
    request.updated_at = now
    steps = list(
        session.scalars(
            select(ScheduledProcedure).where(
                ScheduledProcedure.request_id == request.id,
                ScheduledProcedure.state.in_((STEP_SCHEDULED, STEP_IN_PROGRESS)),
            )
        )
    )
    for step in steps:
        step.state = STEP_DISCONTINUED
        step.updated_at = now
    tasks = _open_tasks(session, request.id)
    for task in tasks:
        task.state = TASK_CANCELLED
        task.updated_at = now
    audit_request(
        session,
        "imaging-request.cancel",
        request,
        principal=principal,
        detail={"steps": [s.step_id for s in steps], "tasks": [t.id for t in tasks]},
    )
    return request


def _complement_sender(request: ImagingRequest, principal: Principal, origin: str) -> None:
    """Who may give a request's post-exam complement: the site (its RIS, its clinical members);
    for an MPPS also the site's modalities (IHE SWF: the modality reports the performed step).
    The portal form gives it only for a request made with the portal (a site without a RIS): one
    that came from the site's RIS gets it from the RIS (flux 4) or the modality's MPPS."""
    if origin == COMPLEMENT_MPPS and may_perform_procedures(principal, request.site_code):
        return
    _check_site(request, principal)
    if origin == COMPLEMENT_PORTAL and request.source != PORTAL_SOURCE:
        raise ReadingError(
            f"request {request.placer_number} came from the site's RIS: its post-exam complement comes "
            "from the RIS (flux 4) or the modality (MPPS), not from the portal",
            code="207",
            reason="complement_from_ris",
        )


def _merged_complement(
    previous: dict[str, Any], complement: Complement, *, fill_only: bool, now: datetime
) -> dict[str, Any]:
    """The request's complement once ``complement`` is added to ``previous``: a value given
    replaces the one known (an empty one changes nothing, as an empty HL7 v2 field), except with
    ``fill_only`` (an MPPS), where only what is still unknown is filled."""
    merged = dict(previous)

    def put(key: str, value: Any) -> None:
        if value in (None, "", [], {}):
            merged.setdefault(key, value)
            return
        if fill_only and merged.get(key) not in (None, "", [], {}):
            return
        merged[key] = value

    put("performed_at", complement.performed_at.isoformat() if complement.performed_at else "")
    put("retention_days", complement.retention_days)
    put("exam_codes", list(complement.exam_codes))
    put("requested_procedure", complement.requested_procedure)
    put("modality", complement.modality)
    put("anatomy", list(complement.anatomy))
    put("products", list(complement.products))
    put("equipment", list(complement.equipment))
    put("viewer_url", complement.viewer_url)
    dose = dict(previous.get("dose") or {})
    for key in DOSE_KEYS:
        value = str(complement.dose.get(key) or "").strip()[:32]
        if value and not (fill_only and dose.get(key)):
            dose[key] = value
    merged["dose"] = dose
    merged.setdefault("received_at", now.isoformat())
    return merged


def record_complement(
    session: Session,
    request: ImagingRequest,
    complement: Complement,
    *,
    principal: Principal,
    origin: str = COMPLEMENT_RIS,
) -> tuple[ImagingRequest, ReadingTask]:
    """Record the post-exam complement (flux 4): the request is performed and its reading task
    opened for the group (deadline: :func:`reading_deadline`). A later complement updates it: the
    values it gives replace those known, the ones it leaves empty stay; one from an MPPS
    (``origin`` :data:`COMPLEMENT_MPPS`) only fills what is still unknown, so an MPPS after the
    RIS's complement adds the dose and equipment without changing what the RIS said. One from the
    portal form (:data:`COMPLEMENT_PORTAL`, only for a request made with the portal) that leaves
    the accession number or the Study Instance UID empty keeps the request's, else those of its
    Scheduled Procedure Step (the ones the modality was given, :func:`scheduled_procedure`). Once
    it is recorded the request can no longer be cancelled (:func:`cancel_request`)."""
    if origin not in COMPLEMENT_ORIGINS:
        raise ValueError(f"unknown complement origin {origin!r}")
    _complement_sender(request, principal, origin)
    if request.state not in (REQUEST_ACCEPTED, REQUEST_PERFORMED):
        raise ReadingError(
            f"request {request.placer_number} is {request.state}: a post-exam complement needs an "
            "accepted request",
            code="207",
        )
    fill_only = origin == COMPLEMENT_MPPS
    accession = complement.accession_number.strip()
    study_uid = complement.study_uid.strip()
    if fill_only and request.state == REQUEST_PERFORMED:
        accession = request.accession_number or accession
        study_uid = request.study_uid or study_uid
    if origin == COMPLEMENT_PORTAL and not (accession and study_uid):
        step = scheduled_procedure(session, request)
        accession = accession or request.accession_number or (step.accession_number if step else "")
        study_uid = study_uid or request.study_uid or (step.study_uid if step else "")
    if not accession or len(accession) > 16:
        raise ReadingError("the accession number (IPC-1, up to 16 characters) is required", code="101")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", study_uid) or len(study_uid) > 64:
        raise ReadingError("the Study Instance UID (IPC-3) is required and must be a UID", code="101")
    now = utcnow()
    previous = dict(request.complement or {}) if request.state == REQUEST_PERFORMED else {}
    merged = _merged_complement(previous, complement, fill_only=fill_only, now=now)
    merged["origins"] = sorted({*(previous.get("origins") or []), origin})
    request.state = REQUEST_PERFORMED
    if not fill_only or accession != request.accession_number:
        request.accession_authority = complement.accession_authority[:64]
    request.accession_number = accession
    request.study_uid = study_uid
    request.complement = merged
    request.updated_at = now
    for step in session.scalars(
        select(ScheduledProcedure).where(
            ScheduledProcedure.request_id == request.id,
            ScheduledProcedure.state.in_((STEP_SCHEDULED, STEP_IN_PROGRESS)),
        )
    ):
        step.state = STEP_COMPLETED
        step.updated_at = now
    modality = str(merged.get("modality") or "") or request.modality
    contract = route(
        session, site_code=request.site_code, modality=modality, subspecialty=request.subspecialty, now=now
    )
    task = open_task(
        session,
        study_uid=study_uid,
        site_code=request.site_code,
        group_code=contract.group_code if contract is not None else request.group_code,
        modality=modality,
        priority=request.priority,
        due_at=reading_deadline(request, contract=contract, available_at=now) or request.due_at,
        request_id=request.id,
        subspecialty=request.subspecialty,
    )
    audit_request(
        session,
        "imaging-request.complement",
        request,
        principal=principal,
        detail={"accession": accession, "task": task.id, "origin": origin},
    )
    return request, task


def scheduled_procedure(session: Session, request: ImagingRequest) -> ScheduledProcedure | None:
    """The Scheduled Procedure Step the request's acceptance created (its accession number and
    Study Instance UID are the ones the modality was given)."""
    return session.scalar(
        select(ScheduledProcedure)
        .where(ScheduledProcedure.request_id == request.id)
        .order_by(ScheduledProcedure.id.desc())
        .limit(1)
    )


@dataclass(frozen=True)
class SiteStudy:
    """A study of the request's patient archived for its site (the complement form offers them)."""

    study_uid: str
    study_date: str
    accession_number: str
    modalities: str
    description: str


def site_studies(
    session: Session, request: ImagingRequest, *, principal: Principal, limit: int = 20
) -> list[SiteStudy]:
    """The studies of the request's patient (every identity of the person) that the requesting site
    holds and ``principal`` may see (:func:`simral.access.policy.visible_studies`), newest first."""
    if request.identity_id is None:
        return []
    identity = session.get(PatientIdentity, request.identity_id)
    if identity is None:
        return []
    person = patients.effective_identity(session, identity).person_id
    study_pks = patients.person_study_pks(session, person)
    if not study_pks:
        return []
    query = visible_studies(
        principal,
        select(Study).where(
            Study.id.in_(study_pks),
            Study.id.in_(
                select(StudyOrganisation.study_pk).where(
                    StudyOrganisation.organisation_code == request.site_code
                )
            ),
        ),
    )
    rows = session.scalars(
        query.order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc()).limit(limit)
    )
    return [
        SiteStudy(
            study_uid=row.study_uid,
            study_date=row.study_date,
            accession_number=row.accession_number,
            modalities=row.modalities,
            description=row.description,
        )
        for row in rows
    ]


def set_subspecialty(
    session: Session, request_id: int, *, subspecialty: str, principal: Principal
) -> ImagingRequest:
    """Set (or clear) the subspecialty of a request not yet reported: the group's reviewing
    radiologists or the requesting site. Its open reading tasks take it (their on-call assignment
    follows at the next periodic check); a task not yet opened is routed with it
    (:mod:`simral.reading.routing`). The request stays with the group that has it."""
    request = session.get(ImagingRequest, request_id)
    if request is None:
        raise ReadingError(f"no imaging request {request_id}", code="204")
    if not (
        may_review_requests(principal, request.group_code) or may_request_exam(principal, request.site_code)
    ):
        raise AccessDenied(f"{principal.audit_name} may not change imaging request {request_id}")
    if request.state in (REQUEST_REPORTED, REQUEST_CANCELLED, REQUEST_REFUSED):
        raise ReadingError(f"request {request.placer_number} is {request.state}: it is closed", code="207")
    try:
        code = routing.normalise_subspecialty(subspecialty)
    except routing.ScheduleError as exc:
        raise ReadingError(str(exc), code="103") from exc
    previous = request.subspecialty
    if code == previous:
        return request
    now = utcnow()
    request.subspecialty = code
    request.updated_at = now
    tasks = _open_tasks(session, request.id)
    for task in tasks:
        task.subspecialty = code
        task.updated_at = now
    audit_request(
        session,
        "imaging-request.subspecialty",
        request,
        principal=principal,
        detail={"subspecialty": code, "previous": previous, "tasks": [t.id for t in tasks]},
    )
    return request
