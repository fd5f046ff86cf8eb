"""Patient identities in-process (DESIGN.md §6; IHE ITI TF-2b 3.30 PAM and its French national
extension; RNIV): INS cross-referencing across organisations, conflicting traits as vigilance
cases, merge/unmerge (A40), change of identifier (A47), link/unlink (A24/A37), identity statuses,
and the archive's ingest linking each stored study to an identity.

Only ANS test identities: INS OID 1.2.250.1.213.1.4.10 with test NIRs (``ins_test_oids_allowed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from tests.conftest import BACKENDS, backend_env
from tests.corpus import ct_series, set_test_ins

from simral.access.policy import AccessDenied, Principal
from simral.app import open_app
from simral.archive.models import Blob, Study
from simral.archive.service import IngestItem, ingest_files
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.identity import service as identity
from simral.patients import service as patients
from simral.patients.models import (
    CASE_CONFLICTING_TRAITS,
    CASE_INS_STATUS_CHANGE,
    CASE_SUSPECTED_DUPLICATE,
    INS_TEST_OID,
    IdentityChange,
    PatientIdentity,
    StudyIdentity,
)
from simral.patients.service import AuthorityRef, Ins, PatientError, Traits

OPERATOR = Principal(kind="system", name="test", archive_wide=True)
OID_A = "1.2.250.1.999.1.1"
OID_B = "1.2.250.1.999.2.1"
CHA = AuthorityRef(namespace="CHA", oid=OID_A)
CLINB = AuthorityRef(namespace="CLINB", oid=OID_B)
#: ANS test NIRs (valid keys), never real people.
NIR_1 = "279035121518989"
NIR_2 = "274075176079430"
INS_1 = Ins(NIR_1, INS_TEST_OID)
DOMINIQUE = Traits(
    birth_name="PAT-TROIS",
    birth_given_names="DOMINIQUE MARIE",
    sex="F",
    birth_date="19790328",
    birth_place_code="63220",
    used_name="PAT-TROIS",
    used_given_name="DOMINIQUE",
)


def _ctx(tmp_path: Path, *, test_oids: bool, backend: dict[str, str] | None = None) -> AppContext:
    env = {
        **(backend or {}),
        "SIMRAL_DATA_DIR": str(tmp_path / "data"),
        "SIMRAL_INS_TEST_OIDS_ALLOWED": str(test_oids).lower(),
    }
    context = open_app(load_settings(environ=env))
    with context.db.unit_of_work() as session:
        identity.create_organisation(
            session, code="CHA", name="CH A", patient_id_oid=OID_A, principal=OPERATOR
        )
        identity.create_organisation(
            session, code="CLINB", name="Cabinet B", kind="practice", patient_id_oid=OID_B, principal=OPERATOR
        )
    return context


@pytest.fixture(params=BACKENDS)
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppContext]:
    """On the embedded SQLite store and on PostgreSQL + S3 (the cluster deployment)."""
    context = _ctx(tmp_path, test_oids=True, backend=backend_env(request.param, request))
    yield context
    context.db.dispose()


def _upsert(
    ctx: AppContext, local_id: str, authority: AuthorityRef, **kwargs: object
) -> patients.UpsertResult:
    with ctx.db.unit_of_work() as session:
        args: dict[str, object] = {"traits": DOMINIQUE, "source": "test", "allow_test_ins": True, **kwargs}
        return patients.upsert_identity(
            session,
            local_id=local_id,
            authority=authority,
            principal=OPERATOR,
            **args,  # type: ignore[arg-type]
        )


def _identity(ctx: AppContext, local_id: str, authority: AuthorityRef) -> PatientIdentity:
    with ctx.db.reading() as session:
        return patients.get_identity_or_raise(session, local_id=local_id, authority=authority)


def _actions(ctx: AppContext, prefix: str) -> list[str]:
    with ctx.db.reading() as session:
        return list(
            session.scalars(
                select(AuditEvent.action).where(AuditEvent.action.like(f"{prefix}%")).order_by(AuditEvent.id)
            )
        )


def test_same_ins_from_two_organisations_is_one_person_two_identities(ctx: AppContext) -> None:
    first = _upsert(ctx, "IPP-A1", CHA, ins=INS_1, status="QUAL")
    second = _upsert(ctx, "IPP-B7", CLINB, ins=INS_1, status="RECUP")
    assert first.created and second.created
    a, b = _identity(ctx, "IPP-A1", CHA), _identity(ctx, "IPP-B7", CLINB)
    assert a.id != b.id
    assert a.person_id == b.person_id
    assert (a.status, b.status) == ("QUAL", "RECUP")
    with ctx.db.reading() as session:
        assert {i.local_id for i in patients.linked_identities(session, a)} == {"IPP-A1", "IPP-B7"}
        # The identity each organisation knows the person by (PatientID coercion at retrieve time).
        known_by_b = patients.identity_for_organisation(
            session, person_id=a.person_id, organisation_code="CLINB"
        )
        assert known_by_b is not None and known_by_b.local_id == "IPP-B7"
        known_by_a = patients.identity_for_organisation(
            session, person_id=a.person_id, organisation_code="CHA"
        )
        assert known_by_a is not None and known_by_a.local_id == "IPP-A1"
        link = session.scalar(select(IdentityChange).where(IdentityChange.kind == "link"))
        assert link is not None and link.detail == {"reason": "ins"}
    assert "patient.link" in _actions(ctx, "patient.")
    assert _actions(ctx, "patient.identity-create") == ["patient.identity-create"] * 2


def test_ins_test_oids_need_the_setting_and_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(PatientError, match="test OIDs not allowed"):
        patients.check_ins(INS_1, allow_test=False)
    with pytest.raises(PatientError, match="key"):
        patients.check_ins(Ins(NIR_1[:-2] + "00", INS_TEST_OID), allow_test=True)
    with pytest.raises(PatientError, match="not an INS authority"):
        patients.check_ins(Ins(NIR_1, "1.2.3.4"), allow_test=True)
    assert patients.check_ins(Ins(NIR_1, "1.2.250.1.213.1.4.8"), allow_test=False).matricule == NIR_1
    context = _ctx(tmp_path, test_oids=False)
    try:
        with context.db.unit_of_work() as session, pytest.raises(PatientError, match="test OIDs"):
            patients.upsert_identity(
                session,
                local_id="IPP-A1",
                authority=CHA,
                traits=DOMINIQUE,
                ins=INS_1,
                principal=OPERATOR,
                source="test",
                allow_test_ins=context.settings.ins_test_oids_allowed,
            )
    finally:
        context.db.dispose()


def test_conflicting_traits_open_a_case_and_change_nothing(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-A1", CHA, ins=INS_1, status="QUAL")
    before = _identity(ctx, "IPP-A1", CHA)
    wrong = Traits(birth_name="PAT-TROIS", first_birth_given_name="DOMINIQUE", sex="F", birth_date="19790329")
    for _ in range(2):  # the same conflict received twice is one case
        result = _upsert(ctx, "IPP-A1", CHA, traits=wrong, status="PROV")
    assert result.changed == ()
    after = _identity(ctx, "IPP-A1", CHA)
    assert (after.birth_date, after.status, after.person_id) == ("19790328", "QUAL", before.person_id)
    with ctx.db.reading() as session:
        cases = patients.list_cases(session)
    assert [c.kind for c in cases] == [CASE_CONFLICTING_TRAITS]
    assert cases[0].detail["conflicts"] == {"birth_date": ["19790328", "19790329"]}
    # Same INS from another organisation with a different sex: a case, no link.
    other = Traits(birth_name="PAT-TROIS", first_birth_given_name="DOMINIQUE", sex="M", birth_date="19790328")
    _upsert(ctx, "IPP-B7", CLINB, traits=other, ins=INS_1)
    b = _identity(ctx, "IPP-B7", CLINB)
    assert b.person_id != before.person_id
    with ctx.db.reading() as session:
        kinds = [(c.kind, c.identity_id, c.other_identity_id) for c in patients.list_cases(session)]
        assert session.scalar(select(func.count()).select_from(IdentityChange)) == 0
    assert (CASE_CONFLICTING_TRAITS, b.id, before.id) in kinds
    # Accents and case do not make a conflict.
    assert (
        patients.conflicting_traits(
            before, Traits(birth_name="pat-trois", first_birth_given_name="Dominiqué")
        )
        == {}
    )
    # A person resolves the first case by applying the received birth date.
    with ctx.db.unit_of_work() as session:
        patients.resolve_case(
            session,
            cases[0].id,
            resolution="acte de naissance vérifié",
            principal=OPERATOR,
            apply_received=True,
        )
    assert _identity(ctx, "IPP-A1", CHA).birth_date == "19790329"
    assert "patient.vigilance-resolve" in _actions(ctx, "patient.")


def test_suspected_duplicate_in_one_authority(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-A1", CHA)
    result = _upsert(ctx, "IPP-A2", CHA)
    assert result.cases and result.cases[0].kind == CASE_SUSPECTED_DUPLICATE
    a1, a2 = _identity(ctx, "IPP-A1", CHA), _identity(ctx, "IPP-A2", CHA)
    assert a1.person_id != a2.person_id  # never merged silently


def test_look_alike_placeholders_open_a_bounded_number_of_cases(ctx: AppContext) -> None:
    """Identities sharing their strict traits by the dozen (an unknown patient's default traits):
    a new one opens a case against the most recent look-alikes only, not one per identity."""
    limit = patients.MAX_DUPLICATE_CASES
    for n in range(limit + 5):
        _upsert(ctx, f"IPP-X{n}", CHA)
    result = _upsert(ctx, "IPP-NEW", CHA)
    assert len(result.cases) == limit
    with ctx.db.reading() as session:
        others = {
            session.get(PatientIdentity, case.other_identity_id).local_id  # type: ignore[union-attr]
            for case in result.cases
        }
    assert others == {f"IPP-X{n}" for n in range(5, limit + 5)}


def test_merge_then_unmerge(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-A1", CHA)
    _upsert(ctx, "IPP-A2", CHA, ins=INS_1)
    _upsert(ctx, "IPP-B7", CLINB, ins=INS_1)  # linked to IPP-A2's person by INS
    a1, a2, b7 = _identity(ctx, "IPP-A1", CHA), _identity(ctx, "IPP-A2", CHA), _identity(ctx, "IPP-B7", CLINB)
    persons_before = {a1.id: a1.person_id, a2.id: a2.person_id, b7.id: b7.person_id}
    assert a2.person_id == b7.person_id != a1.person_id
    with ctx.db.unit_of_work() as session:
        survivor = session.get(PatientIdentity, a1.id)
        merged = session.get(PatientIdentity, a2.id)
        assert survivor is not None and merged is not None
        change = patients.merge_identities(
            session, survivor=survivor, merged=merged, principal=OPERATOR, source="t"
        )
        change_id = change.id
    with ctx.db.reading() as session:
        merged_now = session.get(PatientIdentity, a2.id)
        assert merged_now is not None and not merged_now.active and merged_now.merged_into_id == a1.id
        assert patients.effective_identity(session, merged_now).id == a1.id
        assert {i.local_id for i in patients.linked_identities(session, merged_now)} == {
            "IPP-A1",
            "IPP-A2",
            "IPP-B7",
        }
        assert {i.person_id for i in patients.person_identities(session, a1.person_id)} == {a1.person_id}
    # Merging into a merged identity or merging twice is refused.
    with ctx.db.unit_of_work() as session, pytest.raises(PatientError, match="already merged"):
        patients.merge_identities(
            session,
            survivor=session.get(PatientIdentity, a1.id),  # type: ignore[arg-type]
            merged=session.get(PatientIdentity, a2.id),  # type: ignore[arg-type]
            principal=OPERATOR,
        )
    # A professional without an administrator role may not merge.
    tech = Principal(
        kind="user", name="tech", organisation="CHA", memberships=frozenset({("CHA", "technologist")})
    )
    with ctx.db.unit_of_work() as session, pytest.raises(AccessDenied):
        patients.unmerge(session, change_id, principal=tech)
    with ctx.db.unit_of_work() as session:
        patients.unmerge(session, change_id, principal=OPERATOR)
    with ctx.db.reading() as session:
        for identity_id, person_id in persons_before.items():
            row = session.get(PatientIdentity, identity_id)
            assert (
                row is not None and row.person_id == person_id and row.active and row.merged_into_id is None
            )
        record = session.get(IdentityChange, change_id)
        assert record is not None and record.undone_at is not None and record.kind == "merge"
    assert _actions(ctx, "patient.merge") == ["patient.merge"]
    assert _actions(ctx, "patient.undo-merge") == ["patient.undo-merge"]


def test_merge_refuses_two_different_ins(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-A1", CHA, ins=INS_1)
    _upsert(ctx, "IPP-A2", CHA, ins=Ins(NIR_2, INS_TEST_OID), traits=Traits(birth_name="DOE", sex="M"))
    with ctx.db.unit_of_work() as session, pytest.raises(PatientError, match="different INS"):
        patients.merge_identities(
            session,
            survivor=patients.get_identity_or_raise(session, local_id="IPP-A1", authority=CHA),
            merged=patients.get_identity_or_raise(session, local_id="IPP-A2", authority=CHA),
            principal=OPERATOR,
        )


def test_change_of_identifier_a47(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-OLD", CHA)
    _upsert(ctx, "IPP-OTHER", CHA, traits=Traits(birth_name="AUTRE", sex="M"))
    with ctx.db.unit_of_work() as session:
        row = patients.get_identity_or_raise(session, local_id="IPP-OLD", authority=CHA)
        with pytest.raises(PatientError) as clash:
            patients.change_identifier(session, row, new_local_id="IPP-OTHER", principal=OPERATOR)
        assert clash.value.code == "205"
        change = patients.change_identifier(
            session, row, new_local_id="IPP-NEW", principal=OPERATOR, source="t"
        )
        renamed_id, change_id = row.id, change.id
    with ctx.db.reading() as session:
        assert patients.get_identity(session, local_id="IPP-OLD", authority=CHA) is None
        assert patients.get_identity_or_raise(session, local_id="IPP-NEW", authority=CHA).id == renamed_id
    with ctx.db.unit_of_work() as session:
        patients.undo_change(session, change_id, principal=OPERATOR)
    assert _identity(ctx, "IPP-OLD", CHA).id == renamed_id
    assert _actions(ctx, "patient.change-identifier") == ["patient.change-identifier"]


def test_link_and_unlink_a24_a37(ctx: AppContext) -> None:
    _upsert(ctx, "IPP-A1", CHA)
    _upsert(ctx, "IPP-B7", CLINB)
    with ctx.db.unit_of_work() as session:
        a = patients.get_identity_or_raise(session, local_id="IPP-A1", authority=CHA)
        b = patients.get_identity_or_raise(session, local_id="IPP-B7", authority=CLINB)
        assert a.person_id != b.person_id
        assert patients.link_identities(session, a, b, principal=OPERATOR) is not None
        assert a.person_id == b.person_id
        assert patients.link_identities(session, a, b, principal=OPERATOR) is None  # already one person
    with ctx.db.unit_of_work() as session:
        a = patients.get_identity_or_raise(session, local_id="IPP-A1", authority=CHA)
        b = patients.get_identity_or_raise(session, local_id="IPP-B7", authority=CLINB)
        patients.unlink_identities(session, a, b, principal=OPERATOR)
        assert a.person_id != b.person_id


def test_status_changes_with_date_source_and_cases(ctx: AppContext) -> None:
    with pytest.raises(PatientError, match="requires an INS"):
        _upsert(ctx, "IPP-A1", CHA, status="QUAL")
    _upsert(ctx, "IPP-A1", CHA, status="PROV")
    first = _identity(ctx, "IPP-A1", CHA)
    assert first.status == "PROV"
    _upsert(ctx, "IPP-A1", CHA, ins=INS_1, status="RECUP", source="hl7:GAM^CHA")
    recup = _identity(ctx, "IPP-A1", CHA)
    assert (recup.status, recup.status_source, recup.ins_matricule) == ("RECUP", "hl7:GAM^CHA", NIR_1)
    assert recup.status_at >= first.status_at
    _upsert(ctx, "IPP-A1", CHA, status="QUAL")
    with ctx.db.reading() as session:
        assert patients.list_cases(session) == []  # upgrades need no review
    _upsert(ctx, "IPP-A1", CHA, status="PROV", source="hl7:GAM^CHA")
    with ctx.db.reading() as session:
        cases = patients.list_cases(session, kind=CASE_INS_STATUS_CHANGE)
    assert [c.detail for c in cases] == [{"from": "QUAL", "to": "PROV"}]
    assert _identity(ctx, "IPP-A1", CHA).status == "PROV"
    assert _actions(ctx, "patient.status-change") == ["patient.status-change"] * 3


# ------------------------------------------------------------------------------ ingest linking


def _files(
    out: Path,
    *,
    patient_id: str,
    seed: int,
    ins: str | None,
    birth_date: str = "19790328",
    issuer: tuple[str, str] | None = None,
    slices: int = 3,
) -> list[Path]:
    """A small CT series of its own study, with an INS in Other Patient IDs Sequence (DESIGN.md §6)."""
    paths = ct_series(
        out,
        slices=slices,
        rows=16,
        cols=16,
        patient_id=patient_id,
        patient_name="PAT-TROIS^DOMINIQUE",
        seed=seed,
    )
    for path in paths:
        ds = dcmread(path)
        ds.PatientBirthDate = birth_date
        ds.PatientSex = "F"
        if ins is not None:
            set_test_ins(ds, ins)
        if issuer is not None:
            ds.IssuerOfPatientID = issuer[0]
            qualifier = Dataset()
            qualifier.UniversalEntityID = issuer[1]
            qualifier.UniversalEntityIDType = "ISO"
            ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        ds.save_as(path)
    return paths


def _ingest(ctx: AppContext, paths: list[Path], organisation: str) -> None:
    node = Principal(kind="dicom-node", name=f"MOD_{organisation}", organisation=organisation)
    for path in paths:  # one C-STORE at a time, as a modality sends
        results = ingest_files(ctx, [IngestItem(path)], principal=node, source=node.name)
        assert [r.outcome for r in results] == ["stored"], results


def _study_identity(ctx: AppContext, path: Path) -> PatientIdentity:
    uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    with ctx.db.reading() as session:
        study_pk = session.scalar(select(Study.id).where(Study.study_uid == uid))
        assert study_pk is not None
        found = patients.study_identity(session, study_pk)
        assert found is not None
        return found


def test_ingest_links_two_organisations_same_ins_to_one_person(ctx: AppContext, tmp_path: Path) -> None:
    files_a = _files(tmp_path / "a", patient_id="IPP-A1", seed=1, ins=NIR_1)
    # Organisation B's modality names its issuer in the header (IssuerOfPatientID + ISO qualifier).
    files_b = _files(tmp_path / "b", patient_id="99-B-7", seed=2, ins=NIR_1, issuer=("CLINB", OID_B))
    digests = {p.name + p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_a + files_b}
    _ingest(ctx, files_a, "CHA")
    _ingest(ctx, files_b, "CLINB")
    a, b = _study_identity(ctx, files_a[0]), _study_identity(ctx, files_b[0])
    assert (a.local_id, b.local_id) == ("IPP-A1", "99-B-7")
    assert a.id != b.id and a.person_id == b.person_id
    assert (a.ins_matricule, a.ins_oid, a.status) == (NIR_1, INS_TEST_OID, "PROV")
    assert (a.birth_date, a.sex, a.used_name, a.used_given_name) == (
        "19790328",
        "F",
        "PAT-TROIS",
        "DOMINIQUE",
    )
    with ctx.db.reading() as session:
        # No issuer in A's headers: the storing organisation's patient-id authority.
        assert a.authority_id == patients.resolve_authority(session, CHA, create=False).id  # type: ignore[union-attr]
        assert b.authority_id == patients.resolve_authority(session, CLINB, create=False).id  # type: ignore[union-attr]
        # One study link per study, the identity work done once per study (not per instance).
        assert session.scalar(select(func.count()).select_from(StudyIdentity)) == 2
        person_studies = patients.person_study_pks(session, a.person_id)
        assert len(person_studies) == 2
        stored = dict(session.execute(select(Blob.key, Blob.sha256)).all())
    assert _actions(ctx, "patient.identity-create") == ["patient.identity-create"] * 2
    # Stored bytes are the bytes received.
    assert sorted(stored.values()) == sorted(digests.values())


def test_ingest_conflicting_traits_for_a_known_patient_id(ctx: AppContext, tmp_path: Path) -> None:
    first = _files(tmp_path / "1", patient_id="IPP-A1", seed=3, ins=NIR_1, slices=1)
    second = _files(tmp_path / "2", patient_id="IPP-A1", seed=4, ins=NIR_1, birth_date="19800101", slices=2)
    _ingest(ctx, first, "CHA")
    _ingest(ctx, second, "CHA")
    one, two = _study_identity(ctx, first[0]), _study_identity(ctx, second[0])
    assert one.id == two.id and two.birth_date == "19790328"  # linked to the identity its id names
    with ctx.db.reading() as session:
        cases = patients.list_cases(session)
    assert [(c.kind, c.detail["conflicts"]) for c in cases] == [
        (CASE_CONFLICTING_TRAITS, {"birth_date": ["19790328", "19800101"]})
    ]


def test_ingest_ignores_test_ins_unless_allowed(tmp_path: Path) -> None:
    context = _ctx(tmp_path, test_oids=False)
    try:
        files = _files(tmp_path / "a", patient_id="IPP-A1", seed=5, ins=NIR_1, slices=1)
        _ingest(context, files, "CHA")
        found = _study_identity(context, files[0])
        assert (found.local_id, found.ins_matricule) == ("IPP-A1", "")
    finally:
        context.db.dispose()
