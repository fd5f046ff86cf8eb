"""The audit trail is append-only and hash-chained: ``simral audit verify`` finds any alteration.

Each case builds a short trail through the services, then plays an attacker with direct database
access (who first has to drop the append-only triggers), and checks that ``simral audit verify``
exits non-zero naming the first broken record. On SQLite and on PostgreSQL. DESIGN.md §9.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from tests.conftest import BACKENDS, backend_env

from simral.access.policy import Principal
from simral.app import open_app
from simral.audit import service as audit
from simral.audit.models import AuditExportCursor
from simral.config import load_settings
from simral.context import AppContext

SIMRAL = str(Path(sys.executable).parent / "simral")
ALICE = Principal(
    kind="user", name="alice", organisation="CHA", national_id="810001234567", address="10.0.0.7"
)


@dataclass
class Trail:
    ctx: AppContext
    env: dict[str, str]

    def verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIMRAL, "audit", "verify"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def sql(self, *statements: str) -> None:
        with self.ctx.db.engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))

    def drop_protection(self) -> None:
        if self.ctx.db.engine.dialect.name == "postgresql":
            self.sql("DROP TRIGGER audit_event_append_only ON audit_event")
        else:
            self.sql("DROP TRIGGER audit_event_no_update", "DROP TRIGGER audit_event_no_delete")


@pytest.fixture(params=BACKENDS)
def trail(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trail]:
    env = {**backend_env(request.param, request), "SIMRAL_DATA_DIR": str(tmp_path / "data")}
    ctx = open_app(load_settings(environ=env))
    with ctx.db.unit_of_work() as session:
        for n in range(1, 7):
            audit.record(
                session,
                action="study.read",
                principal=ALICE,
                study_uid=f"1.2.826.0.1.3680043.8.498.{n}",
                patient_id=f"PAT{n}",
                detail={"protocol": "WADO-RS", "n": n},
            )
    yield Trail(ctx, env)
    ctx.db.dispose()


def _broken_at(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 1, result.stdout + result.stderr
    words = result.stdout.split("record ", 1)[1].split(":", 1)[0]
    return int(words)


def test_intact_trail_verifies(trail: Trail) -> None:
    result = trail.verify()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 records" in result.stdout


def test_triggers_refuse_update_and_delete(trail: Trail) -> None:
    for statement in (
        "UPDATE audit_event SET outcome = 'failure' WHERE id = 2",
        "DELETE FROM audit_event WHERE id = 2",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            trail.sql(statement)
    assert trail.verify().returncode == 0


def _forge_and_rehash(trail: Trail, record_id: int) -> None:
    from simral.audit.models import AuditEvent

    with trail.ctx.db.sessions() as session:
        event = session.get(AuditEvent, record_id)
        assert event is not None
        row = {name: getattr(event, name) for name in audit.HASHED_FIELDS}
        row["actor"] = "user:mallory"
        forged = audit.chain_hash(event.prev_hash, row)
    trail.sql(f"UPDATE audit_event SET actor = 'user:mallory', hash = '{forged}' WHERE id = {record_id}")


EDITS: dict[str, tuple[Callable[[Trail], None], int]] = {
    # Someone turns a record's outcome around: that record's own hash no longer matches.
    "edited": (lambda t: t.sql("UPDATE audit_event SET patient_id = 'OTHER' WHERE id = 3"), 3),
    # A record disappears: its successor's link points at a hash that is gone.
    "deleted": (lambda t: t.sql("DELETE FROM audit_event WHERE id = 3"), 4),
    # Two records swap places (ids kept, contents and hashes exchanged): the chain breaks at the first.
    "reordered": (
        lambda t: t.sql(
            "UPDATE audit_event SET id = 100 WHERE id = 2",
            "UPDATE audit_event SET id = 2 WHERE id = 3",
            "UPDATE audit_event SET id = 3 WHERE id = 100",
        ),
        2,
    ),
    # A forged record whose hash the attacker recomputed: the next record's link gives it away.
    "rehashed": (lambda t: _forge_and_rehash(t, 5), 6),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_verify_names_the_first_broken_record(trail: Trail, edit: str) -> None:
    tamper, first_broken = EDITS[edit]
    trail.drop_protection()
    tamper(trail)
    assert _broken_at(trail.verify()) == first_broken


def test_truncated_tail_is_detected_against_the_export_cursor(trail: Trail) -> None:
    # The syslog collector has acknowledged every record; the last ones are then removed.
    with trail.ctx.db.unit_of_work() as session:
        session.add(AuditExportCursor(sink="syslog", last_id=6))
    trail.drop_protection()
    trail.sql("DELETE FROM audit_event WHERE id >= 5")
    assert _broken_at(trail.verify()) == 6


def test_chain_continues_across_writers(trail: Trail) -> None:
    # Records written later by another process (the CLI) extend the same chain.
    result = subprocess.run(
        [SIMRAL, "organisations", "add", "CHA", "--name", "CH A"],
        env={**os.environ, **trail.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with trail.ctx.db.unit_of_work() as session:
        audit.record(session, action="logout", principal=ALICE)
    verified = trail.verify()
    assert verified.returncode == 0 and "8 records" in verified.stdout


def test_chain_holds_across_savepoints(trail: Trail) -> None:
    # A transaction reuses the tail it appended, but not one appended in a savepoint that may be
    # rolled back: the chain stays whole whether the savepoint is rolled back or released.
    with trail.ctx.db.unit_of_work() as session:
        audit.record(session, action="logout", principal=ALICE)  # 7
        nested = session.begin_nested()
        audit.record(session, action="login", principal=ALICE)  # gone with the savepoint
        nested.rollback()
        audit.record(session, action="logout", principal=ALICE)  # 8, after 7
        with session.begin_nested():
            audit.record(session, action="login", principal=ALICE)  # 9
        audit.record(session, action="logout", principal=ALICE)  # 10, after 9
    verified = trail.verify()
    assert verified.returncode == 0 and "10 records" in verified.stdout, verified.stdout + verified.stderr


def test_one_tail_read_per_transaction(trail: Trail) -> None:
    # An ingest batch audits every instance in one transaction: the chain's tail is read once.
    from sqlalchemy import event

    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "audit_event" in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(trail.ctx.db.engine, "before_cursor_execute", seen)
    try:
        with trail.ctx.db.unit_of_work() as session:
            for n in range(3):
                audit.record(session, action="study.read", principal=ALICE, study_uid=f"1.2.3.{n}")
        with trail.ctx.db.unit_of_work() as session:
            audit.record(session, action="logout", principal=ALICE)
    finally:
        event.remove(trail.ctx.db.engine, "before_cursor_execute", seen)
    assert len(statements) == 2  # one per transaction
    verified = trail.verify()
    assert verified.returncode == 0 and "10 records" in verified.stdout, verified.stdout + verified.stderr
