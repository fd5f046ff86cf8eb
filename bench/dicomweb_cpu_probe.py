#!/usr/bin/env python3
"""Server CPU per DICOMweb request: a small probe, not a benchmark (no Orthanc, no thresholds).

Starts one ``simral serve`` (embedded defaults, ``SIMRAL_WORKERS=0``, a fresh data folder under
``--work``), authenticates as :mod:`bench.dicomweb_bench` does (the test technologist's bearer token)
and reports, from the server's process tree CPU time (``/proc/<pid>/stat`` utime + stime):

- QIDO-RS ``GET /dicom-web/studies?PatientID=X`` over one keep-alive connection: server CPU ms per
  query and median / p95 latency (``--qidos`` timed queries after 10 untimed ones);
- STOW-RS of ``--stow`` CT slices (512x512, 16 bit, one client), 10 then 1 instance(s) per request
  (``--per-request``):
  server CPU ms per stored instance and instances per second. Each row stores a series of its own.

``--pid-file`` writes the server's pid and waits for ``--hold`` seconds before each phase, so that
a profiler (``py-spy record --pid``) can be attached by hand. Results are printed as JSON.

Run: ``PYTHONPATH=src .venv/bin/python bench/dicomweb_cpu_probe.py [--qidos 300] [--stow 60]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from bench.common import cpu_seconds, log  # noqa: E402
from bench.dicomweb_bench import stow_bodies  # noqa: E402
from tests.corpus import ct_series, small_instances  # noqa: E402
from tests.simral_proc import SimralProcess  # noqa: E402

DICOM_JSON = "application/dicom+json"


def _stow(
    client: httpx.Client, root: str, pid: int, files: Sequence[Path], per_request: int
) -> dict[str, Any]:
    content_type, bodies = stow_bodies(files, per_request)
    headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for body in bodies:
        r = client.post(root + "/studies", content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {
        "instances": len(files),
        "per_request": per_request,
        "inst_per_s": round(len(files) / seconds, 1),
        "server_cpu_ms_per_instance": round(1000 * cpu / len(files), 2),
    }


def _qido(client: httpx.Client, root: str, pid: int, patient_ids: list[str], n: int) -> dict[str, Any]:
    headers = {"Accept": DICOM_JSON}
    for i in range(10):
        client.get(
            root + "/studies", params={"PatientID": patient_ids[i % len(patient_ids)]}, headers=headers
        )
    latencies = []
    cpu0 = cpu_seconds(pid)
    for i in range(n):
        t0 = time.perf_counter()
        r = client.get(
            root + "/studies", params={"PatientID": patient_ids[i % len(patient_ids)]}, headers=headers
        )
        if r.status_code != 200 or not r.json():
            raise RuntimeError(f"QIDO-RS answered {r.status_code}: {r.text[:300]}")
        latencies.append(1000 * (time.perf_counter() - t0))
    cpu = cpu_seconds(pid) - cpu0
    latencies.sort()
    return {
        "queries": n,
        "median_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(latencies[int(0.95 * (n - 1))], 2),
        "server_cpu_ms_per_query": round(1000 * cpu / n, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qidos", type=int, default=300)
    parser.add_argument("--stow", type=int, default=60, help="CT slices per STOW-RS row")
    parser.add_argument("--work", type=Path, default=None, help="folder for the corpus and data (temporary)")
    parser.add_argument("--pid-file", type=Path, default=None)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to wait before each phase")
    parser.add_argument("--only", choices=("qido", "stow"), default=None)
    parser.add_argument("--per-request", default="10,1", help="STOW-RS rows: instances per request")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="simral-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    qido_files = small_instances(work / "qido", count=100, per_series=2, studies=50, seed=5)
    patient_ids = sorted({str(pydicom.dcmread(p, specific_tags=["PatientID"]).PatientID) for p in qido_files})
    proc = SimralProcess(work / f"data-{uuid.uuid4().hex[:8]}", extra_env={"SIMRAL_WORKERS": "0"})
    headers = proc.auth_headers
    proc.start()
    report: dict[str, Any] = {}
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        root = proc.dicomweb_url
        with httpx.Client(timeout=600, trust_env=False, headers=headers) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.get(root + "/studies", params={"limit": "1"}).status_code in (200, 204):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            _stow(client, root, pid, qido_files, 10)
            if args.pid_file:
                args.pid_file.write_text(str(pid))
            if args.only in (None, "qido"):
                time.sleep(args.hold)
                report["qido_studies_by_patient"] = _qido(client, root, pid, patient_ids, args.qidos)
                log(f"QIDO: {report['qido_studies_by_patient']}")
            if args.only in (None, "stow"):
                rows = [int(n) for n in args.per_request.split(",")]
                for seed, per_request in zip(range(11, 11 + len(rows)), rows, strict=True):
                    files = ct_series(
                        work / f"ct{seed}-{args.stow}", slices=args.stow, patient_id=f"PROBE{seed}", seed=seed
                    )
                    time.sleep(args.hold)
                    row = _stow(client, root, pid, files, per_request)
                    report[f"stow_{per_request}_per_request"] = row
                    log(f"STOW {per_request}/request: {row}")
    finally:
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
