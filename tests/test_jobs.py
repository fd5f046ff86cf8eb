"""Durable jobs and routing rules, at the service level, on SQLite and on PostgreSQL (DESIGN.md §5).

The queue: enqueue in the caller's transaction (rolled back with it), claim under a lease, retry
with backoff, dead-letter after the last try, operator retry/cancel (audited, administrators only),
a dead runner's jobs claimed again when its lease expires, batches by destination, one active job
per dedupe key. Routing: rules match by organisation, calling AE, modality and description; the
router enqueues one job per (instance, destination) from the change feed, exactly once, and only
for what arrived after the rule was made. The migrations describe the same schema as the models.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from tests.corpus import ct_series

from simral.access.policy import AccessDenied, Principal
from simral.archive import service as archive
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.db.registry import Base
from simral.identity import service as identity
from simral.jobs import service as jobs
from simral.jobs.models import Job
from simral.jobs.runner import JobRunner, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.nodes import service as nodes
from simral.sharing import service as sharing

OPERATOR = Principal(kind="system", name="cli:test", archive_wide=True, via="cli")
TECHNOLOGIST = Principal(
    kind="user", name="tech", organisation="CHA", memberships=frozenset({("CHA", "technologist")})
)


def _enqueue(ctx: AppContext, n: int = 1, **kwargs: object) -> list[int]:
    ids = []
    with ctx.db.unit_of_work() as session:
        for i in range(n):
            args = {"kind": "test.echo", "payload": {"n": i}, **kwargs}
            job_id = jobs.enqueue(session, **args)  # type: ignore[arg-type]
            assert job_id is not None
            ids.append(job_id)
    return ids


def _state(ctx: AppContext, job_id: int) -> Job:
    with ctx.db.reading() as session:
        job = jobs.get(session, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_migrations_describe_the_models(ctx: AppContext) -> None:
    with ctx.db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_enqueue_is_part_of_the_callers_transaction(ctx: AppContext) -> None:
    with pytest.raises(RuntimeError), ctx.db.unit_of_work() as session:
        jobs.enqueue(session, kind="test.echo", payload={})
        raise RuntimeError("the change that called for the job failed")
    with ctx.db.reading() as session:
        assert jobs.list_jobs(session) == []


def test_claim_complete_and_lease(ctx: AppContext) -> None:
    (job_id,) = _enqueue(ctx)
    with ctx.db.unit_of_work() as session:
        (claimed,) = jobs.claim(session, worker="w1", lease=timedelta(seconds=30))
    assert claimed.id == job_id and claimed.attempts == 1
    # Claimed and leased: nobody else gets it.
    with ctx.db.unit_of_work() as session:
        assert jobs.claim(session, worker="w2") == []
    # The first runner dies; once its lease has expired the job is claimed again.
    with ctx.db.unit_of_work() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1))
        )
    with ctx.db.unit_of_work() as session:
        (again,) = jobs.claim(session, worker="w2")
    assert again.id == job_id and again.attempts == 2
    with ctx.db.unit_of_work() as session:
        jobs.complete(session, job_id)
    assert _state(ctx, job_id).state == "done"
    with ctx.db.reading() as session:
        assert not jobs.due(session)


def test_backoff_then_dead_letter_then_operator_retry(ctx: AppContext) -> None:
    (job_id,) = _enqueue(ctx, max_attempts=3)
    for attempt in range(1, 4):
        with ctx.db.unit_of_work() as session:
            session.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
            (claimed,) = jobs.claim(session, worker="w")
            assert claimed.attempts == attempt
        with ctx.db.unit_of_work() as session:
            state = jobs.fail(session, job_id, f"peer down ({attempt})")
        job = _state(ctx, job_id)
        if attempt < 3:
            assert state == "queued"
            # Exponential backoff with jitter: 2 s, then 4 s (±20 %).
            delay = (job.run_after.replace(tzinfo=None) - utcnow().replace(tzinfo=None)).total_seconds()
            assert 2**attempt * 0.8 - 1 < delay <= 2**attempt * 1.2
            with ctx.db.unit_of_work() as session:
                assert jobs.claim(session, worker="w") == []  # not due yet
    job = _state(ctx, job_id)
    assert job.state == "dead" and job.last_error == "peer down (3)"
    with pytest.raises(AccessDenied), ctx.db.unit_of_work() as session:
        jobs.retry(session, job_id, principal=TECHNOLOGIST)
    with ctx.db.unit_of_work() as session:
        jobs.retry(session, job_id, principal=OPERATOR)
    job = _state(ctx, job_id)
    assert job.state == "queued" and job.attempts == 0
    with ctx.db.unit_of_work() as session:
        jobs.cancel(session, job_id, principal=OPERATOR)
        with pytest.raises(jobs.JobError):
            jobs.cancel(session, job_id, principal=OPERATOR)
    assert _state(ctx, job_id).state == "cancelled"
    with ctx.db.reading() as session:
        actions = [r.action for r in audit.search(session, organisations=None, action="", limit=10)]
    assert "job.retry" in actions and "job.cancel" in actions


def test_batches_by_group_and_dedupe(ctx: AppContext) -> None:
    a = _enqueue(ctx, 3, group_key="node:A")
    b = _enqueue(ctx, 2, group_key="node:B")
    with ctx.db.unit_of_work() as session:
        assert jobs.enqueue(session, kind="k", payload={}, dedupe_key="x:1") is not None
        assert jobs.enqueue(session, kind="k", payload={}, dedupe_key="x:1") is None
    with ctx.db.unit_of_work() as session:
        first = jobs.claim(session, worker="w", batch=10, kinds=("test.echo",))
    assert [j.id for j in first] == a
    with ctx.db.unit_of_work() as session:
        second = jobs.claim(session, worker="w", batch=10, kinds=("test.echo",))
    assert [j.id for j in second] == b


def test_runner_outcomes(ctx: AppContext) -> None:
    ids = _enqueue(ctx, 3, group_key="g")
    calls: list[list[int]] = []

    def handler(_ctx: AppContext, batch: list[ClaimedJob]) -> dict[int, str | PermanentFailure | None]:
        calls.append([job.id for job in batch])
        return {ids[0]: None, ids[1]: "busy", ids[2]: PermanentFailure("gone")}

    runner = JobRunner(ctx, {"test.echo": handler})
    assert runner.run_once() is True
    assert runner.run_once() is False  # the retried one is not due yet
    assert calls == [ids]
    assert [_state(ctx, i).state for i in ids] == ["done", "queued", "dead"]
    assert _state(ctx, ids[1]).last_error == "busy"


def _import(ctx: AppContext, folder: Path, *, organisation: str, source: str, **series: object) -> list[str]:
    files = ct_series(folder, slices=2, rows=16, cols=16, **series)  # type: ignore[arg-type]
    principal = Principal(kind="dicom-node", name=source, organisation=organisation)
    results = [archive.ingest_file(ctx, f, principal=principal, source=source) for f in files]
    assert all(r.status == 0 for r in results)
    return [r.sop_uid for r in results]


def test_router_enqueues_matching_instances_once(ctx: AppContext, tmp_path: Path) -> None:
    with ctx.db.unit_of_work() as session:
        for code in ("CHA", "CLINB"):
            identity.create_organisation(session, code=code, name=code, principal=OPERATOR)
        nodes.create(session, name="pacs", ae_title="PACS", host="127.0.0.1", port=104, archive_wide=True,
                     principal=OPERATOR)  # fmt: skip
        nodes.create_dicomweb_peer(
            session, name="chu", url="http://127.0.0.1:1/dicom-web", principal=OPERATOR
        )
    before = _import(ctx, tmp_path / "old", organisation="CHA", source="CT1", patient_id="OLD", seed=1)
    with ctx.db.unit_of_work() as session:
        sharing.create_rule(session, name="ct-to-pacs", destination_node="pacs", source_organisation="CHA",
                            modality="CT", principal=OPERATOR)  # fmt: skip
        sharing.create_rule(session, name="thorax-to-chu", destination_dicomweb="chu", source="CT1",
                            study_description="*thorax*", principal=OPERATOR)  # fmt: skip
        with pytest.raises(sharing.RoutingError):
            sharing.create_rule(session, name="bad", destination_node="nowhere", principal=OPERATOR)
    a = _import(ctx, tmp_path / "a", organisation="CHA", source="CT1", patient_id="PA", seed=2)
    b = _import(ctx, tmp_path / "b", organisation="CLINB", source="CT1", patient_id="PB", seed=3)
    c = _import(ctx, tmp_path / "c", organisation="CHA", source="CT2", patient_id="PC", seed=4)
    with ctx.db.reading() as session:
        assert sharing.routing_due(session)
    with ctx.db.unit_of_work() as session:
        enqueued = sharing.route_changes(session)
    with ctx.db.unit_of_work() as session:
        assert sharing.route_changes(session) == 0  # the cursor moved: nothing twice
    with ctx.db.reading() as session:
        assert not sharing.routing_due(session)
        rows = session.execute(select(Job.kind, Job.payload)).all()
    routed = {(kind, payload["destination"], payload["sop_uid"]) for kind, payload in rows}
    # CHA's CT (a, c) go to the PACS; everything CT1 sent (a, b) with a thorax description to the CHU;
    # what was stored before the rules (``before``) goes nowhere.
    expected = {("forward.dimse", "pacs", uid) for uid in a + c} | {
        ("forward.stow", "chu", uid) for uid in a + b
    }
    assert routed == expected and enqueued == len(expected)
    assert not {uid for _, _, uid in routed} & set(before)
