"""A teleradiology platform with studies ready to report, for the report tests (HTTP and browser).

Site CHSUD has its exams read by the group TLR (radiologists dr_roux and dr_blanc); another group,
TLR2, has dr_noir. Each exam is an accepted request of CHSUD (with its justification and clinical
history) whose CT images the scanner stored with dcmtk ``storescu`` under the scheduled Study
Instance UID; the scanner's MPPS (COMPLETED) carries the equipment and the dose. The radiologists'
TOTP secrets are known to the test (their authenticator apps, :class:`TotpDevice`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pyotp
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session
from tests.portal_login import TotpDevice
from tests.simral_proc import SimralProcess
from tests.test_reading_browser import _store

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.identity.models import Professional
from simral.patients.service import AuthorityRef, Traits
from simral.reading import service as reading
from simral.reading.models import (
    REPORT_SIGNED,
    STEP_COMPLETED,
    PerformedProcedureStep,
    ReadingTask,
    Report,
    ScheduledProcedure,
)
from simral.reading.publication import enqueue_publication

PASSWORD = "Compte-Rendu-Radio-2026!"
OID_SITE = "1.2.250.1.999.9.1"
RADIOLOGISTS = (
    ("dr_roux", "TLR", "10007000001", "Dr Claire Roux"),
    ("dr_blanc", "TLR", "10007000002", "Dr Paul Blanc"),
    ("dr_noir", "TLR2", "10007000003", "Dr Anne Noir"),
)
JUSTIFICATION = "Céphalées brutales depuis ce matin"
HISTORY = "HTA traitée, pas d'antécédent neurologique"


@dataclass
class Platform:
    """The running server, the radiologists' tokens and authenticators, the studies to read."""

    simral: SimralProcess
    tokens: dict[str, str]
    devices: dict[str, TotpDevice]
    #: Study Instance UIDs by placer number.
    studies: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.simral.http_url

    def headers(self, login: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[login]}"}

    def get(self, login: str, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(login), timeout=30)

    def post(self, login: str, path: str, payload: object = None) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers(login), json=payload or {}, timeout=60)

    def task_of(self, login: str, placer: str) -> dict[str, object]:
        tasks = self.get(login, "/api/reading/tasks").json()["tasks"]
        return next(t for t in tasks if t["study_uid"] == self.studies[placer])

    def context(self) -> AppContext:
        """An in-process view of the same database (for checks the API does not expose)."""
        return open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(self.simral.data_dir)}))


def enrol_totp(session: Session, devices: dict[str, TotpDevice]) -> None:
    """Pre-enrol each user's authenticator (by login), as if they had enrolled on the portal."""
    for professional in session.scalars(select(Professional)):
        if professional.login in devices:
            professional.totp_secret = devices[professional.login].secret
            professional.totp_enrolled_at = utcnow()


def _schedule(ctx: AppContext, placer: str, name: tuple[str, str], *, with_mpps: bool) -> tuple[str, str]:
    patient = reading.PatientRef(
        traits=Traits(birth_name=name[0], first_birth_given_name=name[1], sex="F", birth_date="19580304",
                      used_name=name[0], used_given_name=name[1]),
        ipp=f"IPP-{placer}",
        ipp_authority=AuthorityRef(oid=OID_SITE),
    )  # fmt: skip
    details = reading.RequestDetails(
        placer_number=placer,
        priority="urgent",
        modality="CT",
        justification=JUSTIFICATION,
        clinical_history=HISTORY,
        purpose="Hémorragie méningée ?",
        anatomy=[{"code": "69536005", "system": "SNOMED CT", "display": "Tête"}],
        appointment_at=utcnow() + timedelta(minutes=30),
    )
    with ctx.db.unit_of_work() as session:
        request = reading.receive_request(
            session, site_code="CHSUD", patient=patient, details=details, principal=SYSTEM, source="portal"
        )
        _, step = reading.accept_request(session, request.id, protocol="Sans injection", principal=SYSTEM)
        if with_mpps:
            step.state = STEP_COMPLETED
            session.add(
                PerformedProcedureStep(
                    sop_instance_uid=str(generate_uid()),
                    procedure_id=session.scalar(
                        select(ScheduledProcedure.id).where(ScheduledProcedure.study_uid == step.study_uid)
                    ),
                    status=STEP_COMPLETED,
                    station_ae="SCANNER1",
                    study_uid=step.study_uid,
                    attributes={
                        "00080070": {"vr": "LO", "Value": ["Siemens"]},
                        "00081090": {"vr": "LO", "Value": ["SOMATOM go.Up"]},
                        "00400242": {"vr": "SH", "Value": ["Scanner salle 1"]},
                        "00400252": {"vr": "CS", "Value": ["COMPLETED"]},
                        "00189345": {"vr": "FD", "Value": [52.4]},
                        "00400310": {"vr": "ST", "Value": ["DLP total 912.5 mGy.cm"]},
                    },
                )
            )
        return step.study_uid, step.accession_number


def start_platform(base: Path, exams: dict[str, tuple[str, str]]) -> Platform:
    """Configure (in-process, before serving) and start the platform; store each exam's images and
    wait for its reading task to be ready. ``exams``: placer number → patient (family, given)."""
    simral = SimralProcess(
        base / "data", extra_env={"SIMRAL_READING_QUIET_SECONDS": "1", "SIMRAL_READING_CHECK_SECONDS": "0.3"}
    )
    simral.cli("organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SITE)
    for code, name in (("TLR", "Téléradiologie Occitanie"), ("TLR2", "Télé-imagerie Bretagne")):
        simral.cli("organisations", "add", code, "--name", name, "--kind", "teleradiology-group")
    for login, group, rpps, display in RADIOLOGISTS:
        simral.cli(
            "users", "add", login, "--organisation", group, "--role", "radiologist", "--rpps", rpps,
            "--name", display, "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.add_node("scanner", "SCANNER1", 104, organisation="CHSUD")
    tokens = {login: simral.token_for(login) for login, *_ in RADIOLOGISTS}
    devices = {login: TotpDevice(secret=pyotp.random_base32()) for login, *_ in RADIOLOGISTS}
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
    scheduled: dict[str, tuple[str, str]] = {}
    try:
        with ctx.db.unit_of_work() as session:
            reading.add_contract(
                session, site_code="CHSUD", group_code="TLR", urgent_minutes=60, routine_minutes=240,
                principal=SYSTEM,
            )  # fmt: skip
            enrol_totp(session, devices)
        for index, (placer, name) in enumerate(exams.items()):
            scheduled[placer] = _schedule(ctx, placer, name, with_mpps=index == 0)
    finally:
        ctx.db.dispose()
    simral.start()
    platform = Platform(simral, tokens, devices, {placer: uid for placer, (uid, _) in scheduled.items()})
    for seed, (placer, (study_uid, accession)) in enumerate(scheduled.items(), start=71):
        family, given = exams[placer]
        _store(simral, base, study_uid, accession, f"{family}^{given}", seed)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        ready = platform.get("dr_roux", "/api/reading/tasks").json()["tasks"]
        if len([t for t in ready if t["state"] == "ready"]) >= len(exams):
            break
        time.sleep(0.3)
    else:
        simral.stop()
        raise AssertionError("the reading tasks did not become ready")
    return platform


@dataclass(frozen=True)
class ReportText:
    """The four sections of a report (and the addendum of a later version)."""

    indications: str
    technique: str
    results: str
    conclusion: str
    addendum: str = ""


def sign_report(
    ctx: AppContext,
    *,
    request_id: int,
    study_uid: str,
    text: ReportText,
    dose: dict[str, str],
    previous: Report | None = None,
) -> Report:
    """A version signed by dr_roux (1, or the addendum to ``previous``) queued for publication in one
    unit of work, as the signing code does it; the report, detached."""
    with ctx.db.unit_of_work() as session:
        task = session.scalar(select(ReadingTask).where(ReadingTask.request_id == request_id))
        report = Report(
            task_id=task.id if task is not None else None,
            request_id=request_id,
            study_uid=study_uid,
            set_id=previous.set_id if previous is not None else str(generate_uid()),
            version=previous.version + 1 if previous is not None else 1,
            document_uid=str(generate_uid()),
            previous_id=previous.id if previous is not None else None,
            indications=text.indications,
            technique=text.technique,
            results=text.results,
            conclusion=text.conclusion,
            addendum=text.addendum if previous is not None else "",
            dose=dose,
            state=REPORT_SIGNED,
            author="dr_roux",
            author_name="Claire Roux",
            author_national_id="810008000001",
            organisation_code="TLR",
            signed_at=utcnow(),
            signature_method="totp",
        )
        session.add(report)
        session.flush()
        enqueue_publication(session, report)
        assert report.publication_state == "pending"
        session.expunge(report)
        return report
