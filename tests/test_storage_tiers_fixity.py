"""Storage tiers, replication and fixity (simral.preservation), in-process.

One AppContext for the module: the default ``hot`` store on the filesystem, a ``cold`` tier and a
``replica`` store on SeaweedFS S3 (one bucket each, on the session's weed server), configured
through ``[stores.NAME]`` tables. Jobs run with the real job runner and handlers.

Shown: a blob corrupted on purpose (and one deleted) is detected by the sweep, alarmed (alarm row,
audit event, admin alert) and repaired from the replica, bytes identical again; one whose replica
is bad too stays alarmed as unrepaired. A study moved to S3 while a thread keeps reading its blobs:
every read succeeds with identical bytes, the source is then gone and reads come from S3. A move
whose copy arrives altered is refused by the read-back checksum; the only test double is
:class:`FlipOnWrite`, standing for a faulty network path to the cold store.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select, update
from tests.corpus import ct_series
from tests.peers import SeaweedS3
from typer.testing import CliRunner

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive import service as archive_service
from simral.archive.consistency import check
from simral.archive.models import Blob, Instance
from simral.archive.service import blob_exists, ingest_file, local_copy, open_blob
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.identity.models import AdminAlert
from simral.jobs.models import Job
from simral.jobs.runner import JobRunner
from simral.preservation import fixity, replication, tiers
from simral.preservation.background import HANDLERS
from simral.preservation.models import BlobReplica, FixityAlarm
from simral.storage.base import BlobStore, StoredBlob
from simral.storage.factory import StoreConfigError, open_stores

_buckets = itertools.count()


def _config(root: Path, s3: SeaweedS3, *, suffix: str) -> Path:
    def s3_table(name: str) -> str:
        return (
            f'[stores.{name}]\nkind = "s3"\nendpoint_url = "{s3.endpoint_url}"\n'
            f'bucket = "simral-{name}-{suffix}"\naccess_key = "{s3.access_key}"\n'
            f'secret_key = "{s3.secret_key}"\nregion = "{s3.region}"\n'
        )

    path = root / "simral.toml"
    path.write_text(
        f'data_dir = "{root / "data"}"\nreplica_store = "replica"\ntier_purge_delay_seconds = 0\n'
        + s3_table("cold")
        + s3_table("replica")
    )
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedS3) -> Path:
    return _config(tmp_path_factory.mktemp("tiers"), seaweed, suffix=f"t{next(_buckets)}")


@pytest.fixture(scope="module")
def ctx(config: Path) -> Iterator[AppContext]:
    app = open_app(load_settings(config, environ={}))
    yield app
    app.db.dispose()


@pytest.fixture(scope="module")
def files(ctx: AppContext, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SOP Instance UID → original file, for every instance ingested (pydicom's test files and two
    synthetic CT studies)."""
    work = tmp_path_factory.mktemp("corpus")
    paths = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]
    paths += ct_series(work / "moved", slices=6, rows=64, cols=64, patient_id="TIER1", seed=91)
    paths += ct_series(work / "flip", slices=2, rows=32, cols=32, patient_id="TIER2", seed=92)
    by_sop: dict[str, Path] = {}
    for path in paths:
        result = ingest_file(ctx, path, principal=SYSTEM, source="test")
        assert result.outcome == "stored", result.reason
        by_sop[result.sop_uid] = path
    return by_sop


def _run_jobs(ctx: AppContext) -> int:
    """Run every due job of the preservation handlers; how many batches ran."""
    runner = JobRunner(ctx, HANDLERS)
    batches = 0
    while runner.run_once():
        batches += 1
    return batches


def _blob(ctx: AppContext, sop_uid: str) -> Blob:
    with ctx.db.reading() as session:
        blob = session.scalar(select(Blob).join(Instance).where(Instance.sop_uid == sop_uid))
        assert blob is not None
        session.expunge(blob)
        return blob


def _read(ctx: AppContext, key: str) -> bytes:
    with open_blob(ctx, key) as stream:
        return bytes(stream.read())


def _study_sops(files: dict[str, Path], folder: str) -> list[str]:
    return sorted(sop for sop, path in files.items() if path.parent.name == folder)


def test_replication_then_fixity_detects_and_repairs(ctx: AppContext, files: dict[str, Path]) -> None:
    with ctx.db.unit_of_work() as session:
        assert replication.follow_changes(session) == len(files)
    _run_jobs(ctx)
    replica = ctx.store_named("replica")
    with ctx.db.reading() as session:
        assert replication.replica_counts(session, "replica").behind == 0
        copies = {row.blob_pk: row for row in session.scalars(select(BlobReplica))}
    for sop, path in files.items():
        blob = _blob(ctx, sop)
        assert copies[blob.id].sha256 == blob.sha256
        with replica.open(blob.key) as stream:
            assert stream.read() == path.read_bytes()

    ct, mr, plan = (
        next(s for s, p in files.items() if p.name == n)
        for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
    )
    corrupted, deleted, hopeless = _blob(ctx, ct), _blob(ctx, mr), _blob(ctx, plan)
    hot_path = ctx.store.local_path(corrupted.key)
    assert hot_path is not None
    damaged = bytearray(hot_path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit, same size
    hot_path.write_bytes(bytes(damaged))
    deleted_path = ctx.store.local_path(deleted.key)
    assert deleted_path is not None
    deleted_path.unlink()
    # The third one is altered both here and in the replica: nothing intact is left.
    hopeless_path = ctx.store.local_path(hopeless.key)
    assert hopeless_path is not None
    hopeless_path.write_bytes(hopeless_path.read_bytes()[:-10])
    replica.put_stream(hopeless.key, io.BytesIO(b"not the plan"))

    report = fixity.sweep(ctx, limit=100)
    assert report.checked == len(files)
    assert report.intact == len(files) - 3
    # The replica copies are verified too: the hopeless one's copy cannot be made again either.
    assert (report.replicas_checked, report.replicas_intact) == (len(files), len(files) - 1)
    outcomes = {(a.blob_id, a.store, a.problem, a.outcome) for a in report.alarms}
    assert outcomes == {
        (corrupted.id, "hot", "mismatch", "repaired"),
        (deleted.id, "hot", "missing", "repaired"),
        (hopeless.id, "hot", "mismatch", "unrepaired"),
        (hopeless.id, "replica", "mismatch", "unrepaired"),
    }
    assert hot_path.read_bytes() == files[ct].read_bytes()
    assert deleted_path.read_bytes() == files[mr].read_bytes()
    assert hashlib.sha256(_read(ctx, corrupted.key)).hexdigest() == corrupted.sha256
    assert _blob(ctx, ct).verified_at is not None
    assert _blob(ctx, plan).verified_at is None
    with ctx.db.reading() as session:
        counts = fixity.fixity_counts(session)
        assert (counts.alarms, counts.repaired, counts.unrepaired) == (4, 2, 2)
        assert counts.verified == len(files) - 1
        alarm = session.scalar(select(FixityAlarm).where(FixityAlarm.blob_pk == corrupted.id))
        assert alarm is not None and alarm.found_sha256 not in ("", corrupted.sha256)
        alerts = list(session.scalars(select(AdminAlert).where(AdminAlert.kind == "fixity")))
        # The hopeless blob alerts the platform and the study's organisation; its copy, the platform.
        assert sum("restauré depuis la réplique" in a.message for a in alerts) == 2
        assert (
            sum("copie de secours" in a.message and "pas pu être refaite" in a.message for a in alerts) == 1
        )
        audited = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "storage.fixity")))
        assert sorted(e.outcome for e in audited) == ["failure", "failure", "warning", "warning"]
    # The unrepaired blob waits for the next interval instead of alarming at every look; the
    # background sweep takes blobs last verified (or written) more than an interval ago.
    two_days_ago = utcnow() - timedelta(days=2)
    with ctx.db.unit_of_work() as session:
        session.execute(update(Blob).where(Blob.id == hopeless.id).values(created_at=two_days_ago))
        session.execute(update(Blob).where(Blob.id == corrupted.id).values(verified_at=two_days_ago))
    with ctx.db.reading() as session:
        due = fixity.due_blobs(session, cutoff=utcnow() - timedelta(days=1), limit=100)
        assert [b.id for b in due] == [corrupted.id]
        assert fixity.fixity_due(session, interval=timedelta(days=1))
        assert not fixity.fixity_due(session, interval=timedelta(days=3))

    # Restore it from the original file (an operator's backup) so the other tests start clean.
    hopeless_path.write_bytes(files[plan].read_bytes())
    replica.put_stream(hopeless.key, io.BytesIO(files[plan].read_bytes()))
    with ctx.db.unit_of_work() as session:
        assert replication.enqueue_missing(session, replica_store="replica") == 1  # its forgotten copy
    _run_jobs(ctx)


def test_fixity_remakes_a_bad_replica_copy_from_the_blob(ctx: AppContext, files: dict[str, Path]) -> None:
    """A copy in the replica store altered (or lost) at rest is found by the sweep and made again
    from the intact blob, verified; the alarm names the replica store and tells the platform only."""
    with ctx.db.unit_of_work() as session:
        replication.follow_changes(session)
    _run_jobs(ctx)
    ct = next(s for s, p in files.items() if p.name == "CT_small.dcm")
    blob = _blob(ctx, ct)
    replica = ctx.store_named("replica")
    altered = bytearray(files[ct].read_bytes())
    altered[-1] ^= 0x01  # one flipped bit, same size
    replica.put_stream(blob.key, io.BytesIO(bytes(altered)))
    report = fixity.sweep(ctx, limit=1000)
    replica_alarms = [a for a in report.alarms if a.store == "replica"]
    assert [(a.blob_id, a.problem, a.outcome) for a in replica_alarms] == [(blob.id, "mismatch", "repaired")]
    with replica.open(blob.key) as stream:
        assert stream.read() == files[ct].read_bytes()
    with ctx.db.reading() as session:
        copy = replication.current_copy(session, blob.id, "replica", blob.sha256)
        assert copy is not None and copy.verified_at is not None
        alert = session.scalars(
            select(AdminAlert).where(AdminAlert.kind == "fixity").order_by(AdminAlert.id.desc())
        ).first()
        assert alert is not None and alert.organisation_code == ""
        assert "refaite depuis le fichier principal" in alert.message
        # Verified copies wait for the next interval.
        assert (
            fixity.due_replica_copies(
                session, replica_store="replica", cutoff=utcnow() - timedelta(hours=1), limit=10
            )
            == []
        )

    assert check(ctx).clean


class FlipOnWrite:
    """Test double of a faulty network path to a store: the writer hashes what it sends, the store
    keeps it with one byte flipped (corruption the sender's checksum did not see)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.name = inner.name

    def put_stream(self, key: str, stream: BinaryIO) -> StoredBlob:
        data = stream.read()
        sent = StoredBlob(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        altered = bytearray(data)
        altered[len(altered) // 3] ^= 0xFF
        self.inner.put_stream(key, io.BytesIO(bytes(altered)))
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_move_refused_when_the_copy_is_altered(ctx: AppContext, files: dict[str, Path]) -> None:
    sops = _study_sops(files, "flip")
    study_uid = _study_uid(ctx, sops[0])
    cold = ctx.stores["cold"]
    ctx.stores["cold"] = FlipOnWrite(cold)  # type: ignore[assignment]
    try:
        with ctx.db.unit_of_work() as session:
            blobs, jobs = tiers.enqueue_move(
                session, study_uid=study_uid, blob_ids=tiers.study_blob_ids(session, study_uid), target="cold"
            )
        assert (blobs, jobs) == (2, 1)
        assert _run_jobs(ctx) == 1
    finally:
        ctx.stores["cold"] = cold
    with ctx.db.reading() as session:
        job = session.scalar(select(Job).where(Job.kind == tiers.TIER_MOVE).order_by(Job.id.desc()))
        assert job is not None and job.state == "queued" and job.attempts == 1
        assert "does not match its SHA-256" in job.last_error
        refused = session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "storage.tier-move", AuditEvent.study_uid == study_uid
            )
        )
        assert refused is not None and refused.outcome == "failure" and refused.detail["refused"] == 2
    for sop in sops:
        blob = _blob(ctx, sop)
        assert (blob.store, blob.tier) == ("hot", "hot")
        assert not cold.exists(blob.key)  # the bad copy was deleted
        assert _read(ctx, blob.key) == files[sop].read_bytes()

    # Through a sound path the retried job moves them.
    with ctx.db.unit_of_work() as session:
        session.execute(update(Job).where(Job.id == job.id).values(run_after=utcnow()))
    _run_jobs(ctx)
    for sop in sops:
        blob = _blob(ctx, sop)
        assert (blob.store, blob.tier) == ("cold", "cold")
        assert _read(ctx, blob.key) == files[sop].read_bytes()
        assert not ctx.store.exists(blob.key)


def _study_uid(ctx: AppContext, sop_uid: str) -> str:
    from simral.archive.models import Series, Study

    with ctx.db.reading() as session:
        found = session.scalar(
            select(Study.study_uid)
            .join(Series, Series.study_pk == Study.id)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Instance.sop_uid == sop_uid)
        )
    assert found is not None
    return found


def test_tier_move_keeps_blobs_readable(
    ctx: AppContext, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sops = _study_sops(files, "moved")
    keys = {sop: _blob(ctx, sop).key for sop in sops}
    expected = {keys[sop]: files[sop].read_bytes() for sop in sops}
    with ctx.db.unit_of_work() as session:
        tiers.add_rule(
            session,
            target_store="cold",
            older_than_days=30,
            known_stores=ctx.stores,
            replica_store="replica",
            principal=SYSTEM,
        )
        assert tiers.plan_moves(session, known_stores=ctx.stores, replica_store="replica").blobs == 0
        with pytest.raises(tiers.TierError, match="replica store"):
            tiers.add_rule(
                session,
                target_store="replica",
                older_than_days=1,
                known_stores=ctx.stores,
                replica_store="replica",
                principal=SYSTEM,
            )
        tiers.add_rule(
            session,
            target_store="cold",
            older_than_days=0,
            modality="CT",
            known_stores=ctx.stores,
            replica_store="replica",
            principal=SYSTEM,
        )

    reads = 0
    errors: list[str] = []
    started, stop = threading.Event(), threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            for key, data in expected.items():
                try:
                    if _read(ctx, key) != data:
                        errors.append(f"{key}: other bytes")
                except Exception as exc:
                    errors.append(f"{key}: {type(exc).__name__}: {exc}")
                reads += 1
            started.set()

    thread = threading.Thread(target=reader, name="test-reader")
    thread.start()
    try:
        assert started.wait(10)
        before = reads
        with ctx.db.unit_of_work() as session:
            plan = tiers.plan_moves(session, known_stores=ctx.stores, replica_store="replica")
        assert (
            plan.blobs == 7 and plan.jobs == 2
        )  # the moved study and CT_small (the flip study is already cold)
        assert _run_jobs(ctx) == 4  # two moves, two purges (purge delay 0 here)
        during = reads - before
        after_purge = reads
        deadline = time.monotonic() + 10
        while reads < after_purge + 3 * len(expected) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
    assert errors == []
    assert during > 0 and reads >= after_purge + 3 * len(expected)

    for sop in sops:
        blob = _blob(ctx, sop)
        assert (blob.store, blob.tier) == ("cold", "cold")
        assert not ctx.store.exists(blob.key)  # the source is gone
        assert ctx.stores["cold"].exists(blob.key) and blob_exists(ctx, blob.key)
        assert _read(ctx, blob.key) == expected[blob.key]
        with local_copy(ctx, blob.key) as path:  # a scratch copy fetched from S3
            assert path.read_bytes() == expected[blob.key]
    # A reader that looked the location up just before the switch, and opens it after the purge:
    # the old location is gone, open_blob looks again and reads from S3. (The timing is frozen by
    # answering the first lookup with the location the blob had before the move.)
    key = keys[sops[0]]
    stale = {key}

    def looked_up_before_the_switch(app: AppContext, wanted: str) -> BlobStore:
        if wanted in stale:
            stale.discard(wanted)
            return app.store
        return locate(app, wanted)

    locate = archive_service.blob_store
    monkeypatch.setattr(archive_service, "blob_store", looked_up_before_the_switch)
    assert _read(ctx, key) == expected[key] and not stale
    monkeypatch.undo()

    with ctx.db.reading() as session:
        stores = {(s, t): n for s, t, n, _ in tiers.store_counts(session)}
        assert stores[("cold", "cold")] == 9 and stores[("hot", "hot")] == len(files) - 9
    # The fixity sweep reads them from S3, and `simral check` knows where each blob is.
    report = fixity.sweep(ctx, limit=100)
    assert report.intact == report.checked == len(files) and not report.alarms
    assert check(ctx).clean


def test_replacing_a_moved_instance(ctx: AppContext, files: dict[str, Path], tmp_path: Path) -> None:
    """New bytes for an instance now in the cold tier land in hot; the cold copy is dropped and the
    replica follows (new copy verified, old one deleted)."""
    sop = _study_sops(files, "moved")[0]
    old = _blob(ctx, sop)
    assert old.store == "cold"
    dataset = dcmread(files[sop])
    dataset.SeriesDescription = "AX 1.0 STANDARD (corrected)"
    corrected = tmp_path / "corrected.dcm"
    dataset.save_as(corrected, enforce_file_format=True)
    ctx.settings.duplicate_policy = "replace"
    try:
        assert ingest_file(ctx, corrected, principal=SYSTEM, source="test").outcome == "replaced"
    finally:
        ctx.settings.duplicate_policy = "keep-first"
    new = _blob(ctx, sop)
    assert (new.store, new.tier, new.verified_at) == ("hot", "hot", None) and new.key != old.key
    assert not ctx.stores["cold"].exists(old.key)
    assert _read(ctx, new.key) == corrected.read_bytes()
    with ctx.db.unit_of_work() as session:
        assert replication.follow_changes(session) == 1
    _run_jobs(ctx)
    replica = ctx.store_named("replica")
    with ctx.db.reading() as session:
        copy = replication.current_copy(session, new.id, "replica", new.sha256)
        assert copy is not None and copy.key == new.key
        assert replication.replica_counts(session, "replica").behind == 0
    assert not replica.exists(old.key)
    with replica.open(new.key) as stream:
        assert stream.read() == corrected.read_bytes()
    assert check(ctx).clean


def test_store_settings_and_cli(ctx: AppContext, config: Path, tmp_path: Path) -> None:
    settings = load_settings(config, environ={})
    assert settings.stores["cold"]["kind"] == "s3" and settings.replica_store == "replica"
    from_env = load_settings(
        environ={"SIMRAL_STORES": '{"archive": {"kind": "filesystem", "tier": "archive"}}'}
    )
    assert from_env.stores == {"archive": {"kind": "filesystem", "tier": "archive"}}
    nested = load_settings(
        environ={
            "SIMRAL_DATA_DIR": str(tmp_path),
            "SIMRAL_STORES": f'{{"cold": {{"kind": "filesystem", "root": "{tmp_path / "blobs" / "cold"}"}}}}',
        }
    )
    with pytest.raises(StoreConfigError, match="overlap"):
        open_stores(nested)

    from simral.cli.main import app

    runner = CliRunner()
    added = runner.invoke(
        app,
        [
            "tiers",
            "rule",
            "add",
            "--to",
            "cold",
            "--older-than-days",
            "365",
            "--modality",
            "MR",
            "--config",
            str(config),
        ],
    )
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["tiers", "rule", "list", "--config", str(config)])
    assert "365" in listed.output and "MR" in listed.output
    bad = runner.invoke(
        app, ["tiers", "rule", "add", "--to", "nowhere", "--older-than-days", "1", "--config", str(config)]
    )
    assert bad.exit_code == 1 and "no store named" in bad.output
    status = runner.invoke(app, ["tiers", "status", "--config", str(config)])
    assert "cold" in status.output and "replica replica" in status.output
    swept = runner.invoke(app, ["fixity", "run", "--limit", "3", "--config", str(config)])
    assert swept.exit_code == 0, swept.output
    assert "verified 3 blobs: 3 intact" in swept.output
