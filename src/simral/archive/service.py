"""Archive operations: the single ingest path (DESIGN.md §3) and instance look-ups.

Ingest order: parse the header (reject early), write the blob durably, then one transaction that
upserts patient/study/series, inserts the instance with its index keys and JSON header, and
records the audit event. The caller acknowledges only after :func:`ingest_file` returned.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Select, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_store, visible_studies
from simral.archive.models import Blob, Instance, Patient, Series, Study
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dicom.header import Header, RejectedInstance, read_header
from simral.dicom.matching import normalise_tm
from simral.storage.base import StoredBlob, sha256_of_file
from simral.storage.staging import Staging

log = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "duplicate-conflict", "replaced", "rejected"]


@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance; ``status`` is the C-STORE status to answer (PS3.4 B.2.3)."""

    outcome: Outcome
    status: int
    sop_uid: str = ""
    study_uid: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome != "rejected"


def blob_key(header: Header, sha256: str) -> str:
    """Where an instance's bytes go: by study and series, named by SOP Instance UID and content."""
    return f"{header.study_uid}/{header.series_uid}/{header.sop_uid}.{sha256[:16]}.dcm"


def ingest_file(
    ctx: AppContext,
    path: Path,
    *,
    principal: Principal,
    source: str = "",
    move: bool = False,
    expected_sop_uid: str = "",
) -> IngestResult:
    """Archive one Part 10 file; return once it is durable and indexed (or refused).

    ``move`` lets the store take ``path`` (it must be on the store's scratch filesystem).
    ``expected_sop_uid`` is the Affected SOP Instance UID of a C-STORE request, which must equal
    the dataset's SOP Instance UID (PS3.4 B.2.3, status A900 otherwise).
    """
    if not may_store(principal):
        raise AccessDenied(f"{principal.audit_name} may not store instances")
    try:
        header = read_header(path)
    except RejectedInstance as exc:
        log.warning("instance rejected from %s: %s", source or principal.audit_name, exc.reason)
        return IngestResult("rejected", exc.status, reason=exc.reason)
    if expected_sop_uid and expected_sop_uid != header.sop_uid:
        reason = "SOP Instance UID of the data set differs from the request's"
        log.warning("instance rejected from %s: %s", source or principal.audit_name, reason)
        return IngestResult("rejected", 0xA900, header.sop_uid, header.study_uid, reason)

    try:
        # Built now: deferred (large) elements are read from ``path`` before the file moves.
        json_model = header.json_model()
    except Exception as exc:
        reason = f"header cannot be converted to DICOM JSON: {type(exc).__name__}: {exc}"
        log.warning("instance rejected from %s: %s", source or principal.audit_name, reason)
        return IngestResult("rejected", 0xC000, header.sop_uid, header.study_uid, reason[:200])
    sha256, size = sha256_of_file(path)
    with ctx.db.reading() as session:
        existing = session.execute(
            select(Blob.sha256, Blob.key).join(Instance).where(Instance.sop_uid == header.sop_uid)
        ).first()
    if existing is not None:
        decided = _duplicate(ctx, header, existing_sha=existing[0], new_sha=sha256, principal=principal)
        if decided is not None:
            return decided

    key = blob_key(header, sha256)
    staging = Staging(ctx.store)
    try:
        staging.stage(path, key, move=move)
    except OSError as exc:
        log.error("staging failed for an instance from %s: %s", source or principal.audit_name, exc)
        return IngestResult("rejected", 0xA700, header.sop_uid, header.study_uid, f"storage failure: {exc}")
    stored = StoredBlob(key=key, size=size, sha256=sha256)

    try:
        with ctx.db.unit_of_work() as session:
            replaced = _index(
                session,
                header,
                json_model,
                stored,
                store_name=ctx.store.name,
                principal=principal,
                source=source,
            )
    except IntegrityError:
        # Another association indexed the same SOP Instance UID first: decide as a duplicate.
        staging.discard(key)
        with ctx.db.reading() as session:
            row = session.execute(
                select(Blob.sha256).join(Instance).where(Instance.sop_uid == header.sop_uid)
            ).first()
        if row is None:
            raise
        decided = _duplicate(ctx, header, existing_sha=row[0], new_sha=sha256, principal=principal)
        return decided or IngestResult("duplicate", 0x0000, header.sop_uid, header.study_uid)
    except BaseException:
        staging.discard(key)
        raise
    try:
        staging.publish(key)
    except Exception as exc:
        # The instance is durable in the staging area and indexed; reads use the staged copy and
        # the recovery sweep publishes it when the store is back.
        log.error("publishing a blob to the %s store failed (kept staged): %s", ctx.store.name, exc)
    if replaced is not None:
        with contextlib.suppress(Exception):
            ctx.store.delete(replaced)
        return IngestResult("replaced", 0x0000, header.sop_uid, header.study_uid)
    return IngestResult("stored", 0x0000, header.sop_uid, header.study_uid)


def _duplicate(
    ctx: AppContext, header: Header, *, existing_sha: str, new_sha: str, principal: Principal
) -> IngestResult | None:
    """Apply the duplicate policy; None means 'store it anyway' (the replace policy)."""
    if existing_sha == new_sha:
        return IngestResult("duplicate", 0x0000, header.sop_uid, header.study_uid)
    policy = ctx.settings.duplicate_policy
    if policy == "replace":
        return None
    with ctx.db.unit_of_work() as session:
        audit.record(
            session,
            action="instance.duplicate-conflict",
            actor=principal.audit_name,
            outcome="warning" if policy == "keep-first" else "failure",
            study_uid=header.study_uid,
            detail={"sop_instance_uid": header.sop_uid, "policy": policy},
        )
    reason = "SOP Instance UID already stored with different content"
    if policy == "reject":
        return IngestResult("rejected", 0x0111, header.sop_uid, header.study_uid, reason)
    # Warning "Elements Discarded" (PS3.4 B.2.3): the new content was not kept.
    return IngestResult(
        "duplicate-conflict", 0xB006, header.sop_uid, header.study_uid, reason + "; first kept"
    )


def _insert_ignore(session: Session, model: Any, values: dict[str, Any], conflict: Sequence[str]) -> None:
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    else:  # pragma: no cover - other databases are not supported
        stmt = insert(model).values(**values)
    session.execute(stmt)


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


def _index(
    session: Session,
    header: Header,
    json_model: dict[str, Any],
    stored: StoredBlob,
    *,
    store_name: str,
    principal: Principal,
    source: str,
) -> str | None:
    """Upsert the hierarchy and insert the instance; return the key of a replaced blob, if any."""
    now = utcnow()
    patient_values = _patient_values(header)
    _insert_ignore(
        session,
        Patient,
        {**patient_values, "meta": {}, "created_at": now, "updated_at": now},
        ["patient_id", "issuer"],
    )
    patient_pk = session.scalar(
        select(Patient.id).where(
            Patient.patient_id == patient_values["patient_id"], Patient.issuer == patient_values["issuer"]
        )
    )
    referring = header.text("ReferringPhysicianName")
    _insert_ignore(
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
            actor=principal.audit_name,
            outcome="warning",
            study_uid=header.study_uid,
            detail={"sop_instance_uid": header.sop_uid},
        )
    _insert_ignore(
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

    replaced_key: str | None = None
    old = session.execute(
        select(Instance.id, Blob.key).join(Blob).where(Instance.sop_uid == header.sop_uid)
    ).first()
    if old is not None:
        # Only reached under the 'replace' duplicate policy.
        replaced_key = old[1]
        session.execute(
            update(Blob)
            .where(Blob.instance_pk == old[0])
            .values(
                key=stored.key,
                size=stored.size,
                sha256=stored.sha256,
                transfer_syntax_uid=header.transfer_syntax_uid,
                created_at=now,
            )
        )
        session.execute(
            update(Instance)
            .where(Instance.id == old[0])
            .values(meta=json_model, transfer_syntax_uid=header.transfer_syntax_uid, source=source)
        )
    else:
        instance_pk = session.scalar(
            insert(Instance)
            .values(
                series_pk=series_pk,
                sop_uid=header.sop_uid,
                sop_class_uid=header.sop_class_uid,
                instance_number=header.integer("InstanceNumber"),
                transfer_syntax_uid=header.transfer_syntax_uid,
                num_frames=header.integer("NumberOfFrames"),
                rows=header.integer("Rows"),
                columns=header.integer("Columns"),
                meta=json_model,
                source=source[:128],
                created_at=now,
            )
            .returning(Instance.id)
        )
        session.execute(
            insert(Blob).values(
                instance_pk=instance_pk,
                store=store_name,
                key=stored.key,
                size=stored.size,
                sha256=stored.sha256,
                transfer_syntax_uid=header.transfer_syntax_uid,
                created_at=now,
            )
        )
        _bump_counts(session, patient_pk=patient_pk, study_pk=study_pk, series_pk=series_pk, header=header)
    session.execute(
        update(Patient)
        .where(Patient.id == patient_pk)
        .values(meta=_patient_module(json_model), updated_at=now)
    )
    audit.record(
        session,
        action="instance.store",
        actor=principal.audit_name,
        outcome="success",
        study_uid=header.study_uid,
        detail={"sop_instance_uid": header.sop_uid, "source": source, "replaced": replaced_key is not None},
    )
    return replaced_key


_PATIENT_TAGS = {
    "00100010",
    "00100020",
    "00100021",
    "00100024",
    "00100030",
    "00100032",
    "00100040",
    "00101000",
    "00101001",
    "00101002",
    "00101010",
    "00101020",
    "00101030",
    "00102160",
    "00104000",
}


def _patient_module(json_model: dict[str, Any]) -> dict[str, Any]:
    return {tag: value for tag, value in json_model.items() if tag in _PATIENT_TAGS or tag == "00080005"}


def _bump_counts(
    session: Session, *, patient_pk: int | None, study_pk: int, series_pk: int | None, header: Header
) -> None:
    """Maintain the denormalised counts and study-level modality / SOP class lists."""
    new_series = session.scalar(select(Series.num_instances).where(Series.id == series_pk)) == 0
    session.execute(
        update(Series).where(Series.id == series_pk).values(num_instances=Series.num_instances + 1)
    )
    study = session.execute(
        select(Study.num_instances, Study.modalities, Study.sop_classes).where(Study.id == study_pk)
    ).one()
    new_study = study.num_instances == 0
    modalities = set(filter(None, study.modalities.split("\\")))
    modality = header.text("Modality")
    if modality:
        modalities.add(modality)
    sop_classes = set(filter(None, study.sop_classes.split("\\")))
    sop_classes.add(header.sop_class_uid)
    session.execute(
        update(Study)
        .where(Study.id == study_pk)
        .values(
            num_instances=Study.num_instances + 1,
            num_series=Study.num_series + (1 if new_series else 0),
            modalities="\\".join(sorted(modalities))[:256],
            sop_classes="\\".join(sorted(sop_classes))[:2048],
            updated_at=utcnow(),
        )
    )
    session.execute(
        update(Patient)
        .where(Patient.id == patient_pk)
        .values(
            num_instances=Patient.num_instances + 1,
            num_series=Patient.num_series + (1 if new_series else 0),
            num_studies=Patient.num_studies + (1 if new_study else 0),
        )
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
        )
        .join(Blob, Blob.instance_pk == Instance.id)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
    )
    return visible_studies(principal, query)


def iter_instances(session: Session, query: Select) -> Iterator[StoredInstance]:
    """Materialise rows of :func:`instances_query` (ordered for stable sends)."""
    for row in session.execute(
        query.order_by(Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ):
        yield StoredInstance(*row)


def is_indexed(session: Session, key: str) -> bool:
    """Whether a blob key is referenced by the index."""
    return session.scalar(select(Blob.id).where(Blob.key == key)) is not None


def open_blob(ctx: AppContext, key: str) -> Any:
    """A readable stream of an indexed blob (its staged copy while it is being published)."""
    staged = Staging(ctx.store).open_staged(key)
    if staged is not None:
        return staged
    return ctx.store.open(key)


def recover_staged(ctx: AppContext, *, older_than: float = 0.0) -> tuple[int, int]:
    """Finish or undo ingests interrupted by a crash (see :mod:`simral.storage.staging`)."""

    def indexed(key: str) -> bool:
        with ctx.db.reading() as session:
            return is_indexed(session, key)

    return Staging(ctx.store).recover(indexed, older_than=older_than)


def get_instance(session: Session, *, principal: Principal, sop_uid: str) -> StoredInstance | None:
    """One stored instance by SOP Instance UID, if visible."""
    row = session.execute(instances_query(principal).where(Instance.sop_uid == sop_uid)).first()
    return StoredInstance(*row) if row else None
