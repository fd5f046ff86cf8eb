"""Compression at rest by rule: choose native instances by age, modality and organisation, and
re-encode each losslessly in a durable job (DESIGN.md §5), verified before the original goes.

Per instance (:func:`compress_instance`, idempotent): the stored file is re-encoded in the rule's
syntax, decoded again and compared pixel for pixel with the original
(:func:`simral.dicom.compression.compress_file`); only then is the new file staged durably, the
instance's blob row switched (key, SHA-256, size, transfer syntax) with an ``updated`` change in
one transaction, and the old blob deleted after the commit. Instances without pixel data, already
encapsulated, flagged lossy, or that the encoder or the verification refuses are left as stored,
with the reason (:class:`~simral.compression.models.CompressionOutcome`). Retrieves keep working
unchanged: WADO-RS ``transfer-syntax=*`` sends the compressed bytes, other requests and DIMSE peers
that did not accept the syntax get them decoded (:mod:`simral.dicom.transcode`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import String, delete, exists, func, literal, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.archive import service as archive
from simral.archive.models import Blob, Instance, Series, Study, StudyOrganisation
from simral.audit import service as audit
from simral.compression.models import COMPRESSED, SKIPPED, CompressionOutcome, CompressionRule
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dicom.compression import (
    LOSSLESS_SYNTAXES,
    NotCompressible,
    available_syntaxes,
    compress_file,
    syntax_available,
)
from simral.dicom.header import RejectedInstance, read_header
from simral.identity.service import get_organisation
from simral.jobs import service as jobs
from simral.jobs.models import ACTIVE_STATES, DEAD, Job
from simral.jobs.runner import JobRunner, Outcomes
from simral.jobs.service import ClaimedJob
from simral.storage.base import StoredBlob, sha256_of_file
from simral.storage.staging import Staging

log = logging.getLogger(__name__)

#: Job kind of one instance's compression.
COMPRESS = "archive.compress"
#: Jobs of one pass share this group, so a runner claims them in batches.
GROUP = "compression"
DEDUPE_PREFIX = "compress:"
MAX_ATTEMPTS = 5
#: The platform compressing instances (reads every study it compresses; audited per batch).
COMPRESSOR = Principal(kind="system", name="compression", archive_wide=True, via="job")
#: Stored syntaxes a rule considers (the rest is encapsulated already, or retired big endian).
NATIVE_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


class CompressionError(ValueError):
    """A rule that cannot be created or removed as asked."""


# -- rules ---------------------------------------------------------------------------------------


def _modalities(values: list[str] | tuple[str, ...] | str) -> list[str]:
    items = values.replace("\\", ",").split(",") if isinstance(values, str) else values
    return sorted({item.strip().upper() for item in items if item.strip()})


def create_rule(
    session: Session,
    *,
    syntax: str,
    principal: Principal,
    older_than_days: int | None = None,
    modalities: list[str] | tuple[str, ...] | str = (),
    organisation: str = "",
) -> CompressionRule:
    """Add a rule (audited); ``syntax`` is ``jpeg-ls`` or ``j2k`` (``htj2k`` once an encoder exists)."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage compression rules")
    available = available_syntaxes()
    if syntax not in LOSSLESS_SYNTAXES:
        raise CompressionError(f"unknown syntax {syntax!r} (one of {', '.join(LOSSLESS_SYNTAXES)})")
    if syntax not in available:
        raise CompressionError(
            f"no encoder for {LOSSLESS_SYNTAXES[syntax].name} on this installation "
            f"(available: {', '.join(available) or 'none'})"
        )
    if older_than_days is not None and older_than_days < 0:
        raise CompressionError("--older-than-days must be 0 or more")
    organisation = organisation.strip()
    if organisation and get_organisation(session, organisation) is None:
        raise CompressionError(f"no organisation with code {organisation!r}")
    codes = _modalities(modalities)
    if any(len(code) > 16 for code in codes):
        raise CompressionError("a modality code has at most 16 characters (PS3.5 CS)")
    rule = CompressionRule(
        syntax=syntax,
        older_than_days=older_than_days,
        modalities="\\".join(codes)[:128],
        organisation_code=organisation,
        enabled=True,
        created_by=principal.audit_name[:128],
        created_at=utcnow(),
    )
    session.add(rule)
    session.flush()
    audit.record(
        session,
        action="compression.rule-add",
        principal=principal,
        detail={
            "rule": rule.id,
            "syntax": syntax,
            "older_than_days": older_than_days,
            "modalities": codes,
            "organisation": organisation,
        },
    )
    return rule


def list_rules(session: Session) -> list[CompressionRule]:
    """Every rule, in the order they apply (the first created wins)."""
    return list(session.scalars(select(CompressionRule).order_by(CompressionRule.id)))


def delete_rule(session: Session, rule_id: int, *, principal: Principal) -> None:
    """Remove a rule (audited); instances already compressed stay so, queued jobs still run."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage compression rules")
    rule = session.get(CompressionRule, rule_id)
    if rule is None:
        raise CompressionError(f"no compression rule {rule_id}")
    session.delete(rule)
    audit.record(session, action="compression.rule-remove", principal=principal, detail={"rule": rule_id})


# -- choosing instances ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A stored native instance a rule wants compressed."""

    sop_uid: str
    sha256: str
    syntax_uid: str
    rule_id: int


def _rule_query(rule: CompressionRule, *, now: datetime) -> Any:
    """The visible native instances matching ``rule`` not tried on their current bytes, not queued."""
    tried = exists().where(
        CompressionOutcome.sop_uid == Instance.sop_uid, CompressionOutcome.source_sha256 == Blob.sha256
    )
    queued = exists().where(
        Job.dedupe_key == literal(DEDUPE_PREFIX, String) + Instance.sop_uid,
        Job.state.in_((*ACTIVE_STATES, DEAD)),
    )
    query = (
        archive.instances_query(COMPRESSOR)
        .where(
            Blob.transfer_syntax_uid.in_(NATIVE_SYNTAXES),
            Instance.rows.is_not(None),
            ~tried,
            ~queued,
        )
        .order_by(Instance.id)
    )
    if rule.older_than_days is not None:
        query = query.where(Instance.created_at <= now - timedelta(days=rule.older_than_days))
    if rule.modalities:
        query = query.where(Series.modality.in_(rule.modalities.split("\\")))
    if rule.organisation_code:
        query = query.where(
            exists().where(
                StudyOrganisation.study_pk == Study.id,
                StudyOrganisation.organisation_code == rule.organisation_code,
            )
        )
    return query


def due(session: Session, *, limit: int, now: datetime | None = None) -> list[Candidate]:
    """Up to ``limit`` instances to compress now, each with the syntax of the first rule matching it."""
    now = now or utcnow()
    found: dict[str, Candidate] = {}
    for rule in list_rules(session):
        if not rule.enabled or len(found) >= limit:
            continue
        target = str(LOSSLESS_SYNTAXES.get(rule.syntax, ""))
        if not target:
            continue
        for row in session.execute(_rule_query(rule, now=now).limit(limit)):
            if row.sop_uid not in found and len(found) < limit:
                found[row.sop_uid] = Candidate(row.sop_uid, row.sha256, target, rule.id)
    return list(found.values())


def active_jobs(session: Session) -> int:
    """Compression jobs queued or running."""
    return int(
        session.scalar(
            select(func.count()).select_from(Job).where(Job.kind == COMPRESS, Job.state.in_(ACTIVE_STATES))
        )
        or 0
    )


def enqueue_due(session: Session, *, limit: int, now: datetime | None = None) -> list[int]:
    """Queue one job per due instance (at most ``limit``) in the caller's transaction; the job ids."""
    ids: list[int] = []
    for candidate in due(session, limit=limit, now=now):
        job = jobs.enqueue(
            session,
            kind=COMPRESS,
            payload={
                "sop_uid": candidate.sop_uid,
                "sha256": candidate.sha256,
                "syntax": candidate.syntax_uid,
                "rule": candidate.rule_id,
            },
            group_key=GROUP,
            dedupe_key=DEDUPE_PREFIX + candidate.sop_uid,
            max_attempts=MAX_ATTEMPTS,
        )
        if job is not None:
            ids.append(job)
    return ids


# -- compressing one instance ----------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceResult:
    """What one job did: ``compressed``, ``skipped`` (reason), or ``unchanged`` (nothing to do)."""

    state: str
    study_uid: str = ""
    reason: str = ""
    size_before: int = 0
    size_after: int = 0


def _record_outcome(
    session: Session,
    *,
    sop_uid: str,
    study_uid: str,
    rule_id: int | None,
    state: str,
    reason: str,
    source: archive.StoredInstance,
    target_syntax: str,
    size_after: int | None,
) -> None:
    session.execute(delete(CompressionOutcome).where(CompressionOutcome.sop_uid == sop_uid))
    session.add(
        CompressionOutcome(
            sop_uid=sop_uid,
            study_uid=study_uid,
            rule_id=rule_id,
            state=state,
            reason=reason[:2000],
            source_sha256=source.sha256,
            source_syntax=source.transfer_syntax_uid,
            target_syntax=target_syntax,
            size_before=source.size,
            size_after=size_after,
            at=utcnow(),
        )
    )


def compress_instance(
    ctx: AppContext, *, sop_uid: str, expected_sha256: str, syntax_uid: str, rule_id: int | None = None
) -> InstanceResult:
    """Re-encode one instance losslessly if its bytes are still ``expected_sha256`` (idempotent:
    a retry after the switch finds other bytes and does nothing)."""
    if not syntax_available(syntax_uid):
        # An installation problem, not the instance's: retried, then dead-lettered for an operator.
        raise RuntimeError(f"no encoder installed for transfer syntax {syntax_uid}")
    with ctx.db.reading() as session:
        source = archive.get_instance(session, principal=COMPRESSOR, sop_uid=sop_uid)
    if source is None or source.sha256 != expected_sha256:
        return InstanceResult("unchanged", reason="instance deleted or replaced since the job was queued")
    fd, name = tempfile.mkstemp(prefix=".tmp-compress-", suffix=".dcm", dir=ctx.store.scratch_dir())
    os.close(fd)
    scratch = Path(name)
    try:
        try:
            with archive.local_copy(ctx, source.blob_key) as path:
                compressed = compress_file(path, syntax_uid, scratch)
            header = read_header(compressed.path)
            json_model = header.json_model()
        except (NotCompressible, RejectedInstance) as exc:
            reason = exc.reason
            with ctx.db.unit_of_work() as session:
                _record_outcome(
                    session,
                    sop_uid=sop_uid,
                    study_uid=source.study_uid,
                    rule_id=rule_id,
                    state=SKIPPED,
                    reason=reason,
                    source=source,
                    target_syntax=syntax_uid,
                    size_after=None,
                )
            return InstanceResult(SKIPPED, source.study_uid, reason, source.size)
        sha256, size = sha256_of_file(compressed.path)
        stored = StoredBlob(key=archive.blob_key(header, sha256), size=size, sha256=sha256)
        staging = Staging(ctx.store)
        staging.stage(compressed.path, stored.key, move=True)
        try:
            with ctx.db.unit_of_work() as session:
                old_key = archive.switch_blob(
                    session,
                    sop_uid=sop_uid,
                    expected_sha256=expected_sha256,
                    stored=stored,
                    transfer_syntax_uid=compressed.transfer_syntax_uid,
                    json_model=json_model,
                    store_name=ctx.store.name,
                )
                if old_key is not None:
                    _record_outcome(
                        session,
                        sop_uid=sop_uid,
                        study_uid=source.study_uid,
                        rule_id=rule_id,
                        state=COMPRESSED,
                        reason="",
                        source=source,
                        target_syntax=compressed.transfer_syntax_uid,
                        size_after=size,
                    )
        except BaseException:
            staging.discard(stored.key)
            raise
        if old_key is None:
            staging.discard(stored.key)
            return InstanceResult("unchanged", reason="instance replaced while it was being compressed")
        try:
            staging.publish(stored.key)
        except Exception as exc:
            # Durable in the staging area and indexed: reads use the staged copy and the recovery
            # sweep publishes it when the store is back.
            log.error(
                "publishing a compressed blob to the %s store failed (kept staged): %s", ctx.store.name, exc
            )
        with contextlib.suppress(Exception):
            # Wherever the old bytes were (a colder tier, the replica): nothing references them now.
            archive.delete_blobs(ctx, [old_key])
        return InstanceResult(COMPRESSED, source.study_uid, "", source.size, size)
    finally:
        scratch.unlink(missing_ok=True)


def compress_instances(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`COMPRESS`: each job's instance, then one audit record per study."""
    outcomes: dict[int, str | None] = {}
    by_study: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"compressed": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0, "reasons": []}
    )
    for job in batch:
        payload = job.payload
        try:
            result = compress_instance(
                ctx,
                sop_uid=str(payload["sop_uid"]),
                expected_sha256=str(payload["sha256"]),
                syntax_uid=str(payload["syntax"]),
                rule_id=payload.get("rule"),
            )
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
            continue
        outcomes[job.id] = None
        if result.state == COMPRESSED:
            counts = by_study[result.study_uid]
            counts["compressed"] += 1
            counts["bytes_before"] += result.size_before
            counts["bytes_after"] += result.size_after
        elif result.state == SKIPPED:
            counts = by_study[result.study_uid]
            counts["skipped"] += 1
            counts["reasons"] = sorted({*counts["reasons"], result.reason})[:10]
    if by_study:
        with ctx.db.unit_of_work() as session:
            for study_uid, detail in by_study.items():
                holders = archive.study_holders(session, study_uid)
                audit.record(
                    session,
                    action="instance.compress",
                    principal=COMPRESSOR,
                    study_uid=study_uid,
                    patient_id=holders[0][:64] if holders else "",
                    detail=detail,
                )
    return outcomes


def enqueue_pass(session: Session, *, batch: int) -> list[int]:
    """The background pass: queue the next ``batch`` instances once the previous batch is done, so
    the queue stays short and a rule over a large archive proceeds batch after batch."""
    if active_jobs(session):
        return []
    return enqueue_due(session, limit=batch)


def run(ctx: AppContext, *, limit: int, batch: int = 100, wait: float = 600.0) -> Summary:
    """Compress up to ``limit`` due instances now, in this process (``simral compression run``).

    Jobs are queued batch by batch and run here; jobs another process (a running ``simral serve``)
    claimed are waited for, up to ``wait`` seconds. Returns what was done during the run.
    """
    started = utcnow()
    runner = JobRunner(ctx, {COMPRESS: compress_instances}, batch=16)
    remaining = limit
    while remaining > 0:
        with ctx.db.unit_of_work() as session:
            queued = enqueue_due(session, limit=min(remaining, batch))
        remaining -= len(queued)
        while runner.run_once():
            pass
        if not queued:
            break
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with ctx.db.reading() as session:
            if not active_jobs(session):
                break
        if not runner.run_once():
            time.sleep(0.2)
    with ctx.db.reading() as session:
        return summary(session, since=started)


# -- reporting ---------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Outcomes recorded since a moment: counts, bytes before and after, reasons of skips."""

    compressed: int = 0
    skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Stored bytes before / after, over the instances compressed (1.0 when none)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0


def summary(session: Session, *, since: datetime | None = None) -> Summary:
    """What compression did (since ``since``, else ever)."""
    query = select(
        CompressionOutcome.state,
        CompressionOutcome.reason,
        CompressionOutcome.size_before,
        CompressionOutcome.size_after,
    )
    if since is not None:
        query = query.where(CompressionOutcome.at >= since)
    result = Summary()
    for state, reason, before, after in session.execute(query):
        if state == COMPRESSED:
            result.compressed += 1
            result.bytes_before += before
            result.bytes_after += after or 0
        else:
            result.skipped += 1
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
    return result


def outcomes(session: Session, *, state: str = "", limit: int = 100) -> list[CompressionOutcome]:
    """The latest outcomes, newest first, optionally of one state."""
    query = select(CompressionOutcome).order_by(CompressionOutcome.id.desc()).limit(limit)
    if state:
        query = query.where(CompressionOutcome.state == state)
    return list(session.scalars(query))
