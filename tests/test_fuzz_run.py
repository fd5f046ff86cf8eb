"""``fuzz.run``, the driver of ``make hardening``: how one harness's executions are split over
worker processes sharing its corpus, and how their figures are added up."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fuzz import run


def _fake_run_one(calls: list[tuple[str, int, int]], crash_worker: int | None = None):
    """``run_one`` without libFuzzer: the crashing worker returns at once, the others when their
    share is done or, when a worker crashed, once ``stop`` tells them to stop (the share cut)."""
    lock = threading.Lock()

    def run_one(name: str, runs: int, *_args: object, **options: Any) -> run.Outcome:
        worker: int = options.get("worker", 0)
        stop: threading.Event | None = options.get("stop")
        with lock:
            calls.append((name, runs, worker))
        crashed = worker == crash_worker
        if crash_worker is not None and not crashed:
            assert stop is not None and stop.wait(10), "the other workers were not stopped"
            runs = runs // 10
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


def test_a_crash_in_any_worker_is_the_harness_crash_and_stops_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(run, "run_one", _fake_run_one(calls, crash_worker=1))

    outcome = run.run_workers("import", 1000, 0, [], 3)

    assert outcome.crashed
    assert outcome.artifact == "fuzz/.work/import/crash-1"
    # Workers 0 and 2 were stopped by the crash, with a tenth of their share done.
    assert outcome.runs == 333 + 33 + 33


def test_one_worker_is_the_plain_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(run, "run_one", _fake_run_one(calls))

    outcome = run.run_workers("stow", 500, 0, [], 1)

    assert calls == [("stow", 500, 0)]
    assert outcome.runs == 500


FINISHED_LOG = """\
#1000\tNEW    cov: 10 ft: 20 corp: 5/1Kb lim: 4 exec/s: 500 rss: 150Mb L: 3/4 MS: 1 ChangeBit-
#2000\tDONE   cov: 10 ft: 20 corp: 5/1Kb lim: 4 exec/s: 480 rss: 160Mb
Done 2000 runs in 4 second(s)
stat::number_of_executed_units: 2000
stat::average_exec_per_sec:     480
stat::new_units_added:          7
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              161
"""

INTERRUPTED_LOG = """\
#14554\tNEW    cov: 1007 ft: 3272 corp: 356/384Kb lim: 4113 exec/s: 250 rss: 198Mb L: 1471/4113
#14597\tRELOAD cov: 1007 ft: 3276 corp: 358/389Kb lim: 4113 exec/s: 251 rss: 198Mb
#14598\tNEW    cov: 1008 ft: 3276 corp: 359/388Kb lim: 4113 exec/s: 249 rss: 199Mb L: 2942/4113
KeyboardInterrupt: stopping.
"""


def test_the_figures_of_a_finished_run_are_libfuzzers_final_statistics() -> None:
    outcome = run.read_outcome("hl7", FINISHED_LOG, 4.2, 0, interrupted=False)

    assert (outcome.runs, outcome.per_second, outcome.new_units, outcome.peak_rss_mb) == (2000, 480, 7, 161)
    assert not outcome.crashed


def test_an_interrupted_run_reports_its_last_progress_line_and_no_crash() -> None:
    """atheris ends an interrupted run on KeyboardInterrupt, without libFuzzer's final figures."""
    outcome = run.read_outcome("hl7", INTERRUPTED_LOG, 60.0, 1, interrupted=True)

    assert (outcome.runs, outcome.per_second, outcome.new_units, outcome.peak_rss_mb) == (14598, 249, 2, 199)
    assert not outcome.crashed
    # The same exit without an interruption is a failure of the run.
    assert run.read_outcome("hl7", INTERRUPTED_LOG, 60.0, 1, interrupted=False).crashed


def test_a_written_test_unit_is_a_crash() -> None:
    log = (
        FINISHED_LOG
        + "==1== ERROR: libFuzzer: deadly signal\nTest unit written to fuzz/.work/hl7/crash-ab12\n"
    )

    outcome = run.read_outcome("hl7", log, 4.2, 0, interrupted=True)

    assert outcome.crashed
    assert outcome.artifact == "fuzz/.work/hl7/crash-ab12"


def test_a_worker_that_cannot_run_stops_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = threading.Event()

    def run_one(name: str, runs: int, *_args: object, **options: Any) -> run.Outcome:
        if options["worker"] == 0:
            raise OSError("no room for the log")
        assert options["stop"].wait(10), "the other worker was not stopped"
        stopped.set()
        return run.Outcome(name, 1, 1.0, crashed=False, artifact="", new_units=0, peak_rss_mb=1, per_second=1)

    monkeypatch.setattr(run, "run_one", run_one)

    with pytest.raises(OSError, match="no room"):
        run.run_workers("dimse", 100, 0, [], 2)
    assert stopped.is_set()
