"""``fuzz.run``, the driver of ``make hardening``: how one harness's executions are split over
worker processes sharing its corpus, and how their figures are added up."""

from __future__ import annotations

import threading

import pytest
from fuzz import run


def _fake_run_one(calls: list[tuple[str, int, int]], crash_worker: int | None = None):
    lock = threading.Lock()

    def run_one(
        name: str, runs: int, max_total_time: int, extra: list[str], *, worker: int = 0
    ) -> run.Outcome:
        with lock:
            calls.append((name, runs, worker))
        crashed = worker == crash_worker
        return run.Outcome(
            name,
            runs,
            seconds=10.0 + worker,
            crashed=crashed,
            artifact=f"fuzz/.work/{name}/crash-{worker}" if crashed else "",
            new_units=3 + worker,
            peak_rss_mb=200 + 50 * worker,
            per_second=100,
        )

    return run_one


def test_the_executions_are_split_between_the_workers_and_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(run, "run_one", _fake_run_one(calls))

    outcome = run.run_workers("hl7", 1_000_001, 0, [], 3)

    # Each worker its own log (worker number), the remainder to the first ones, nothing lost.
    assert sorted(calls) == [("hl7", 333_333, 2), ("hl7", 333_334, 0), ("hl7", 333_334, 1)]
    assert outcome.runs == 1_000_001
    assert outcome.per_second == 300
    assert outcome.new_units == 3 + 4 + 5
    assert outcome.peak_rss_mb == 300  # the largest worker, not a sum
    assert outcome.seconds == 12.0  # the campaign lasts as long as its slowest worker
    assert not outcome.crashed


def test_a_crash_in_any_worker_is_the_harness_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(run, "run_one", _fake_run_one(calls, crash_worker=1))

    outcome = run.run_workers("import", 1000, 0, [], 2)

    assert outcome.crashed
    assert outcome.artifact == "fuzz/.work/import/crash-1"


def test_one_worker_is_the_plain_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(run, "run_one", _fake_run_one(calls))

    outcome = run.run_workers("stow", 500, 0, [], 1)

    assert calls == [("stow", 500, 0)]
    assert outcome.runs == 500
