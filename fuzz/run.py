"""Run every harness for N executions and print the figures.

``python -m fuzz.run [--runs N] [--only NAME ...] [--max-total-time S] [--jobs J] [--workers W]``;
``make hardening`` runs it with ``FUZZ_RUNS`` (default 1 000 000) executions per harness. Each
harness runs in its own process (libFuzzer exits on the first crash), ``--jobs`` of them side by
side (``FUZZ_JOBS``, default one per CPU); a crash leaves its input in ``fuzz/.work/NAME/``.
``--workers W`` splits one harness's executions over W processes that share its corpus folder
(libFuzzer's ``-reload``: each takes up the inputs the others find), as libFuzzer's ``-jobs`` does.
With ``SIMRAL_CONFORMANCE_DIR`` set, the HL7 harness also reads the ANS Téléradiologie samples
of the conformance kit as seeds (they are not copied into the repository).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fuzz.harness import FUZZ_DIR, WORK_DIR

HARNESSES = ("ingest", "hl7", "stow", "import", "dimse")


@dataclass
class Outcome:
    name: str
    runs: int
    seconds: float
    crashed: bool
    artifact: str
    new_units: int
    peak_rss_mb: int
    #: libFuzzer's average executions per second (setup time excluded).
    per_second: int


def _stat(text: str, key: str, progress: str) -> int:
    """libFuzzer's final ``stat::KEY``, else the last value of its progress lines' ``progress``
    pattern (an interrupted atheris run ends on KeyboardInterrupt without the final figures)."""
    found = re.findall(rf"stat::{key}:\s+(\d+)", text)
    if not found and progress:
        found = re.findall(progress, text, re.MULTILINE)
    return int(found[-1]) if found else 0


def run_one(
    name: str,
    runs: int,
    max_total_time: int,
    extra: list[str],
    *,
    worker: int = 0,
    stop: threading.Event | None = None,
) -> Outcome:
    """One harness in its own process; its libFuzzer log goes to ``fuzz/.work/NAME/log.txt``
    (``log-W.txt`` for worker W > 0 of the same harness). Once ``stop`` is set the process is
    interrupted (SIGINT: libFuzzer prints its figures and exits), which is not a crash."""
    work = WORK_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = FUZZ_DIR.parent
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(root / "src"), str(root), env.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", f"fuzz.fuzz_{name}", f"-runs={runs}", *extra]
    if max_total_time:
        command.append(f"-max_total_time={max_total_time}")
    conformance = Path(env.get("SIMRAL_CONFORMANCE_DIR", root.parent / "shared" / "conformance"))
    if name == "hl7" and (conformance / "teleradiologie" / "messages").is_dir():
        command.append(str(conformance / "teleradiologie" / "messages"))
    started = time.monotonic()
    log = work / ("log.txt" if worker == 0 else f"log-{worker}.txt")
    interrupted = False
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                returncode = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set() and not interrupted:
                    process.send_signal(signal.SIGINT)
                    interrupted = True
    seconds = time.monotonic() - started
    return read_outcome(name, log.read_text(errors="replace"), seconds, returncode, interrupted=interrupted)


def read_outcome(name: str, text: str, seconds: float, returncode: int, *, interrupted: bool) -> Outcome:
    """The figures of one libFuzzer log: its final statistics, else (an interrupted run) its last
    progress line. A crash is an artifact written or a failing exit that no interruption caused."""
    artifact = re.findall(r"Test unit written to (\S+)", text)
    return Outcome(
        name,
        _stat(text, "number_of_executed_units", r"^#(\d+)\s"),
        seconds,
        crashed=bool(artifact) or (returncode != 0 and not interrupted),
        artifact=artifact[-1] if artifact else "",
        new_units=_stat(text, "new_units_added", "") or len(re.findall(r"^#\d+\s+NEW\s", text, re.MULTILINE)),
        peak_rss_mb=_stat(text, "peak_rss_mb", r" rss: (\d+)Mb"),
        per_second=_stat(text, "average_exec_per_sec", r" exec/s: (\d+) "),
    )


def run_workers(name: str, runs: int, max_total_time: int, extra: list[str], workers: int) -> Outcome:
    """Harness ``name`` in ``workers`` processes sharing its corpus, ``runs`` executions in all:
    the figures are summed (executions, new inputs, executions per second), the peak RSS is the
    largest; a crash in any worker is a crash, and interrupts the others."""
    if workers <= 1:
        return run_one(name, runs, max_total_time, extra)
    shares = [runs // workers + (1 if w < runs % workers else 0) for w in range(workers)]
    stop = threading.Event()
    parts: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = [
            pool.submit(run_one, name, shares[w], max_total_time, extra, worker=w, stop=stop)
            for w in range(workers)
        ]
        for finished in as_completed(running):
            try:
                parts.append(finished.result())
            except BaseException:
                stop.set()  # a worker that could not run: the others stop rather than run on
                raise
            if parts[-1].crashed:
                stop.set()
    artifacts = [p.artifact for p in parts if p.artifact]
    return Outcome(
        name,
        sum(p.runs for p in parts),
        max(p.seconds for p in parts),
        crashed=any(p.crashed for p in parts),
        artifact=artifacts[0] if artifacts else "",
        new_units=sum(p.new_units for p in parts),
        peak_rss_mb=max(p.peak_rss_mb for p in parts),
        per_second=sum(p.per_second for p in parts),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "1000000")))
    parser.add_argument("--max-total-time", type=int, default=int(os.environ.get("FUZZ_MAX_TIME", "0")))
    parser.add_argument("--only", nargs="*", default=list(HARNESSES), choices=HARNESSES)
    parser.add_argument("libfuzzer", nargs="*", help="further libFuzzer flags (after --)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("FUZZ_JOBS", "0")) or os.cpu_count() or 1,
        help="harnesses run side by side, each in its own process (default: one per CPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("FUZZ_WORKERS", "1")),
        help="processes per harness sharing its corpus, the executions split between them",
    )
    args = parser.parse_args()

    def one(name: str) -> Outcome:
        print(f"fuzzing {name}: {args.runs} executions in {args.workers} process(es) ...", flush=True)
        outcome = run_workers(name, args.runs, args.max_total_time, args.libfuzzer, args.workers)
        state = f"CRASH ({outcome.artifact})" if outcome.crashed else "no crash"
        print(
            f"  {name}: {outcome.runs} executions in {outcome.seconds:.0f} s ({outcome.per_second}/s), "
            f"{outcome.new_units} new inputs, peak RSS {outcome.peak_rss_mb} MB: {state}",
            flush=True,
        )
        return outcome

    # Each harness is a process of its own (libFuzzer exits on the first crash), so a thread per
    # running harness only waits for it.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(one, args.only))
    print("\nharness   executions   exec/s   crashes")
    for o in outcomes:
        print(f"{o.name:<9} {o.runs:>10}   {o.per_second:>6}   {int(o.crashed):>7}")
    return 1 if any(o.crashed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
