"""Retention of records (CSP R.1112-7), legal holds and reviewed deletion (issue 9 item 4).

The date rules are checked on the article's own reading with concrete dates: twenty years after
the last visit; extended to the 28th birthday of a patient seen as a child when that is later;
ten years after death when the patient died less than ten years after the last visit ("dans tous
les cas": also for a child); an organisation's own term replacing the twenty years.

The review flow runs in-process on both backends (SQLite + filesystem, PostgreSQL + S3): synthetic CT
studies of site CHA stored by its modality; a review on 1 January 2026 proposes exactly the
studies past their date that no legal hold covers; approval queues deletion jobs which remove the
index rows and the blobs (``simral check`` stays clean), each audited with the batch and the
approver; a hold placed after approval makes the job refuse; instances rejected as "Data Retention
Policy Expired" (IOCM 113039) are proposed alone and deleted alone.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select
from tests.corpus import ct_series

from simral.access.policy import AccessDenied, Principal
from simral.archive import service as archive
from simral.archive.consistency import check
from simral.archive.models import Blob, ChangeEvent, Instance, Series, Study
from simral.audit import service as audit
from simral.audit.models import AuditEvent
from simral.context import AppContext
from simral.jobs.runner import JobRunner
from simral.lifecycle import service as lifecycle
from simral.lifecycle.models import ITEM_DELETED, ITEM_REFUSED, SCOPE_REJECTED, SCOPE_STUDY
from simral.patients.service import AuthorityRef

OPERATOR = Principal(kind="system", name="cli:test", archive_wide=True, via="cli")
MODALITY = Principal(kind="dicom-node", name="MOD_CHA", organisation="CHA")
ADMIN_CHA = Principal(
    kind="user", name="admin-cha", organisation="CHA", memberships=frozenset({("CHA", "site-admin")})
)
ADMIN_CHB = Principal(
    kind="user", name="admin-chb", organisation="CHB", memberships=frozenset({("CHB", "site-admin")})
)
REGIONAL = Principal(
    kind="user",
    name="admin-region",
    organisation="REGION",
    memberships=frozenset({("REGION", "regional-admin")}),
)
CHA_IPP = AuthorityRef(namespace="CHA")
TODAY = date(2026, 1, 1)


# ------------------------------------------------------------------------------ the law's dates


@pytest.mark.parametrize(
    ("case", "last_visit", "birth", "death", "until", "rule"),
    [
        # « vingt ans à compter de la date du dernier séjour »
        ("adult", date(2001, 3, 15), date(1960, 5, 10), None, date(2021, 3, 15), lifecycle.RULE_LAST_VISIT),
        # A child of 4 at the last visit: twenty years end at 24, « prorogée » to the 28th birthday.
        ("minor", date(2000, 2, 10), date(1995, 6, 1), None, date(2023, 6, 1), lifecycle.RULE_28TH_BIRTHDAY),
        # A child of 16: twenty years end at 36, after the 28th birthday: no extension.
        (
            "older minor",
            date(2001, 9, 1),
            date(1985, 1, 1),
            None,
            date(2021, 9, 1),
            lifecycle.RULE_LAST_VISIT,
        ),
        # Died 4 years after the last visit: ten years after death, earlier than twenty after the visit.
        (
            "deceased",
            date(2005, 4, 1),
            date(1940, 1, 1),
            date(2009, 11, 20),
            date(2019, 11, 20),
            lifecycle.RULE_DEATH,
        ),
        # Died 12 years after the last visit: « moins de dix ans » does not hold, twenty years apply.
        (
            "deceased later",
            date(2000, 1, 10),
            date(1940, 1, 1),
            date(2012, 3, 1),
            date(2020, 1, 10),
            lifecycle.RULE_LAST_VISIT,
        ),
        # « Dans tous les cas »: a child who died 2 years after the visit, ten years after death
        # rather than the 28th birthday.
        (
            "deceased minor",
            date(2004, 1, 1),
            date(2000, 1, 1),
            date(2006, 1, 1),
            date(2016, 1, 1),
            lifecycle.RULE_DEATH,
        ),
        # Born on 29 February: the 28th birthday of a common year falls on 28 February.
        (
            "leap-day birth",
            date(2000, 5, 5),
            date(1996, 2, 29),
            None,
            date(2024, 2, 29),
            lifecycle.RULE_28TH_BIRTHDAY,
        ),
        (
            "leap-day visit",
            date(2004, 2, 29),
            date(1950, 1, 1),
            None,
            date(2024, 2, 29),
            lifecycle.RULE_LAST_VISIT,
        ),
        (
            "leap-day visit, common year",
            date(2004, 2, 29),
            None,
            None,
            date(2024, 2, 29),
            lifecycle.RULE_LAST_VISIT,
        ),
    ],
)
def test_retention_dates_follow_r1112_7(
    case: str, last_visit: date, birth: date | None, death: date | None, until: date, rule: str
) -> None:
    term = lifecycle.retention_term(last_visit, birth_date=birth, death_date=death)
    assert (term.until, term.rule) == (until, rule), case
    assert lifecycle.retention_until(last_visit, birth_date=birth, death_date=death) == until


def test_add_years_on_29_february() -> None:
    assert lifecycle.add_years(date(2004, 2, 29), 1) == date(2005, 2, 28)
    assert lifecycle.add_years(date(2004, 2, 29), 4) == date(2008, 2, 29)


def test_organisation_term_replaces_the_twenty_years_only() -> None:
    # Thirty years instead of twenty.
    assert lifecycle.retention_term(date(2001, 3, 15), years=30) == lifecycle.RetentionTerm(
        date(2031, 3, 15), lifecycle.RULE_POLICY
    )
    # Ten years: the 28th birthday still extends a child's record …
    assert lifecycle.retention_until(date(2010, 1, 1), birth_date=date(2005, 1, 1), years=10) == date(
        2033, 1, 1
    )
    # … and the death rule still applies.
    assert lifecycle.retention_until(
        date(2010, 1, 1), birth_date=date(1950, 1, 1), death_date=date(2012, 1, 1), years=30
    ) == date(2022, 1, 1)


# ------------------------------------------------------------------------------ the review flow


def _store(
    ctx: AppContext,
    tmp: Path,
    *,
    patient_id: str,
    birth: str,
    study_date: str,
    seed: int,
    slices: int = 2,
) -> tuple[str, list[Path]]:
    """A small synthetic CT study of site CHA's patient ``patient_id`` stored by its modality."""
    folder = tmp / f"{patient_id}-{seed}"
    folder.mkdir()
    paths = ct_series(folder, slices=slices, rows=16, cols=16, patient_id=patient_id, seed=seed)
    for path in paths:
        ds = dcmread(path)
        ds.StudyDate = ds.SeriesDate = study_date
        ds.PatientBirthDate = birth
        ds.IssuerOfPatientID = "CHA"
        ds.save_as(path, enforce_file_format=True)
    for path in paths:
        result = archive.ingest_file(ctx, path, principal=MODALITY, source="MOD_CHA")
        assert result.outcome == "stored", result.reason
    return str(dcmread(paths[0]).StudyInstanceUID), paths


def _run_jobs(ctx: AppContext) -> None:
    runner = JobRunner(ctx, {lifecycle.LIFECYCLE_DELETE: lifecycle.run_deletions})
    while runner.run_once():
        pass


def _study_exists(ctx: AppContext, study_uid: str) -> bool:
    with ctx.db.reading() as session:
        return session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is not None


def _items(ctx: AppContext, batch_id: int) -> dict[str, tuple[str, str]]:
    with ctx.db.reading() as session:
        return {
            i.study_uid: (i.scope, i.state)
            for i in lifecycle.batch_items(session, batch_id, principal=OPERATOR)
        }


def test_review_proposes_what_is_due_and_approval_deletes_it(ctx: AppContext, tmp_path: Path) -> None:
    adult, adult_files = _store(
        ctx, tmp_path, patient_id="IPP-A", birth="19500101", study_date="20010315", seed=1
    )
    # Same person seen again in 2008: both studies are kept until 2028 (the last visit decides).
    revisited, _ = _store(ctx, tmp_path, patient_id="IPP-B", birth="19500101", study_date="20010601", seed=2)
    _store(ctx, tmp_path, patient_id="IPP-B", birth="19500101", study_date="20080601", seed=3)
    # Seen at 3: twenty years end in 2022, the 28th birthday in 2027.
    minor, _ = _store(ctx, tmp_path, patient_id="IPP-C", birth="19990601", study_date="20020210", seed=4)
    # Died 2 years after the last visit: kept until 2020 instead of 2028.
    deceased, deceased_files = _store(
        ctx, tmp_path, patient_id="IPP-D", birth="19400101", study_date="20080101", seed=5
    )
    held, _ = _store(ctx, tmp_path, patient_id="IPP-E", birth="19500101", study_date="19990101", seed=6)
    held_patient, _ = _store(
        ctx, tmp_path, patient_id="IPP-F", birth="19500101", study_date="19980101", seed=7
    )
    recent, _ = _store(ctx, tmp_path, patient_id="IPP-G", birth="19500101", study_date="20150101", seed=8)

    with ctx.db.unit_of_work() as session:
        lifecycle.record_death(
            session, local_id="IPP-D", authority=CHA_IPP, death_date="20100601", principal=OPERATOR
        )
        lifecycle.add_hold(
            session, reason="recours contentieux 2025-117", principal=ADMIN_CHA, study_uid=held
        )
        lifecycle.add_hold(
            session, reason="recours gracieux", principal=OPERATOR, patient_id="IPP-F", authority=CHA_IPP
        )
    # The holds are listed to whoever may lift them: CHA's administrators and the region, not CHB's.
    with ctx.db.reading() as session:
        for principal, expected in ((ADMIN_CHA, 2), (REGIONAL, 2), (OPERATOR, 2), (ADMIN_CHB, 0)):
            listed = lifecycle.list_holds(session, principal)
            assert len(listed) == expected, principal.name
        assert {h.study_uid or h.patient for h in lifecycle.list_holds(session, ADMIN_CHA)} == {
            held,
            "IPP-F (CHA)",
        }
    with ctx.db.reading() as session:
        dates = {
            uid: lifecycle.study_retention(session, uid)
            for uid in (adult, revisited, minor, deceased, recent)
        }
    assert {uid: (r.until, r.rule) for uid, r in dates.items() if r} == {
        adult: (date(2021, 3, 15), lifecycle.RULE_LAST_VISIT),
        revisited: (date(2028, 6, 1), lifecycle.RULE_LAST_VISIT),
        minor: (date(2027, 6, 1), lifecycle.RULE_28TH_BIRTHDAY),
        deceased: (date(2020, 6, 1), lifecycle.RULE_DEATH),
        recent: (date(2035, 1, 1), lifecycle.RULE_LAST_VISIT),
    }

    # Site administrators of another organisation may neither review nor approve CHA's records.
    with pytest.raises(AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.review(session, principal=ADMIN_CHB, today=TODAY, organisation="CHA")
    with ctx.db.unit_of_work() as session:
        batch = lifecycle.review(session, principal=ADMIN_CHA, today=TODAY, organisation="CHA")
        assert batch is not None
        batch_id = batch.id
    assert _items(ctx, batch_id) == {adult: (SCOPE_STUDY, "pending"), deceased: (SCOPE_STUDY, "pending")}
    # A second review proposes nothing more: those studies are in an open batch.
    with ctx.db.unit_of_work() as session:
        assert lifecycle.review(session, principal=REGIONAL, today=TODAY) is None
    # Nothing is deleted before approval.
    _run_jobs(ctx)
    assert _study_exists(ctx, adult)
    with pytest.raises(AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.approve(session, batch_id, principal=ADMIN_CHB)
    with ctx.db.unit_of_work() as session:
        assert len(lifecycle.approve(session, batch_id, principal=ADMIN_CHA)) == 2
    with pytest.raises(lifecycle.LifecycleError), ctx.db.unit_of_work() as session:
        lifecycle.approve(session, batch_id, principal=ADMIN_CHA)

    with ctx.db.reading() as session:
        doomed_keys = list(
            session.scalars(
                select(Blob.key)
                .join(Instance, Instance.id == Blob.instance_pk)
                .join(Series, Series.id == Instance.series_pk)
                .join(Study, Study.id == Series.study_pk)
                .where(Study.study_uid.in_([adult, deceased]))
            )
        )
    assert len(doomed_keys) == 4
    _run_jobs(ctx)

    assert _items(ctx, batch_id) == {
        adult: (SCOPE_STUDY, ITEM_DELETED),
        deceased: (SCOPE_STUDY, ITEM_DELETED),
    }
    for uid in (adult, deceased):
        assert not _study_exists(ctx, uid)
    for uid in (revisited, minor, held, held_patient, recent):
        assert _study_exists(ctx, uid)
    assert not any(ctx.store.exists(key) for key in doomed_keys)
    report = check(ctx)
    assert report.clean and report.checked == 12, report
    with ctx.db.reading() as session:
        deleted_sops = set(session.scalars(select(ChangeEvent.sop_uid).where(ChangeEvent.kind == "deleted")))
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete")))
        assert archive.find_instances(session, principal=OPERATOR, study_uid=adult) == []
    expected_sops = {str(dcmread(p).SOPInstanceUID) for p in adult_files + deceased_files}
    assert deleted_sops == expected_sops
    assert {(e.study_uid, e.outcome, e.patient_id) for e in events} == {
        (adult, "success", "IPP-A"),
        (deceased, "success", "IPP-D"),
    }
    for event in events:
        assert event.detail["batch"] == batch_id and event.detail["approved_by"] == ADMIN_CHA.audit_name
    with ctx.db.reading() as session:
        assert audit.verify(session).problem is None
    # Running the jobs again changes nothing (idempotent).
    with ctx.db.reading() as session:
        items = lifecycle.batch_items(session, batch_id, principal=OPERATOR)
    for item in items:
        assert lifecycle.execute_item(ctx, item.id, today=TODAY) == ITEM_DELETED


def test_a_hold_placed_after_approval_refuses_the_deletion(ctx: AppContext, tmp_path: Path) -> None:
    study, _ = _store(ctx, tmp_path, patient_id="IPP-H", birth="19500101", study_date="20000101", seed=11)
    with ctx.db.unit_of_work() as session:
        batch = lifecycle.review(session, principal=REGIONAL, today=TODAY)
        assert batch is not None
        batch_id = batch.id
        lifecycle.approve(session, batch_id, principal=REGIONAL)
    with ctx.db.unit_of_work() as session:
        hold = lifecycle.add_hold(
            session, reason="recours contentieux", principal=ADMIN_CHA, patient_id="IPP-H", authority=CHA_IPP
        )
        hold_id = hold.id
    _run_jobs(ctx)
    assert _items(ctx, batch_id) == {study: (SCOPE_STUDY, ITEM_REFUSED)}
    assert _study_exists(ctx, study)
    with ctx.db.reading() as session:
        refused = session.scalar(
            select(AuditEvent).where(AuditEvent.action == "study.delete", AuditEvent.study_uid == study)
        )
        assert refused is not None and refused.outcome == "failure"
        assert refused.detail["refused"] == "legal hold" and refused.detail["batch"] == batch_id
    # Held: the next review does not propose it; once the hold is lifted it does again.
    with ctx.db.unit_of_work() as session:
        assert lifecycle.review(session, principal=REGIONAL, today=TODAY) is None
        lifecycle.remove_hold(session, hold_id, reason="désistement", principal=ADMIN_CHA)
    with ctx.db.unit_of_work() as session:
        again = lifecycle.review(session, principal=REGIONAL, today=TODAY)
        assert again is not None
        assert [i.study_uid for i in lifecycle.batch_items(session, again.id, principal=REGIONAL)] == [study]


def test_organisation_policy_changes_what_is_due(ctx: AppContext, tmp_path: Path) -> None:
    study, _ = _store(ctx, tmp_path, patient_id="IPP-P", birth="19500101", study_date="20120101", seed=21)
    with ctx.db.unit_of_work() as session:
        assert lifecycle.review(session, principal=ADMIN_CHA, today=TODAY, organisation="CHA") is None
        with pytest.raises(AccessDenied):
            lifecycle.set_policy(session, organisation="CHA", years=10, principal=ADMIN_CHB)
        lifecycle.set_policy(session, organisation="CHA", years=10, principal=ADMIN_CHA)
    with ctx.db.unit_of_work() as session:
        retention = lifecycle.study_retention(session, study)
        assert retention is not None and (retention.until, retention.rule) == (
            date(2022, 1, 1),
            lifecycle.RULE_POLICY,
        )
        batch = lifecycle.review(session, principal=ADMIN_CHA, today=TODAY, organisation="CHA")
        assert batch is not None
        lifecycle.cancel(session, batch.id, principal=ADMIN_CHA)
        lifecycle.set_policy(session, organisation="CHA", years=None, principal=ADMIN_CHA)
    with ctx.db.unit_of_work() as session:
        assert lifecycle.review(session, principal=ADMIN_CHA, today=TODAY, organisation="CHA") is None


def _rejection_note(image_path: Path, title: hd.sr.CodedConcept, out: Path) -> Path:
    image = dcmread(image_path)
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=[image],
        content=hd.ko.KeyObjectSelection(document_title=title, referenced_objects=[image]),
        series_instance_uid=str(generate_uid()),
        series_number=99,
        sop_instance_uid=str(generate_uid()),
        instance_number=1,
        manufacturer="Modalité",
    )
    note.save_as(out, enforce_file_format=True)
    return out


def test_instances_rejected_as_retention_expired_are_proposed_and_deleted_alone(
    ctx: AppContext, tmp_path: Path
) -> None:
    study, paths = _store(
        ctx, tmp_path, patient_id="IPP-R", birth="19500101", study_date="20240101", seed=31, slices=3
    )
    rejected = str(dcmread(paths[1]).SOPInstanceUID)
    note = _rejection_note(paths[1], codes.DCM.DataRetentionPolicyExpired, tmp_path / "note.dcm")
    assert archive.ingest_file(ctx, note, principal=MODALITY, source="MOD_CHA").outcome == "stored"
    with ctx.db.reading() as session:
        visible = {i.sop_uid for i in archive.find_instances(session, principal=OPERATOR, study_uid=study)}
        counted = session.scalar(select(Study.num_instances).where(Study.study_uid == study))
    assert rejected not in visible and len(visible) == 3 and counted == 3  # two images and the note
    with ctx.db.unit_of_work() as session:
        batch = lifecycle.review(session, principal=ADMIN_CHA, today=TODAY, organisation="CHA")
        assert batch is not None
        (item,) = lifecycle.batch_items(session, batch.id, principal=ADMIN_CHA)
        assert (item.study_uid, item.scope, item.sop_uids) == (study, SCOPE_REJECTED, [rejected])
        lifecycle.approve(session, batch.id, principal=ADMIN_CHA)
    _run_jobs(ctx)
    with ctx.db.reading() as session:
        stored = set(
            session.scalars(
                select(Instance.sop_uid)
                .join(Series, Series.id == Instance.series_pk)
                .join(Study, Study.id == Series.study_pk)
                .where(Study.study_uid == study)
            )
        )
        counted = session.scalar(select(Study.num_instances).where(Study.study_uid == study))
    assert stored == visible and counted == 3
    assert check(ctx).clean
