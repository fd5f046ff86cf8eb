"""IHE PDQm (ITI-78) and PIXm (ITI-83) over FHIR R4 against a real ``simral serve`` (HTTP with bearer
tokens; the index fed over MLLP with HL7 ADT, PAM France PID, ANS test INS only).

One person is known by two organisations (same INS, two IPPs: linked by the INS); a second patient
has two CHA identifiers merged by an A40. Every response is parsed back with the
``fhir.resources.R4B`` models the server builds them with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.patient import Patient
from sqlalchemy import select
from tests.simral_proc import SimralProcess
from tests.test_hl7_adt import INS_TEST_OID, NIR, OID_CHA, Feed, adt_merge, adt_upsert

from simral.app import open_app
from simral.audit.models import AuditEvent
from simral.config import load_settings

OID_CLINB = "1.2.250.1.999.2.1"
NIR_DUPONT = "179037512345644"  # valid test NIR: man born 1979-03
PASSWORD = "Essai-Radio-2026!x"
USERS = {
    "rad_a": ("CHA", "radiologist"),
    "admin_b": ("CLINB", "site-admin"),
    "audit_a": ("CHA", "auditor"),
}


@dataclass
class World:
    simral: SimralProcess
    feed: Feed
    tokens: dict[str, str]

    def get(self, path: str, login: str | None = "rad_a", **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[login]}"} if login else {}
        return httpx.get(f"{self.simral.http_url}/fhir/{path}", params=params, headers=headers, timeout=30)

    def bundle(self, **params: Any) -> Bundle:
        response = self.get("Patient", **params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        bundle = Bundle.model_validate_json(response.content)
        assert bundle.type == "searchset"
        return bundle

    def ipps(self, **params: Any) -> list[str]:
        """The local identifiers (type PI) of the Patients a search returns, in order."""
        return [
            identifier.value
            for patient in patients(self.bundle(**params))
            for identifier in patient.identifier or []
            if identifier.type.coding[0].code == "PI"
        ]

    def logical_id(self, system_oid: str, value: str) -> str:
        (patient,) = patients(self.bundle(identifier=f"urn:oid:{system_oid}|{value}"))
        assert patient.id is not None
        return patient.id


def patients(bundle: Bundle) -> list[Patient]:
    found = []
    for entry in bundle.entry or []:
        assert isinstance(entry.resource, Patient) and entry.search.mode == "match"
        assert entry.fullUrl.endswith(f"/fhir/Patient/{entry.resource.id}")
        found.append(entry.resource)
    return found


def outcome(response: httpx.Response, status: int) -> tuple[str, str]:
    """Issue code and diagnostics of an OperationOutcome answered with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    parsed = OperationOutcome.model_validate_json(response.content)
    (issue,) = parsed.issue
    assert issue.severity == "error"
    return issue.code, issue.diagnostics or ""


def pix(world: World, source: str, *targets: str, login: str = "rad_a") -> httpx.Response:
    params: list[tuple[str, str]] = [("sourceIdentifier", source), *(("targetSystem", t) for t in targets)]
    headers = {"Authorization": f"Bearer {world.tokens[login]}"}
    return httpx.get(
        f"{world.simral.http_url}/fhir/Patient/$ihe-pix", params=params, headers=headers, timeout=30
    )


def cross_references(response: httpx.Response) -> tuple[list[tuple[str, str]], list[str]]:
    """(system, value) of each targetIdentifier and the reference of each targetId."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    parameters = Parameters.model_validate_json(response.content)
    identifiers, references = [], []
    for parameter in parameters.parameter or []:
        if parameter.name == "targetIdentifier":
            identifiers.append((parameter.valueIdentifier.system, parameter.valueIdentifier.value))
        else:
            assert parameter.name == "targetId"
            references.append(parameter.valueReference.reference)
    return identifiers, references


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("fhir")
    simral = SimralProcess(base / "data", hl7=True, extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--patient-id-oid", OID_CHA)
    simral.cli("organisations", "add", "CLINB", "--name", "Cabinet B", "--kind", "practice",
               "--patient-id-oid", OID_CLINB)  # fmt: skip
    for login, (organisation, role) in USERS.items():
        simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", role, "--password-stdin",
            input=PASSWORD + "\n",
        )  # fmt: skip
    tokens = {login: simral.token_for(login) for login in USERS}
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            feed = Feed(simral, ctx)
            old: dict[str, Any] = {
                "ins": None,
                "birth_name": "ANCIEN",
                "first_names": "PAUL",
                "used_name": "ANCIEN",
                "used_first_name": "PAUL",
                "birth_date": "19500101",
                "sex": "M",
                "status": None,
            }
            acks = feed.send(
                adt_upsert("A28", "F-1", "F-1"),
                adt_upsert("A28", "F-2", "FB-1", authority=f"CLINB&{OID_CLINB}&ISO"),
                adt_upsert(
                    "A28",
                    "F-3",
                    "F-2",
                    ins=NIR_DUPONT,
                    birth_name="DUPONT",
                    first_names="JEAN",
                    used_name="DUPONT",
                    used_first_name="JEAN",
                    birth_date="19790315",
                    sex="M",
                    birth_place="75056",
                ),
                adt_upsert("A28", "F-4", "F-OLD", **old),
                adt_upsert("A28", "F-5", "F-NEW", **old),
                adt_merge("F-6", "F-NEW", "F-OLD", **old),
            )
            assert [a.msa.msa_1.to_er7() for a in acks] == ["AA"] * 6
            yield World(simral, feed, tokens)
        finally:
            ctx.db.dispose()


def test_pdqm_search_returns_a_searchset_of_french_patients(world: World) -> None:
    bundle = world.bundle(family="pat-tr", birthdate="1979-03-28")
    assert bundle.total == 2
    first, second = patients(bundle)
    ins = f"urn:oid:{INS_TEST_OID}"
    assert [(i.system, i.value, i.use, i.type.coding[0].code) for i in first.identifier] == [
        (ins, NIR, "official", "NI"),
        (f"urn:oid:{OID_CHA}", "F-1", "usual", "PI"),
    ]
    assert [(i.system, i.value) for i in second.identifier] == [(ins, NIR), (f"urn:oid:{OID_CLINB}", "FB-1")]
    assert [(n.use, n.family, n.given) for n in first.name] == [
        ("official", "PAT-TROIS", ["DOMINIQUE"]),
        ("usual", "MARTIN", ["DOMI"]),
    ]
    assert (first.gender, first.birthDate, first.active) == ("female", date(1979, 3, 28), True)
    # The two identities of one person point at each other.
    assert [(link.type, link.other.reference.rsplit("/", 1)[1]) for link in first.link] == [
        ("seealso", second.id)
    ]
    assert [(link.type, link.other.reference.rsplit("/", 1)[1]) for link in second.link] == [
        ("seealso", first.id)
    ]


def test_pdqm_search_parameters(world: World) -> None:
    assert world.ipps(**{"family:exact": "DUPONT"}) == ["F-2"]
    assert world.ipps(family="martin") == ["F-1", "FB-1"]  # used name, any case
    assert world.ipps(given="dom") == ["F-1", "FB-1"]
    assert world.ipps(family="pat-trois", **{"given:exact": "DOM"}) == []
    assert world.ipps(family="DUP", gender="male") == ["F-2"]
    assert world.ipps(family="DUP", gender="female") == []
    assert world.ipps(birthdate="1979") == ["F-1", "FB-1", "F-2"]
    assert world.ipps(birthdate="eq1979-03-15") == ["F-2"]
    assert world.ipps(identifier=f"urn:oid:{OID_CLINB}|FB-1") == ["FB-1"]
    assert world.ipps(identifier=f"urn:oid:{INS_TEST_OID}|{NIR}") == ["F-1", "FB-1"]
    assert world.ipps(identifier=f"urn:oid:{OID_CLINB}|") == ["FB-1"]
    assert world.ipps(identifier=f"urn:oid:{OID_CHA}|F-OLD") == ["F-NEW"]  # merged: the survivor
    assert world.ipps(identifier="F-2") == ["F-2"]
    patient_id = world.logical_id(OID_CHA, "F-2")
    assert world.ipps(_id=patient_id) == ["F-2"]
    limited = world.bundle(family="pat-trois", _count="1")
    assert (limited.total, len(limited.entry)) == (2, 1)


def test_pdqm_read_and_merged_identity(world: World) -> None:
    survivor = world.logical_id(OID_CHA, "F-NEW")
    response = world.get(f"Patient/{survivor}")
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "application/fhir+json"
    )
    patient = Patient.model_validate_json(response.content)
    assert (patient.id, patient.active, patient.birthDate) == (survivor, True, date(1950, 1, 1))
    (replaces,) = patient.link
    merged = replaces.other.reference.rsplit("/", 1)[1]
    assert replaces.type == "replaces"
    old = Patient.model_validate_json(world.get(f"Patient/{merged}").content)
    assert old.active is False and [i.value for i in old.identifier] == ["F-OLD"]
    assert [(link.type, link.other.reference.rsplit("/", 1)[1]) for link in old.link] == [
        ("replaced-by", survivor)
    ]
    assert outcome(world.get("Patient/999999"), 404)[0] == "not-found"


def test_pdqm_errors_are_operation_outcomes(world: World) -> None:
    # ITI TF-2 3.78.4.1.3 case 4: an identifier domain the supplier does not know.
    assert outcome(world.get("Patient", identifier="urn:oid:1.2.250.1.999.9.9|X"), 404)[0] == "not-found"
    assert outcome(world.get("Patient", identifier="http://example.org/ids|X"), 404)[0] == "not-found"
    code, text = outcome(world.get("Patient", address="PARIS"), 400)
    assert code == "not-supported" and "address" in text
    assert outcome(world.get("Patient", birthdate="28/03/1979"), 400)[0] == "invalid"
    assert outcome(world.get("Patient", birthdate="gt1979"), 400)[0] == "invalid"
    assert outcome(world.get("Patient", gender="femme"), 400)[0] == "invalid"
    assert outcome(world.get("Patient"), 400)[0] == "invalid"  # no criterion: the index is not listed


def test_pixm_cross_references_the_identities_of_one_person(world: World) -> None:
    clinb_patient = world.logical_id(OID_CLINB, "FB-1")
    identifiers, references = cross_references(pix(world, f"urn:oid:{OID_CHA}|F-1"))
    assert identifiers == [(f"urn:oid:{INS_TEST_OID}", NIR), (f"urn:oid:{OID_CLINB}", "FB-1")]
    assert [r.rsplit("/fhir/", 1)[1] for r in references] == [f"Patient/{clinb_patient}"]
    # Restricted to one target domain; from the other organisation's identifier; from the INS.
    assert cross_references(pix(world, f"urn:oid:{OID_CHA}|F-1", f"urn:oid:{OID_CLINB}"))[0] == [
        (f"urn:oid:{OID_CLINB}", "FB-1")
    ]
    assert cross_references(pix(world, f"urn:oid:{OID_CLINB}|FB-1", f"urn:oid:{OID_CHA}"))[0] == [
        (f"urn:oid:{OID_CHA}", "F-1")
    ]
    assert cross_references(pix(world, f"urn:oid:{INS_TEST_OID}|{NIR}"))[0] == [
        (f"urn:oid:{OID_CHA}", "F-1"),
        (f"urn:oid:{OID_CLINB}", "FB-1"),
    ]
    # A merged identifier: its surviving identity.
    assert cross_references(pix(world, f"urn:oid:{OID_CHA}|F-OLD"))[0] == [(f"urn:oid:{OID_CHA}", "F-NEW")]
    # Known, but nothing in the requested domain: an empty Parameters.
    assert cross_references(pix(world, f"urn:oid:{OID_CHA}|F-2", f"urn:oid:{OID_CLINB}")) == ([], [])


def test_pixm_failures_follow_iti_83(world: World) -> None:
    assert outcome(pix(world, f"urn:oid:{OID_CHA}|F-1", "urn:oid:1.2.250.1.999.9.9"), 403) == (
        "code-invalid",
        "targetSystem not found",
    )
    assert outcome(pix(world, "urn:oid:1.2.250.1.999.9.9|F-1"), 400) == (
        "code-invalid",
        "sourceIdentifier Assigning Authority not found",
    )
    assert outcome(pix(world, f"urn:oid:{OID_CHA}|NOBODY"), 404) == (
        "not-found",
        "sourceIdentifier Patient Identifier not found",
    )
    assert outcome(pix(world, "F-1"), 400)[0] == "invalid"


def test_only_professionals_with_a_clinical_or_admin_role_may_search(world: World) -> None:
    anonymous = world.get("Patient", login=None, family="DUPONT")
    assert outcome(anonymous, 401)[0] == "login"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert outcome(world.get("Patient", login="audit_a", family="DUPONT"), 403)[0] == "forbidden"
    assert outcome(pix(world, f"urn:oid:{OID_CHA}|F-1", login="audit_a"), 403)[0] == "forbidden"
    assert outcome(world.get("Patient/1", login="audit_a"), 403)[0] == "forbidden"
    assert world.get("Patient", login="admin_b", family="DUPONT").status_code == 200
    with world.feed.ctx.db.reading() as session:
        records = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "patient.query")))
    refused = [r for r in records if r.actor == "user:audit_a"]
    assert refused and {r.outcome for r in refused} == {"failure"}
    assert {r.detail["transaction"] for r in refused} == {"ITI-78", "ITI-83"}
    answered = [r for r in records if r.actor == "user:admin_b"]
    assert [(r.outcome, r.detail["transaction"], r.detail["matches"]) for r in answered] == [
        ("success", "ITI-78", 1)
    ]
    assert answered[0].detail["keys"]["parameters"] == [["family", "DUPONT"]]
