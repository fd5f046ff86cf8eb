"""Archive operations: the single ingest path (DESIGN.md §3) and instance look-ups.

Ingest order: parse the header (reject early), write the blob durably, then one transaction that
upserts patient/study/series, inserts the instance with its index keys and JSON header, and
records the audit event. The caller acknowledges only after :func:`ingest_file` returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from sqlalchemy import Select, Table, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from simral.access.policy import (
    AccessDenied,
    Principal,
    may_store,
    storing_organisation,
    visible_series,
    visible_studies,
)
from simral.archive.counts import not_rejected, recount_patient, recount_study
from simral.archive.models import Blob, ChangeEvent, Instance, Patient, Series, Study, StudyOrganisation
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dicom.header import Header, RejectedInstance, read_header
from simral.dicom.matching import normalise_tm
from simral.lifecycle import rejection
from simral.lifecycle.models import RejectedInstance as RejectedRow
from simral.observability import metrics
from simral.patients import crossref
from simral.patients import service as patients
from simral.patients.models import StudyIdentity
from simral.storage.base import BlobStore, StoredBlob, sha256_of_file
from simral.storage.staging import Staging

log = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "duplicate-conflict", "replaced", "rejected"]

#: The index cannot be reached or written (server down, connection lost, disk full): a transient
#: failure, answered "Refused: Out of Resources" (PS3.4 B.2.3 status A700) so the sender retries.
INDEX_UNAVAILABLE = (OperationalError, InterfaceError)
OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance; ``status`` is the C-STORE status to answer (PS3.4 B.2.3)."""

    outcome: Outcome
    status: int
    sop_uid: str = ""
    study_uid: str = ""
    reason: str = ""
    sop_class_uid: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome != "rejected"

    @classmethod
    def of(cls, header: Header, outcome: Outcome, status: int, reason: str = "") -> IngestResult:
        """The result for an instance whose header was read."""
        return cls(outcome, status, header.sop_uid, header.study_uid, reason, header.sop_class_uid)


def blob_key(header: Header, sha256: str) -> str:
    """Where an instance's bytes go: by study and series, named by SOP Instance UID and content."""
    return f"{header.study_uid}/{header.series_uid}/{header.sop_uid}.{sha256[:16]}.dcm"


@dataclass
class _Candidate:
    """An instance that passed the checks and is to be staged and indexed."""

    header: Header
    json_model: dict[str, Any]
    stored: StoredBlob
    replacing: bool
    path: Path


def _rejected(header: Header, status: int, reason: str, *, principal: Principal, source: str) -> IngestResult:
    log.warning("instance rejected from %s: %s", source or principal.audit_name, reason)
    return IngestResult.of(header, "rejected", status, reason[:200])


def _prepare(
    ctx: AppContext,
    path: Path,
    *,
    principal: Principal,
    source: str,
    expected_sop_uid: str,
    expected_study_uid: str,
    known_digest: tuple[str, int] | None,
    reader: Session,
) -> _Candidate | IngestResult:
    """Parse and check one file and apply the duplicate policy (DESIGN.md §3 step 1).

    ``reader`` is the batch's reading session (one for every file of the batch)."""
    try:
        header = read_header(path)
    except RejectedInstance as exc:
        log.warning("instance rejected from %s: %s", source or principal.audit_name, exc.reason)
        return IngestResult("rejected", exc.status, reason=exc.reason)
    if expected_sop_uid and expected_sop_uid != header.sop_uid:
        reason = "SOP Instance UID of the data set differs from the request's"
        return _rejected(header, 0xA900, reason, principal=principal, source=source)
    if expected_study_uid and expected_study_uid != header.study_uid:
        reason = "Study Instance UID of the data set differs from the request's"
        return _rejected(header, 0xA900, reason, principal=principal, source=source)
    try:
        # Built now: deferred (large) elements are read from ``path`` before the file moves.
        json_model = header.json_model()
    except Exception as exc:
        reason = f"header cannot be converted to DICOM JSON: {type(exc).__name__}: {exc}"
        return _rejected(header, 0xC000, reason, principal=principal, source=source)
    sha256, size = known_digest or sha256_of_file(path)
    existing = existing_blob(reader, header.sop_uid)
    if existing is not None:
        decided = _duplicate(ctx, header, existing_sha=existing[0], new_sha=sha256, principal=principal)
        if decided is not None:
            if decided.outcome == "duplicate":
                _restore_if_missing(ctx, existing[1], path)
            return decided
    stored = StoredBlob(key=blob_key(header, sha256), size=size, sha256=sha256)
    return _Candidate(header, json_model, stored, existing is not None, path)


def _stage(
    candidate: _Candidate,
    staging: Staging,
    *,
    move: bool,
    principal: Principal,
    source: str,
) -> IngestResult | None:
    """Stage the candidate's bytes (step 3; the caller fsyncs the folder once for the batch)."""
    try:
        staging.stage(candidate.path, candidate.stored.key, move=move, sync_folder=False)
    except OSError as exc:
        log.error("staging failed for an instance from %s: %s", source or principal.audit_name, exc)
        return IngestResult.of(candidate.header, "rejected", 0xA700, f"storage failure: {exc}")
    return None


def _index_candidate(
    session: Session, ctx: AppContext, candidate: _Candidate, *, principal: Principal, source: str
) -> tuple[Placement, str | None]:
    return _index(
        session,
        candidate.header,
        candidate.json_model,
        candidate.stored,
        cache=hierarchy_cache(ctx),
        replacing=candidate.replacing,
        store_name=ctx.store.name,
        principal=principal,
        source=source,
        allow_test_ins=ctx.settings.ins_test_oids_allowed,
    )


def _publish_staged(ctx: AppContext, staging: Staging, key: str) -> None:
    """Publish an indexed staged blob (step 5). A failure leaves it staged: the instance is durable
    and indexed, reads use the staged copy and the recovery sweep publishes it when the store is
    back. Not found: an ingest of the same bytes (same staged name) published it already."""
    try:
        staging.publish(key)
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.error("publishing a blob to the %s store failed (kept staged): %s", ctx.store.name, exc)


def _finish(
    ctx: AppContext,
    candidate: _Candidate,
    staging: Staging,
    placement: Placement,
    replaced: str | None,
    *,
    principal: Principal,
) -> IngestResult:
    """After the commit: remember the placement, publish the blob (step 5), drop a replaced one."""
    header = candidate.header
    hierarchy_cache(ctx).remember(placement, header.sop_class_uid, storing_organisation(principal))
    _publish_staged(ctx, staging, candidate.stored.key)
    outcome: Outcome = "stored"
    if replaced is not None:
        # The replaced bytes may have moved to another tier: drop them wherever they are.
        for store in ctx.stores.values() if ctx.stores else (ctx.store,):
            if store.name != ctx.settings.replica_store:
                with contextlib.suppress(Exception):
                    store.delete(replaced)
        outcome = "replaced"
    return IngestResult.of(header, outcome, 0x0000)


def _index_one(
    ctx: AppContext, candidate: _Candidate, staging: Staging, *, principal: Principal, source: str
) -> IngestResult:
    """Index one staged candidate in its own transaction (step 4) and finish it."""
    header = candidate.header
    try:
        with ctx.db.unit_of_work() as session:
            placement, replaced = _index_candidate(
                session, ctx, candidate, principal=principal, source=source
            )
    except IntegrityError:
        # Another association indexed the same SOP Instance UID first: decide as a duplicate.
        with ctx.db.reading() as session:
            row = existing_blob(session, header.sop_uid)
        if row is None:
            staging.discard(candidate.stored.key)
            raise
        if row[1] == candidate.stored.key:
            # Identical bytes, so the same staged name: the first ingest may not have published it
            # yet, and deleting it would lose its blob. Publishing the same bytes again is safe.
            _publish_staged(ctx, staging, candidate.stored.key)
        else:
            staging.discard(candidate.stored.key)
        decided = _duplicate(
            ctx, header, existing_sha=row[0], new_sha=candidate.stored.sha256, principal=principal
        )
        return decided or IngestResult.of(header, "duplicate", 0x0000)
    except INDEX_UNAVAILABLE:
        raise  # the commit's outcome is unknown: the staged copy is left to the recovery sweep
    except BaseException:
        staging.discard(candidate.stored.key)
        raise
    return _finish(ctx, candidate, staging, placement, replaced, principal=principal)


@dataclass(frozen=True)
class IngestItem:
    """One file to archive and what its request says it must be.

    ``expected_sop_uid`` is the Affected SOP Instance UID of a C-STORE request, which must equal
    the dataset's SOP Instance UID (PS3.4 B.2.3, status A900 otherwise); ``expected_study_uid``
    is the study of a STOW-RS ``/studies/{uid}`` request (PS3.18 10.5.1, same status).
    ``known_digest`` is ``(sha256, size)`` of the file when the receiver computed it on the way in.
    """

    path: Path
    expected_study_uid: str = ""
    known_digest: tuple[str, int] | None = None
    expected_sop_uid: str = ""


def ingest_file(
    ctx: AppContext,
    path: Path,
    *,
    principal: Principal,
    source: str = "",
    move: bool = False,
    expected_sop_uid: str = "",
    expected_study_uid: str = "",
    known_digest: tuple[str, int] | None = None,
    entry: str = "internal",
) -> IngestResult:
    """Archive one Part 10 file; return once it is durable and indexed (or refused).

    ``move`` lets the store take ``path`` (it must be on the store's scratch filesystem); the
    other arguments are those of :class:`IngestItem` and :func:`ingest_files`.
    """
    item = IngestItem(path, expected_study_uid, known_digest, expected_sop_uid)
    return ingest_files(ctx, [item], principal=principal, source=source, move=move, entry=entry)[0]


def ingest_files(
    ctx: AppContext,
    items: Sequence[IngestItem],
    *,
    principal: Principal,
    source: str = "",
    move: bool = False,
    entry: str = "internal",
) -> list[IngestResult]:
    """Archive files acknowledged together (DESIGN.md §3; one file for C-STORE and import, the
    parts of a request for STOW-RS): check each, stage them with one folder fsync, index them in
    one transaction (a group commit), then publish. Should that transaction fail on a uniqueness
    race, each instance is indexed in a transaction of its own and decided as a duplicate.

    ``entry`` names the entry point in the ingest metrics (:mod:`simral.observability.metrics`).
    """
    started = time.perf_counter()
    outcomes: list[str] = ["error"] * len(items)
    try:
        try:
            results = _ingest_files(ctx, items, principal=principal, source=source, move=move)
        except INDEX_UNAVAILABLE as exc:
            log.error(
                "index unavailable, %d instance(s) from %s refused: %s",
                len(items),
                source or principal.audit_name,
                type(exc).__name__,
            )
            reason = "archive index temporarily unavailable"
            results = [IngestResult("rejected", OUT_OF_RESOURCES, reason=reason) for _ in items]
        outcomes = [r.outcome for r in results]
        return results
    finally:
        metrics.record_ingest(entry, outcomes, time.perf_counter() - started)


def _ingest_files(
    ctx: AppContext, items: Sequence[IngestItem], *, principal: Principal, source: str, move: bool
) -> list[IngestResult]:
    if not may_store(principal):
        raise AccessDenied(f"{principal.audit_name} may not store instances")
    results: list[IngestResult | None] = [None] * len(items)
    staged: list[tuple[int, _Candidate]] = []
    staging = Staging(ctx.store)
    try:
        with ctx.db.reading() as reader:
            prepared_items = [
                _prepare(
                    ctx,
                    item.path,
                    principal=principal,
                    source=source,
                    expected_sop_uid=item.expected_sop_uid,
                    expected_study_uid=item.expected_study_uid,
                    known_digest=item.known_digest,
                    reader=reader,
                )
                for item in items
            ]
        for index, prepared in enumerate(prepared_items):
            if isinstance(prepared, IngestResult):
                results[index] = prepared
                continue
            failed = _stage(prepared, staging, move=move, principal=principal, source=source)
            if failed is not None:
                results[index] = failed
                continue
            staged.append((index, prepared))
        if staged:
            staging.sync_folder()
    except BaseException:
        for _, candidate in staged:
            staging.discard(candidate.stored.key)
        raise
    keys = [c.stored.key for _, c in staged]
    sops = [c.header.sop_uid for _, c in staged]
    if len(set(keys)) == len(keys) and len(set(sops)) == len(sops):
        try:
            with ctx.db.unit_of_work() as session:
                indexed = [
                    _index_candidate(session, ctx, candidate, principal=principal, source=source)
                    for _, candidate in staged
                ]
        except IntegrityError:
            pass  # a concurrent store of one of them: fall back to one transaction each
        except INDEX_UNAVAILABLE:
            # The connection may have died after the server committed: the staged copies stay,
            # and the recovery sweep publishes those the index holds and drops the others.
            raise
        except BaseException:
            for key in keys:
                staging.discard(key)
            raise
        else:
            for (index, candidate), (placement, replaced) in zip(staged, indexed, strict=True):
                results[index] = _finish(ctx, candidate, staging, placement, replaced, principal=principal)
            staged = []
    for index, candidate in staged:
        if results[index] is None:
            results[index] = _index_one(ctx, candidate, staging, principal=principal, source=source)
    return [r for r in results if r is not None]


def _restore_if_missing(ctx: AppContext, key: str, path: Path) -> None:
    """Put the bytes of an identical re-sent instance back when its indexed blob is missing.

    A node killed between its index commit and the blob's publication (:mod:`simral.storage.staging`)
    leaves the blob staged on its own disk, where other nodes cannot read it; the sender, never
    acknowledged, sends again, possibly to another node. The answer "success, nothing new" (DESIGN.md
    §3) must then be true: the re-sent bytes (same SHA-256, so same key) are written to the store the
    index names before the acknowledgement. Writing the same bytes twice is harmless.
    """
    if blob_exists(ctx, key):
        return
    blob_store(ctx, key).put_file(key, path, move=False)
    log.warning("an indexed blob was missing; restored it from an identical re-sent instance")


def _duplicate(
    ctx: AppContext, header: Header, *, existing_sha: str, new_sha: str, principal: Principal
) -> IngestResult | None:
    """Apply the duplicate policy; None means 'store it anyway' (the replace policy)."""
    if existing_sha == new_sha:
        return IngestResult.of(header, "duplicate", 0x0000)
    policy = ctx.settings.duplicate_policy
    if policy == "replace":
        return None
    with ctx.db.unit_of_work() as session:
        audit.record(
            session,
            action="instance.duplicate-conflict",
            principal=principal,
            outcome="warning" if policy == "keep-first" else "failure",
            study_uid=header.study_uid,
            detail={"sop_instance_uid": header.sop_uid, "policy": policy},
        )
    reason = "SOP Instance UID already stored with different content"
    if policy == "reject":
        return IngestResult.of(header, "rejected", 0x0111, reason)
    # Warning "Elements Discarded" (PS3.4 B.2.3): the new content was not kept.
    return IngestResult.of(header, "duplicate-conflict", 0xB006, reason + "; first kept")


def _insert_ignore(session: Session, model: Any, values: dict[str, Any], conflict: Sequence[str]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING RETURNING id; True when a row was inserted.

    RETURNING, not the row count: drivers do not all report a count for this statement.
    """
    table = cast(Table, model.__table__)
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    else:  # pragma: no cover - other databases are not supported
        stmt = insert(table).values(**values)
    return session.connection().execute(stmt.returning(table.c.id)).first() is not None


def _patient_values(header: Header) -> dict[str, Any]:
    name = header.text("PatientName")
    return {
        "patient_id": header.text("PatientID")[:64],
        "issuer": header.text("IssuerOfPatientID")[:64],
        "name": name[:324],
        "name_upper": name.upper()[:324],
        "birth_date": header.text("PatientBirthDate")[:8],
        "sex": header.text("PatientSex")[:16],
    }


_instance_t = cast(Table, Instance.__table__)
_blob_t = cast(Table, Blob.__table__)
_series_t = cast(Table, Series.__table__)
_study_t = cast(Table, Study.__table__)
_patient_t = cast(Table, Patient.__table__)
# Statements of the ingest hot path, built once (Core, no ORM unit of work per instance).
_INSERT_INSTANCE = insert(_instance_t).returning(_instance_t.c.id)
_INSERT_BLOB = insert(_blob_t)
_COUNT_SERIES = (
    update(_series_t)
    .where(_series_t.c.id == bindparam("pk"))
    .values(num_instances=_series_t.c.num_instances + 1)
)
_COUNT_STUDY = (
    update(_study_t)
    .where(_study_t.c.id == bindparam("pk"))
    .values(
        num_instances=_study_t.c.num_instances + 1,
        num_series=_study_t.c.num_series + bindparam("new_series"),
        updated_at=bindparam("now"),
    )
)
_STUDY_LISTS = select(_study_t.c.modalities, _study_t.c.sop_classes).where(_study_t.c.id == bindparam("pk"))
_SET_STUDY_LISTS = (
    update(_study_t)
    .where(_study_t.c.id == bindparam("pk"))
    .values(modalities=bindparam("new_modalities"), sop_classes=bindparam("new_sop_classes"))
)
_COUNT_PATIENT = (
    update(_patient_t)
    .where(_patient_t.c.id == bindparam("pk"))
    .values(
        num_instances=_patient_t.c.num_instances + 1,
        num_series=_patient_t.c.num_series + bindparam("new_series"),
        num_studies=_patient_t.c.num_studies + bindparam("new_study"),
    )
)
_EXISTING = (
    select(_blob_t.c.sha256, _blob_t.c.key)
    .join(_instance_t, _instance_t.c.id == _blob_t.c.instance_pk)
    .where(_instance_t.c.sop_uid == bindparam("sop_uid"))
)


def existing_blob(session: Session, sop_uid: str) -> tuple[str, str] | None:
    """(SHA-256, key) of the instance already stored under ``sop_uid``, if any."""
    row = session.connection().execute(_EXISTING, {"sop_uid": sop_uid}).first()
    return (row[0], row[1]) if row else None


@dataclass(frozen=True)
class Placement:
    """Where an indexed instance sits: its series, study and patient rows."""

    series_uid: str
    study_uid: str
    series_pk: int
    study_pk: int
    patient_pk: int


class HierarchyCache:
    """Committed series → study → patient rows, so that the usual case (the next instance of a
    series already indexed) costs no look-up. Filled only after a commit; rows are never renamed.
    """

    def __init__(self, capacity: int = 20000) -> None:
        self.capacity = capacity
        self._series: OrderedDict[str, Placement] = OrderedDict()
        self._sop_classes: dict[int, set[str]] = {}
        #: (study pk, organisation code) pairs known to be in ``study_organisation``.
        self._links: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def get(self, series_uid: str) -> Placement | None:
        with self._lock:
            placement = self._series.get(series_uid)
            if placement is not None:
                self._series.move_to_end(series_uid)
            return placement

    def knows_sop_class(self, study_pk: int, sop_class: str) -> bool:
        with self._lock:
            return sop_class in self._sop_classes.get(study_pk, ())

    def linked(self, study_pk: int, organisation: str) -> bool:
        with self._lock:
            return (study_pk, organisation) in self._links

    def forget(self, series_uids: Iterable[str]) -> None:
        """Drop deleted series (their rows are gone: the next instance places itself again)."""
        with self._lock:
            for uid in series_uids:
                dropped = self._series.pop(uid, None)
                if dropped is not None:
                    self._sop_classes.pop(dropped.study_pk, None)
                    self._links = {link for link in self._links if link[0] != dropped.study_pk}

    def remember(self, placement: Placement, sop_class: str, organisation: str = "") -> None:
        with self._lock:
            self._series[placement.series_uid] = placement
            self._sop_classes.setdefault(placement.study_pk, set()).add(sop_class)
            if organisation:
                self._links.add((placement.study_pk, organisation))
            while len(self._series) > self.capacity:
                _uid, dropped = self._series.popitem(last=False)
                self._sop_classes.pop(dropped.study_pk, None)
                self._links = {link for link in self._links if link[0] != dropped.study_pk}


def hierarchy_cache(ctx: AppContext) -> HierarchyCache:
    """The process's hierarchy cache for this database."""
    cache = ctx.caches.get("hierarchy")
    if cache is None:
        cache = ctx.caches.setdefault("hierarchy", HierarchyCache())
    return cast(HierarchyCache, cache)


#: Issuer of Patient ID of an INS (``ASIP-SANTE-INS-NIR``, ``-NIA``: DESIGN.md §6).
INS_NAMESPACE_PREFIX = "ASIP-SANTE-INS-"


def _place(
    session: Session, header: Header, json_model: dict[str, Any], *, principal: Principal, now: Any
) -> tuple[Placement, bool, bool, bool]:
    """Upsert patient, study and series; return the placement and which rows are new.

    An instance naming by INS the patient of a study already held under their local identifier
    (the DMP manifest: PatientID = INS, DESIGN.md §6, §8) joins that study's patient: no second
    patient row, no mismatch warning."""
    patient_values = _patient_values(header)
    study_row = (
        session.execute(select(Study.id, Study.patient_pk).where(Study.study_uid == header.study_uid)).first()
        if patient_values["issuer"].startswith(INS_NAMESPACE_PREFIX)
        else None
    )
    patient_pk: int | None
    if study_row is not None and patients.study_person_has_ins(
        session, study_row[0], patient_values["patient_id"]
    ):
        new_patient, patient_pk = False, study_row[1]
    else:
        new_patient = _insert_ignore(
            session,
            Patient,
            {**patient_values, "meta": _patient_module(json_model), "created_at": now, "updated_at": now},
            ["patient_id", "issuer"],
        )
        patient_pk = session.scalar(
            select(Patient.id).where(
                Patient.patient_id == patient_values["patient_id"], Patient.issuer == patient_values["issuer"]
            )
        )
    referring = header.text("ReferringPhysicianName")
    new_study = _insert_ignore(
        session,
        Study,
        {
            "patient_pk": patient_pk,
            "study_uid": header.study_uid,
            "study_date": header.text("StudyDate")[:8],
            "study_time": normalise_tm(header.text("StudyTime")),
            "accession_number": header.text("AccessionNumber")[:16],
            "study_id": header.text("StudyID")[:16],
            "description": header.text("StudyDescription")[:64],
            "referring_physician": referring[:324],
            "referring_physician_upper": referring.upper()[:324],
            "meta": json_model,
            "created_at": now,
            "updated_at": now,
        },
        ["study_uid"],
    )
    study_pk, study_patient_pk = session.execute(
        select(Study.id, Study.patient_pk).where(Study.study_uid == header.study_uid)
    ).one()
    if study_patient_pk != patient_pk:
        # Same Study Instance UID under another patient identity: keep the study where it is, and
        # leave a trace for identity vigilance rather than move it silently.
        audit.record(
            session,
            action="study.patient-mismatch",
            principal=principal,
            outcome="warning",
            study_uid=header.study_uid,
            detail={"sop_instance_uid": header.sop_uid},
        )
        patient_pk = study_patient_pk
    new_series = _insert_ignore(
        session,
        Series,
        {
            "study_pk": study_pk,
            "series_uid": header.series_uid,
            "modality": header.text("Modality")[:16],
            "series_number": header.integer("SeriesNumber"),
            "description": header.text("SeriesDescription")[:64],
            "body_part": header.text("BodyPartExamined")[:16],
            "series_date": header.text("SeriesDate")[:8],
            "series_time": normalise_tm(header.text("SeriesTime")),
            "meta": json_model,
            "created_at": now,
        },
        ["series_uid"],
    )
    series_pk = session.scalar(select(Series.id).where(Series.series_uid == header.series_uid))
    assert series_pk is not None and patient_pk is not None
    placement = Placement(header.series_uid, header.study_uid, series_pk, study_pk, patient_pk)
    return placement, new_patient, new_study, new_series


def _index(
    session: Session,
    header: Header,
    json_model: dict[str, Any],
    stored: StoredBlob,
    *,
    cache: HierarchyCache,
    replacing: bool,
    store_name: str,
    principal: Principal,
    source: str,
    allow_test_ins: bool = False,
) -> tuple[Placement, str | None]:
    """Index one instance; return its placement and the key of a replaced blob, if any.

    The usual case, another instance of a series already indexed, is six statements: instance,
    blob, three counter updates and the audit record. The patient identity (DESIGN.md §3 step 2)
    is resolved once per study: when the study is new, or, at the first instance of a series this
    process has not placed yet, when the study has no identity yet.
    """
    now = utcnow()
    placement = cache.get(header.series_uid)
    new_patient = new_study = new_series = placed = False
    if placement is None or placement.study_uid != header.study_uid:
        placement, new_patient, new_study, new_series = _place(
            session, header, json_model, principal=principal, now=now
        )
        placed = True

    organisation = storing_organisation(principal)
    if placed and (new_study or not patients.study_is_linked(session, placement.study_pk)):
        patients.link_study(
            session,
            study_pk=placement.study_pk,
            patient=patients.dicom_patient(header.dataset),
            organisation=organisation,
            principal=principal,
            allow_test_ins=allow_test_ins,
        )
    if organisation and (new_study or not cache.linked(placement.study_pk, organisation)):
        _insert_ignore(
            session,
            StudyOrganisation,
            {
                "study_pk": placement.study_pk,
                "organisation_code": organisation,
                "relation": "produced",
                "created_at": now,
            },
            ["study_pk", "organisation_code"],
        )

    if replacing:
        old = session.execute(
            select(Instance.id, Blob.key).join(Blob).where(Instance.sop_uid == header.sop_uid)
        ).first()
        if old is not None:
            session.execute(
                update(Blob)
                .where(Blob.instance_pk == old[0])
                .values(
                    store=store_name,
                    key=stored.key,
                    size=stored.size,
                    sha256=stored.sha256,
                    transfer_syntax_uid=header.transfer_syntax_uid,
                    tier="hot",
                    created_at=now,
                    verified_at=None,
                )
            )
            session.execute(
                update(Instance)
                .where(Instance.id == old[0])
                .values(meta=json_model, transfer_syntax_uid=header.transfer_syntax_uid, source=source[:128])
            )
            _audit_store(session, header, principal=principal, source=source, replaced=True)
            record_change(session, "updated", header.study_uid, header.series_uid, header.sop_uid, now=now)
            return placement, old[1]

    conn = session.connection()
    instance_pk = conn.execute(
        _INSERT_INSTANCE,
        {
            "series_pk": placement.series_pk,
            "sop_uid": header.sop_uid,
            "sop_class_uid": header.sop_class_uid,
            "instance_number": header.integer("InstanceNumber"),
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "num_frames": header.integer("NumberOfFrames"),
            "rows": header.integer("Rows"),
            "columns": header.integer("Columns"),
            "meta": json_model,
            "source": source[:128],
            "created_at": now,
        },
    ).scalar_one()
    conn.execute(
        _INSERT_BLOB,
        {
            "instance_pk": instance_pk,
            "store": store_name,
            "key": stored.key,
            "size": stored.size,
            "sha256": stored.sha256,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "tier": "hot",
            "created_at": now,
        },
    )
    _bump_counts(
        session,
        placement,
        header=header,
        new_study=new_study,
        new_series=new_series,
        lists_changed=new_series or not cache.knows_sop_class(placement.study_pk, header.sop_class_uid),
        now=now,
    )
    if not new_patient and new_study:
        # The patient module of the latest study describes the patient best.
        session.execute(
            update(Patient)
            .where(Patient.id == placement.patient_pk)
            .values(meta=_patient_module(json_model), updated_at=now)
        )
    _audit_store(session, header, principal=principal, source=source, replaced=False)
    record_change(session, "created", header.study_uid, header.series_uid, header.sop_uid, now=now)
    if header.sop_class_uid == rejection.KOS_SOP_CLASS:
        # IHE IOCM (RAD-66): a rejection note hides what it references, in this transaction.
        rejection.apply_rejection_note(
            session, meta=json_model, note_sop_uid=header.sop_uid, principal=principal
        )
    return placement, None


def switch_blob(
    session: Session,
    *,
    sop_uid: str,
    expected_sha256: str,
    stored: StoredBlob,
    transfer_syntax_uid: str,
    json_model: dict[str, Any],
    store_name: str,
) -> str | None:
    """Point an instance at new bytes of the same data set in another transfer syntax (a lossless
    re-encoding, PS3.5 §10: same SOP Instance UID), written to the store ``store_name`` (the hot
    tier), in the caller's transaction; record the change.

    Returns the key of the blob no longer referenced, to delete after the commit; None (nothing
    changed) when the instance is gone or its bytes are no longer ``expected_sha256``.
    """
    row = session.execute(
        select(Instance.id, Blob.key, Series.series_uid, Study.study_uid)
        .join(Blob, Blob.instance_pk == Instance.id)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(Instance.sop_uid == sop_uid, Blob.sha256 == expected_sha256)
    ).first()
    if row is None:
        return None
    now = utcnow()
    switched = session.execute(
        update(Blob)
        .where(Blob.instance_pk == row.id, Blob.sha256 == expected_sha256)
        .values(
            key=stored.key,
            size=stored.size,
            sha256=stored.sha256,
            transfer_syntax_uid=transfer_syntax_uid,
            store=store_name,
            tier="hot",
            created_at=now,
            verified_at=now,
        )
    )
    if cast(Any, switched).rowcount != 1:
        return None
    session.execute(
        update(Instance)
        .where(Instance.id == row.id)
        .values(meta=json_model, transfer_syntax_uid=transfer_syntax_uid)
    )
    record_change(session, "updated", row.study_uid, row.series_uid, sop_uid, now=now)
    return str(row.key)


_INSERT_CHANGE = insert(cast(Table, ChangeEvent.__table__))
#: Advisory lock key serialising change-feed writers on PostgreSQL (commit order = ``seq`` order).
CHANGE_FEED_LOCK = 0x53494D52


def record_change(
    session: Session, kind: str, study_uid: str, series_uid: str, sop_uid: str, *, now: Any
) -> None:
    """Append to the change feed in the caller's transaction (last statement before commit).

    On PostgreSQL the transaction-level advisory lock makes ``seq`` values become visible in order;
    SQLite writers are already serialised by ``BEGIN IMMEDIATE``.
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({CHANGE_FEED_LOCK})")
    conn.execute(
        _INSERT_CHANGE,
        {"kind": kind, "study_uid": study_uid, "series_uid": series_uid, "sop_uid": sop_uid, "at": now},
    )


@dataclass(frozen=True)
class Change:
    """One entry of the change feed."""

    seq: int
    kind: str
    study_uid: str
    series_uid: str
    sop_uid: str
    at: str


def changes_since(session: Session, *, principal: Principal, since: int, limit: int) -> list[Change]:
    """Feed entries after ``since`` about studies visible to ``principal``, oldest first."""
    query = visible_studies(
        principal,
        select(
            ChangeEvent.seq,
            ChangeEvent.kind,
            ChangeEvent.study_uid,
            ChangeEvent.series_uid,
            ChangeEvent.sop_uid,
            ChangeEvent.at,
        ).join(Study, Study.study_uid == ChangeEvent.study_uid),
    )
    rows = session.execute(query.where(ChangeEvent.seq > since).order_by(ChangeEvent.seq).limit(limit))
    return [Change(r[0], r[1], r[2], r[3], r[4], r[5].isoformat()) for r in rows]


def _audit_store(
    session: Session, header: Header, *, principal: Principal, source: str, replaced: bool
) -> None:
    audit.record(
        session,
        action="instance.store",
        principal=principal,
        study_uid=header.study_uid,
        patient_id=header.text("PatientID")[:64],
        patient_issuer=header.text("IssuerOfPatientID")[:64],
        detail={"sop_instance_uid": header.sop_uid, "source": source, "replaced": replaced},
    )


_PATIENT_TAGS = {
    "00100010", "00100020", "00100021", "00100024", "00100030", "00100032", "00100040",
    "00101000", "00101001", "00101002", "00101010", "00101020", "00101030", "00102160", "00104000",
}  # fmt: skip


def _patient_module(json_model: dict[str, Any]) -> dict[str, Any]:
    return {tag: value for tag, value in json_model.items() if tag in _PATIENT_TAGS or tag == "00080005"}


def _bump_counts(
    session: Session,
    placement: Placement,
    *,
    header: Header,
    new_study: bool,
    new_series: bool,
    lists_changed: bool,
    now: Any,
) -> None:
    """Maintain the denormalised counts, and the study's modality / SOP class lists when they change."""
    conn = session.connection()
    conn.execute(_COUNT_SERIES, {"pk": placement.series_pk})
    conn.execute(_COUNT_STUDY, {"pk": placement.study_pk, "new_series": int(new_series), "now": now})
    if lists_changed:
        row = conn.execute(_STUDY_LISTS, {"pk": placement.study_pk}).one()
        modalities = set(filter(None, row.modalities.split("\\")))
        if modality := header.text("Modality"):
            modalities.add(modality)
        sop_classes = set(filter(None, row.sop_classes.split("\\"))) | {header.sop_class_uid}
        conn.execute(
            _SET_STUDY_LISTS,
            {
                "pk": placement.study_pk,
                "new_modalities": "\\".join(sorted(modalities))[:256],
                "new_sop_classes": "\\".join(sorted(sop_classes))[:2048],
            },
        )
    conn.execute(
        _COUNT_PATIENT,
        {"pk": placement.patient_pk, "new_series": int(new_series), "new_study": int(new_study)},
    )


# ---------------------------------------------------------------------------------------------
# Look-ups used by retrieve services (C-MOVE, C-GET, DICOMweb)


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve needs to send one instance."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str
    blob_key: str
    size: int
    sha256: str
    series_uid: str = ""
    rows: int | None = None
    num_frames: int | None = None
    #: Patient identification to send instead of the stored one (DICOM JSON by tag), when the
    #: receiver knows the patient by another identifier (:func:`with_shown_identities`).
    shown_patient: dict[str, Any] | None = None

    @property
    def frame_count(self) -> int:
        """Frames of pixel data (0 for an instance without an image)."""
        if not self.rows:
            return 0
        return self.num_frames or 1


def instances_query(principal: Principal) -> Select:
    """Base query of retrievable instances visible to ``principal``."""
    query = (
        select(
            Instance.sop_uid,
            Instance.sop_class_uid,
            Blob.transfer_syntax_uid,
            Study.study_uid,
            Blob.key,
            Blob.size,
            Blob.sha256,
            Series.series_uid,
            Instance.rows,
            Instance.num_frames,
        )
        .join(Blob, Blob.instance_pk == Instance.id)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(not_rejected())
    )
    return visible_series(principal, visible_studies(principal, query))


def iter_instances(session: Session, query: Select) -> Iterator[StoredInstance]:
    """Materialise rows of :func:`instances_query` (ordered for stable sends)."""
    for row in session.execute(
        query.order_by(Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ):
        yield StoredInstance(*row)


def is_indexed(session: Session, key: str) -> bool:
    """Whether a blob key is referenced by the index."""
    return session.scalar(select(Blob.id).where(Blob.key == key)) is not None


def blob_store(ctx: AppContext, key: str) -> BlobStore:
    """The store holding an indexed blob (``blob.store``); the default one for other keys."""
    if ctx.single_store:
        return ctx.store
    with ctx.db.reading() as session:
        name = session.scalar(select(Blob.store).where(Blob.key == key))
    return ctx.store if name is None else ctx.store_named(name)


def open_blob(ctx: AppContext, key: str) -> Any:
    """A readable stream of an indexed blob (its staged copy while it is being published).

    A blob moved to another tier in the meantime (its source deleted after the switch committed,
    :mod:`simral.preservation.tiers`) is read again from where the index now puts it.
    """
    staged = Staging(ctx.store).open_staged(key)
    if staged is not None:
        return staged
    store = blob_store(ctx, key)
    try:
        return store.open(key)
    except FileNotFoundError:
        moved = blob_store(ctx, key)
        if moved is store:
            raise
        return moved.open(key)


def blob_exists(ctx: AppContext, key: str) -> bool:
    """Whether an indexed blob's bytes are there (staged, or in the store the index names)."""
    return Staging(ctx.store).staged_path(key).exists() or blob_store(ctx, key).exists(key)


@contextlib.contextmanager
def local_copy(ctx: AppContext, key: str) -> Iterator[Path]:
    """A local, seekable path of a blob: the blob itself on a filesystem store, else a scratch copy.

    A blob moved away from a filesystem store keeps its old path for ``tier_purge_delay_seconds``.
    """
    path = blob_store(ctx, key).local_path(key)
    if path is not None and path.exists():
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=".tmp-copy-", suffix=".dcm", dir=ctx.store.scratch_dir())
    try:
        with os.fdopen(fd, "wb") as out, open_blob(ctx, key) as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def recover_staged(
    ctx: AppContext, *, older_than: float = 0.0, publish_after: float | None = None
) -> tuple[int, int]:
    """Finish or undo ingests interrupted by a crash, and publish what an unreachable store could
    not take (see :mod:`simral.storage.staging`)."""

    def indexed(key: str) -> bool:
        with ctx.db.reading() as session:
            return is_indexed(session, key)

    return Staging(ctx.store).recover(indexed, older_than=older_than, publish_after=publish_after)


def get_instance(session: Session, *, principal: Principal, sop_uid: str) -> StoredInstance | None:
    """One stored instance by SOP Instance UID, if visible."""
    row = session.execute(instances_query(principal).where(Instance.sop_uid == sop_uid)).first()
    return StoredInstance(*row) if row else None


def _scope(query: Select, study_uid: str, series_uid: str | None, sop_uid: str | None) -> Select:
    query = query.where(Study.study_uid == study_uid)
    if series_uid is not None:
        query = query.where(Series.series_uid == series_uid)
    if sop_uid is not None:
        query = query.where(Instance.sop_uid == sop_uid)
    return query


def find_instances(
    session: Session,
    *,
    principal: Principal,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[StoredInstance]:
    """The visible instances of a study, series or single instance, in sending order. Paths that
    send headers pass them through :func:`with_shown_identities` (frames and renderings need not)."""
    return list(iter_instances(session, _scope(instances_query(principal), study_uid, series_uid, sop_uid)))


def shown_patients(
    session: Session, principal: Principal, study_uids: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """For each study whose patient the principal's organisation knows by another identifier (a
    linked identity, or the survivor of a merge), the PatientID / issuer attributes to show it
    (IHE PIR-style coercion at retrieve time: responses change, stored bytes never do)."""
    if not principal.organisation:
        return {}
    coercion = crossref.Coercion(session, named=None, organisation=principal.organisation)
    shown: dict[str, dict[str, Any]] = {}
    for uid in dict.fromkeys(study_uids):
        pk = session.scalar(select(Study.id).where(Study.study_uid == uid))
        identity = coercion.for_study(pk) if pk is not None else None
        if identity is not None:
            shown[uid] = identity.as_json()
    return shown


def with_shown_identities(
    session: Session, principal: Principal, instances: list[StoredInstance]
) -> list[StoredInstance]:
    """``instances`` with :attr:`StoredInstance.shown_patient` set where the principal's
    organisation knows the patient by another identifier."""
    shown = shown_patients(session, principal, (item.study_uid for item in instances))
    if not shown:
        return instances
    return [
        dataclasses.replace(item, shown_patient=shown[item.study_uid]) if item.study_uid in shown else item
        for item in instances
    ]


@dataclass(frozen=True)
class InstanceMetadata:
    """An instance's place in the hierarchy and its stored header (DICOM JSON, no bulk data)."""

    series_uid: str
    sop_uid: str
    transfer_syntax_uid: str
    meta: dict[str, Any]


def instances_metadata(
    session: Session,
    *,
    principal: Principal,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[InstanceMetadata]:
    """Headers of the visible instances of a study, series or instance (WADO-RS metadata)."""
    query = visible_series(
        principal,
        visible_studies(
            principal,
            select(Series.series_uid, Instance.sop_uid, Instance.transfer_syntax_uid, Instance.meta)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(not_rejected()),
        ),
    )
    query = _scope(query, study_uid, series_uid, sop_uid).order_by(
        Series.series_number, Series.id, Instance.instance_number, Instance.id
    )
    items = [InstanceMetadata(*row) for row in session.execute(query)]
    shown = shown_patients(session, principal, [study_uid]) if items else {}
    if study_uid in shown:
        items = [dataclasses.replace(item, meta={**item.meta, **shown[study_uid]}) for item in items]
    return items


def audit_reads(
    ctx: AppContext,
    principal: Principal,
    study_uids: Iterable[str],
    *,
    action: str = "study.read",
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
) -> None:
    """Audit that ``principal`` read these studies (PS3.15 A.5.3.2 "DICOM Instances Accessed"),
    with each study's patient identifiers; repeated reads within the audit window count once."""
    due = audit.due_reads(ctx, principal, study_uids, action=f"{action}/{outcome}")
    if not due:
        return
    with ctx.db.unit_of_work() as session:
        patients = {
            uid: (pid, issuer)
            for uid, pid, issuer in session.execute(
                select(Study.study_uid, Patient.patient_id, Patient.issuer)
                .join(Patient, Patient.id == Study.patient_pk)
                .where(Study.study_uid.in_(due))
            )
        }
        for uid in due:
            pid, issuer = patients.get(uid, ("", ""))
            audit.record(
                session,
                action=action,
                principal=principal,
                outcome=outcome,
                study_uid=uid,
                patient_id=pid,
                patient_issuer=issuer,
                detail=detail,
            )


def audit_query(
    ctx: AppContext, principal: Principal, *, protocol: str, level: str, keys: dict[str, str], matches: int
) -> None:
    """Audit a query (PS3.15 A.5.3.10 "Query"): who asked what, over which protocol, how many matches."""
    with ctx.db.unit_of_work() as session:
        audit.record(
            session,
            action="query",
            principal=principal,
            patient_id=keys.get("PatientID", "")[:64],
            study_uid=keys.get("StudyInstanceUID", "")[:64],
            detail={"protocol": protocol, "level": level, "keys": keys, "matches": matches},
        )


@dataclass(frozen=True)
class StudySummary:
    """A study, its patient and its series, for the portal's study page."""

    study: Study
    patient: Patient
    series: list[Series]


def get_study(session: Session, *, principal: Principal, study_uid: str) -> StudySummary | None:
    """One study with its patient and series, if ``principal`` may see it."""
    row = session.execute(
        visible_studies(
            principal, select(Study, Patient).join(Patient, Patient.id == Study.patient_pk)
        ).where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    series = session.scalars(
        select(Series)
        .where(Series.study_pk == row[0].id, Series.num_instances > 0)
        .order_by(Series.series_number, Series.id)
    )
    return StudySummary(row[0], row[1], list(series))


def study_holders(session: Session, study_uid: str) -> tuple[str, list[str]] | None:
    """For a study, whoever may see it or not: its patient ID and the organisations holding it
    (break-glass alerts go to their administrators); None if there is no such study."""
    found = session.execute(
        select(Study.id, Patient.patient_id)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(Study.study_uid == study_uid)
    ).first()
    if found is None:
        return None
    codes = session.scalars(
        select(StudyOrganisation.organisation_code).where(StudyOrganisation.study_pk == found[0])
    )
    return found[1], sorted(codes)


# ---------------------------------------------------------------------------------------------
# Deletion (reviewed retention deletion: simral.lifecycle.service)


@dataclass(frozen=True)
class Deletion:
    """What :func:`delete_instances` removed from the index; the caller deletes ``blob_keys``
    from the store once the transaction committed."""

    study_uid: str
    instances: int
    blob_keys: list[str]
    series_uids: list[str]
    study_deleted: bool
    patient_id: str
    patient_issuer: str


def delete_instances(session: Session, *, study_uid: str, sop_uids: Sequence[str] | None = None) -> Deletion:
    """Remove a study's instances (all, or ``sop_uids``) from the index, in the caller's transaction:
    instance and blob rows, emptied series, the study and its organisation links when nothing is
    left, the archive's patient row when it has no study left; each removed instance is a
    ``deleted`` entry of the change feed. Counts are recomputed. Idempotent: a study or instance
    already gone is skipped. Not a policy decision: the caller checked who may and whether it may.
    """
    now = utcnow()
    found = session.execute(
        select(Study.id, Study.patient_pk, Patient.patient_id, Patient.issuer)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(Study.study_uid == study_uid)
    ).first()
    if found is None:
        return Deletion(study_uid, 0, [], [], False, "", "")
    study_pk, patient_pk, patient_id, issuer = found
    query = (
        select(Instance.id, Instance.sop_uid, Series.series_uid, Blob.key)
        .join(Series, Series.id == Instance.series_pk)
        .outerjoin(Blob, Blob.instance_pk == Instance.id)
        .where(Series.study_pk == study_pk)
    )
    if sop_uids is not None:
        query = query.where(Instance.sop_uid.in_(sorted(sop_uids)))
    rows = session.execute(query).all()
    instance_pks = [row[0] for row in rows]
    keys = [row[3] for row in rows if row[3]]
    for start in range(0, len(instance_pks), 500):
        chunk = instance_pks[start : start + 500]
        session.execute(delete(RejectedRow).where(RejectedRow.instance_pk.in_(chunk)))
        session.execute(delete(Blob).where(Blob.instance_pk.in_(chunk)))
        session.execute(delete(Instance).where(Instance.id.in_(chunk)))
    emptied = list(
        session.scalars(
            select(Series.series_uid).where(
                Series.study_pk == study_pk,
                ~select(Instance.id).where(Instance.series_pk == Series.id).exists(),
            )
        )
    )
    session.execute(delete(Series).where(Series.series_uid.in_(emptied)))
    study_deleted = session.scalar(select(Series.id).where(Series.study_pk == study_pk).limit(1)) is None
    if study_deleted:
        session.execute(delete(StudyOrganisation).where(StudyOrganisation.study_pk == study_pk))
        session.execute(delete(StudyIdentity).where(StudyIdentity.study_pk == study_pk))
        session.execute(delete(Study).where(Study.id == study_pk))
        if session.scalar(select(Study.id).where(Study.patient_pk == patient_pk).limit(1)) is None:
            session.execute(delete(Patient).where(Patient.id == patient_pk))
        else:
            recount_patient(session, patient_pk)
    else:
        recount_study(session, study_pk)
    for _, sop_uid, series_uid, _key in rows:
        record_change(session, "deleted", study_uid, series_uid, sop_uid, now=now)
    return Deletion(study_uid, len(rows), keys, emptied, study_deleted, patient_id, issuer)


def delete_blobs(ctx: AppContext, keys: Iterable[str]) -> None:
    """Delete blobs after the index stopped referencing them, from every store that may hold a copy
    (the tier stores and the replica; a missing one is fine)."""
    stores = list(ctx.stores.values()) if ctx.stores else [ctx.store]
    for key in keys:
        for store in stores:
            store.delete(key)
