#!/usr/bin/env python3
"""DIMSE benchmark: simral next to Orthanc on the same synthetic corpus, in the same run.

Not a test: there are no thresholds. It prints absolute figures and the ratio simral/Orthanc for
C-STORE throughput (1 and 4 associations, CT slices and small instances), C-FIND latency over an
open association, C-MOVE throughput to a dcmtk storescp, and the peak RSS and PSS of both servers.
Results also go to ``bench/results/dimse-<timestamp>.json``. See bench/README.md.

Run with the project's virtualenv: ``.venv/bin/python bench/dimse_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import pynetdicom  # noqa: E402
from bench.common import (  # noqa: E402
    CLK_TCK,
    busy_jiffies,
    cpu_seconds,
    log,
    machine_info,
    own_cpu_seconds,
    process_tree,
    pss_kb,
    reuse_generated,
    status_kb,
    write_results,
)
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402
from tests.corpus import ct_series, small_instances  # noqa: E402
from tests.peers import HOST, OrthancServer, StoreSCP  # noqa: E402
from tests.simral_proc import SIMRAL, SimralProcess  # noqa: E402

DCMTK = Path("/usr/bin")  # absolute: the venv's bin/ holds pynetdicom scripts with the same names
SCU_AE = "BENCHSCU"
DEST_AE = "BENCHDEST"
SINK_AE = "BENCHSINK"
MAX_PDU = 131072
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The HTTP look-ups (instance counts) stay on loopback whatever *_proxy says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Sizes:
    ct: int
    small: int
    move: int
    finds: int
    move_repeats: int


FULL = Sizes(ct=600, small=2000, move=300, finds=200, move_repeats=3)
QUICK = Sizes(ct=100, small=200, move=50, finds=50, move_repeats=2)


# --------------------------------------------------------------------------------------------- /proc


class RssSampler:
    """Samples the memory of the watched servers (and their children) every ``interval`` seconds.

    Per label it keeps the largest VmHWM of the root process (the kernel's own peak), the largest
    sampled sum of VmRSS over the process tree (covers forked children, if any; pages they share
    with their parent count in each) and the largest sampled sum of Pss (shared pages divided).
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.hwm_kb: dict[str, int] = {}
        self.tree_kb: dict[str, int] = {}
        self.pss_kb: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self.pids[label] = pid
        self.sample(label)

    def unwatch(self, label: str) -> None:
        """Take a last sample (call it before stopping the process) and stop watching ``label``."""
        self.sample(label)
        with self._lock:
            self.pids.pop(label, None)

    def sample(self, label: str) -> None:
        with self._lock:
            pid = self.pids.get(label)
            if pid is None:
                return
            hwm = status_kb(pid, "VmHWM")
            processes = process_tree(pid)
            tree = sum(status_kb(p, "VmRSS") for p in processes)
            pss = sum(pss_kb(p) for p in processes)
            self.hwm_kb[label] = max(self.hwm_kb.get(label, 0), hwm)
            self.tree_kb[label] = max(self.tree_kb.get(label, 0), tree)
            self.pss_kb[label] = max(self.pss_kb.get(label, 0), pss)

    def peak_mb(self, label: str) -> float:
        return max(self.hwm_kb.get(label, 0), self.tree_kb.get(label, 0)) / 1024

    def peak_pss_mb(self, label: str) -> float:
        return self.pss_kb.get(label, 0) / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for label in list(self.pids):
                self.sample(label)


# --------------------------------------------------------------------------------------------- servers


@dataclass
class Target:
    """One server under test, as seen by the DICOM tools."""

    name: str
    ae: str
    port: int
    pid: int
    count: Callable[[], int]  # instances stored


def _http_json(url: str, headers: dict[str, str]) -> Any:
    with _HTTP.open(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        return json.load(resp)


@contextlib.contextmanager
def simral_server(base: Path, tag: str, dest_port: int, sampler: RssSampler) -> Iterator[Target]:
    """A fresh ``simral serve`` on its embedded defaults (SQLite + filesystem) in ``base/tag``."""
    proc = SimralProcess(base / f"simral-{tag}", extra_env={"SIMRAL_WORKERS": "0"})
    proc.add_node("bench", SCU_AE, 104)
    proc.add_node("dest", DEST_AE, dest_port)
    proc.start()
    try:
        assert proc.proc is not None
        sampler.watch("simral", proc.proc.pid)
        url = f"http://{HOST}:{proc.http_port}/api/status"
        headers = proc.auth_headers
        yield Target(
            "simral",
            proc.ae_title,
            proc.dicom_port,
            proc.proc.pid,
            lambda: _http_json(url, headers)["instances"],
        )
    except BaseException:
        log(f"simral log tail:\n{proc.log_tail()}")
        raise
    finally:
        sampler.unwatch("simral")
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


@contextlib.contextmanager
def orthanc_server(dest_port: int, sampler: RssSampler) -> Iterator[Target]:
    """A fresh Orthanc (Debian package, SQLite index, SyncStorageArea) in its own temp dir."""
    modalities = {"bench": (SCU_AE, HOST, 104), "dest": (DEST_AE, HOST, dest_port)}
    with OrthancServer(aet="ORTHANC", modalities=modalities) as server:
        assert server.proc is not None
        sampler.watch("orthanc", server.proc.pid)
        try:
            yield Target(
                "orthanc",
                server.aet,
                server.dicom_port,
                server.proc.pid,
                lambda: int(server.rest_get("/statistics")["CountInstances"]),
            )
        except BaseException:
            log(f"Orthanc log tail:\n{server.log_tail()}")
            raise
        finally:
            sampler.unwatch("orthanc")


# --------------------------------------------------------------------------------------------- dcmtk


def _run_tool(argv: Sequence[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), env=TOOL_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def storescu_argv(ae: str, port: int, files: Sequence[Path]) -> list[str]:
    """One storescu process: every file over one association, only the needed contexts."""
    return [
        str(DCMTK / "storescu"),
        "-aet",
        SCU_AE,
        "-aec",
        ae,
        "--required",
        "--no-halt",
        "--max-pdu",
        str(MAX_PDU),
        HOST,
        str(port),
        *map(str, files),
    ]


def store(ae: str, port: int, parts: Sequence[Sequence[Path]], timeout: float = 900) -> float:
    """Send each part over its own association, all at once; seconds until the last one ended."""
    outputs: list[tuple[int, str]] = []
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_argv(ae, port, part),
            env=TOOL_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for part in parts
    ]
    for p in procs:
        raw, _ = p.communicate(timeout=timeout)
        outputs.append((p.returncode, raw.decode(errors="replace")))
    elapsed = time.perf_counter() - t0
    for rc, text in outputs:
        if rc != 0:
            raise RuntimeError(f"storescu to {ae} exited with {rc}:\n{text[-3000:]}")
    return elapsed


def split(files: Sequence[Path], n: int) -> list[list[Path]]:
    """``n`` contiguous parts of nearly equal size."""
    return [list(files[i * len(files) // n : (i + 1) * len(files) // n]) for i in range(n)]


def dcmtk_version() -> str:
    out = _run_tool([str(DCMTK / "storescu"), "--version"]).stdout
    return out.splitlines()[0].strip("$ ").strip() if out else "?"


def orthanc_version() -> str:
    out = _run_tool(["/usr/sbin/Orthanc", "--version"]).stdout
    return out.splitlines()[0].strip() if out else "?"


def git_commit() -> str:
    try:
        head = _run_tool(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = _run_tool(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]).stdout.strip()
    except OSError:
        return "?"
    return head + ("+dirty-src" if dirty else "")


# --------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    ct: list[Path]
    small: list[Path]
    move: list[Path]
    warmup: list[Path]
    move_study_uid: str = ""
    move_series_uid: str = ""
    patient_ids: list[str] = field(default_factory=list)

    @property
    def mb(self) -> dict[str, float]:
        def size(paths: list[Path]) -> float:
            return round(sum(p.stat().st_size for p in paths) / 1e6, 1)

        return {"ct": size(self.ct), "small": size(self.small), "move": size(self.move)}


def build_corpus(base: Path, sizes: Sizes) -> Corpus:
    t0 = time.perf_counter()
    ct = reuse_generated(base / f"ct{sizes.ct}", sizes.ct, lambda d: ct_series(d, slices=sizes.ct))
    move = reuse_generated(
        base / f"move{sizes.move}",
        sizes.move,
        lambda d: ct_series(d, slices=sizes.move, patient_id="BENCHMOVE", patient_name="BENCH^MOVE", seed=1),
    )
    small = reuse_generated(
        base / f"small{sizes.small}", sizes.small, lambda d: small_instances(d, count=sizes.small)
    )
    # Warm-up instances of their own patients: one association, both kinds of instance.
    warmup = reuse_generated(
        base / "warmup-ct",
        4,
        lambda d: ct_series(d, slices=4, patient_id="WARMUP", patient_name="WARM^UP", seed=9),
    )
    warmup += reuse_generated(base / "warmup-small", 4, lambda d: small_instances(d, count=4, seed=9))
    corpus = Corpus(ct=ct, small=small, move=move, warmup=warmup)
    head = pydicom.dcmread(move[0], stop_before_pixels=True)
    corpus.move_study_uid, corpus.move_series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    ids = {str(pydicom.dcmread(p, specific_tags=["PatientID"]).PatientID) for p in [*small, *warmup, move[0]]}
    corpus.patient_ids = sorted(ids)
    log(f"corpus ready in {time.perf_counter() - t0:.1f} s: {corpus.mb} MB, {len(ids)} patients")
    return corpus


# --------------------------------------------------------------------------------------------- measurements


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def warm_up(target: Target, corpus: Corpus) -> None:
    before = target.count()
    store(target.ae, target.port, [corpus.warmup])
    if target.count() - before != len(corpus.warmup):
        raise RuntimeError(f"{target.name}: warm-up instances not all stored")


def timed_store(target: Target, files: Sequence[Path], associations: int) -> dict[str, Any]:
    """Store ``files`` over ``associations`` concurrent storescu processes; check they all arrived."""
    before = target.count()
    os.sync()  # no write-back of earlier runs' dirty pages during the measurement
    cpu0 = cpu_seconds(target.pid)
    seconds = store(target.ae, target.port, split(files, associations))
    cpu = cpu_seconds(target.pid) - cpu0
    stored = target.count() - before
    if stored != len(files):
        raise RuntimeError(f"{target.name}: {stored} of {len(files)} instances stored")
    return {
        "seconds": round(seconds, 3),
        "instances_per_s": round(_rate(len(files), seconds), 2),
        "server_cpu_s": round(cpu, 2),
    }


def sink_store(sink: StoreSCP, files: Sequence[Path], associations: int) -> dict[str, Any]:
    """The same sends to a dcmtk storescp that discards everything: the sender's own ceiling."""
    os.sync()
    seconds = store(sink.aet, sink.port, split(files, associations))
    return {"seconds": round(seconds, 3), "instances_per_s": round(_rate(len(files), seconds), 2)}


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _study_query(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ):
        setattr(ds, keyword, "")
    return ds


def find_latency(target: Target, patient_ids: Sequence[str], repeats: int) -> dict[str, Any]:
    """``repeats`` study-level C-FINDs by PatientID over one pynetdicom association (Study Root)."""
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(
        HOST, target.port, ae_title=target.ae, max_pdu=MAX_PDU, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise RuntimeError(f"{target.name}: C-FIND association refused")
    latencies: list[float] = []
    matches = 0
    per_patient: dict[str, set[int]] = {}  # PatientID -> the numbers of matches seen
    cpu0 = cpu_seconds(target.pid)
    try:
        for i in range(repeats + 10):  # the first 10 warm the path up and are not counted
            query = _study_query(patient_ids[i % len(patient_ids)])
            t0 = time.perf_counter()
            responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            elapsed = time.perf_counter() - t0
            final = responses[-1][0] if responses else None
            if final is None or final.Status != 0x0000:
                raise RuntimeError(f"{target.name}: C-FIND failed (final status {final and final.Status})")
            if i >= 10:
                latencies.append(elapsed * 1000)
                matches += len(responses) - 1
                per_patient.setdefault(query.PatientID, set()).add(len(responses) - 1)
    finally:
        assoc.release()
    cpu = cpu_seconds(target.pid) - cpu0
    latencies.sort()
    return {
        "queries": len(latencies),
        "matches": matches,
        "matches_per_patient": {k: sorted(v) for k, v in sorted(per_patient.items())},
        "median_ms": round(statistics.median(latencies), 3),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "server_cpu_ms_per_query": round(1000 * cpu / (repeats + 10), 3),
    }


def timed_move(target: Target, dest: StoreSCP, corpus: Corpus) -> tuple[float, float]:
    """One C-MOVE of the move series to ``dest`` with movescu.

    Returns the seconds from request to final response and the server's CPU seconds meanwhile.
    """
    dest.clear()
    argv = [
        str(DCMTK / "movescu"),
        "-aet",
        SCU_AE,
        "-aec",
        target.ae,
        "-aem",
        DEST_AE,
        "--study",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={corpus.move_study_uid}",
        "-k",
        f"SeriesInstanceUID={corpus.move_series_uid}",
        "--max-pdu",
        str(MAX_PDU),
        HOST,
        str(target.port),
    ]
    os.sync()
    cpu0 = cpu_seconds(target.pid)
    t0 = time.perf_counter()
    result = _run_tool(argv)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(target.pid) - cpu0
    received = len(dest.files())
    if result.returncode != 0 or received != len(corpus.move):
        raise RuntimeError(
            f"{target.name}: C-MOVE rc={result.returncode}, {received} of {len(corpus.move)} received:\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
    return seconds, cpu


def move_throughput(
    targets: Sequence[Target], dest: StoreSCP, corpus: Corpus, repeats: int
) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
    for r in range(repeats):
        for target in targets if r % 2 == 0 else reversed(targets):  # alternate who goes first
            runs[target.name].append(timed_move(target, dest, corpus))
    out = {}
    for name, measured in runs.items():
        median = statistics.median(s for s, _ in measured)
        out[name] = {
            "runs_s": [round(s, 3) for s, _ in measured],
            "seconds": round(median, 3),
            "instances_per_s": round(_rate(len(corpus.move), median), 2),
            "server_cpu_s": [round(c, 2) for _, c in measured],
        }
    return out


# --------------------------------------------------------------------------------------------- driver


@dataclass
class Row:
    metric: str
    simral: float
    orthanc: float
    unit: str
    sink: float | None = None
    better: str = "higher"  # which direction is better, for the reader

    @property
    def ratio(self) -> float:
        return self.simral / self.orthanc if self.orthanc else float("nan")


def print_table(rows: Sequence[Row]) -> None:
    columns = ("simral", "Orthanc", "simral/Orthanc", "sender max")
    header = (
        f"{'measurement':<46} {'unit':<7} {columns[0]:>9} {columns[1]:>9} {columns[2]:>15} {columns[3]:>11}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        sink = f"{r.sink:>11.1f}" if r.sink is not None else ""
        print(
            f"{r.metric:<46} {r.unit:<7} {r.simral:>9.1f} {r.orthanc:>9.1f} {r.ratio:>15.2f} {sink}".rstrip()
        )
    print()
    print("inst/s: higher is better; ms and MB: lower is better.")
    print("sender max: the same storescu runs against a dcmtk storescp that discards the data (--ignore).")


def store_phase(
    targets: Sequence[Target], sink: StoreSCP, corpus: Corpus, files: Sequence[Path], n_assoc: int
) -> dict[str, Any]:
    """Warm both fresh servers up, then time the same sends to each, then to the sink."""
    for t in targets:
        warm_up(t, corpus)
    sink_store(sink, corpus.warmup, 1)
    result: dict[str, Any] = {"instances": len(files), "associations": n_assoc}
    for t in targets:
        log(f"C-STORE {len(files)} instances over {n_assoc} association(s) to {t.name}")
        result[t.name] = timed_store(t, files, n_assoc)
        log(f"  {result[t.name]}")
    result["sender_max"] = sink_store(sink, files, n_assoc)
    log(f"  sender max: {result['sender_max']}")
    return result


def find_move_phase(
    targets: Sequence[Target], dest: StoreSCP, corpus: Corpus, sizes: Sizes, report: dict[str, Any]
) -> list[Row]:
    """C-FIND latency and C-MOVE throughput on the stored data (plus the move series, stored untimed)."""
    for t in targets:
        store(t.ae, t.port, [corpus.move])
    report["archive_instances_for_find_move"] = {t.name: t.count() for t in targets}
    find: dict[str, Any] = {}
    for t in targets:
        log(f"C-FIND x{sizes.finds} on {t.name}")
        find[t.name] = find_latency(t, corpus.patient_ids, sizes.finds)
        log(f"  {find[t.name]}")
    report["find"] = find
    f_s, f_o = find["simral"], find["orthanc"]
    if f_s["matches_per_patient"] != f_o["matches_per_patient"]:
        log(
            "warning: C-FIND answers differ: "
            f"simral {f_s['matches_per_patient']}, Orthanc {f_o['matches_per_patient']}"
        )
    log(f"C-MOVE of {len(corpus.move)} instances x{sizes.move_repeats} per server")
    moves = move_throughput(targets, dest, corpus, sizes.move_repeats)
    report["move"] = {"instances": len(corpus.move), **moves}
    log(f"  {moves}")
    return [
        Row("C-FIND study by PatientID, median", f_s["median_ms"], f_o["median_ms"], "ms", better="lower"),
        Row("C-FIND study by PatientID, p95", f_s["p95_ms"], f_o["p95_ms"], "ms", better="lower"),
        Row(
            f"C-MOVE CT series x{len(corpus.move)} to storescp",
            moves["simral"]["instances_per_s"],
            moves["orthanc"]["instances_per_s"],
            "inst/s",
        ),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="simral-bench-"))
    corpus_dir = args.corpus_dir or work / "corpus"
    started = time.perf_counter()
    load_before = os.getloadavg()
    busy0, own0 = busy_jiffies(), own_cpu_seconds()
    report: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(load_before),
        "versions": {
            "simral_commit": git_commit(),
            "orthanc": orthanc_version(),
            "dcmtk": dcmtk_version(),
            "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__,
        },
        "sizes": sizes.__dict__,
    }
    rows: list[Row] = []
    try:
        corpus = build_corpus(corpus_dir, sizes)
        report["corpus_mb"] = corpus.mb
        workloads = [(corpus.ct, 1), (corpus.ct, 4), (corpus.small, 1), (corpus.small, 4)]
        report["store"] = {}
        with (
            RssSampler() as sampler,
            StoreSCP(aet=DEST_AE) as dest,
            StoreSCP(aet=SINK_AE, fork=True, extra_args=["--ignore"]) as sink,
        ):
            for i, (files, n_assoc) in enumerate(workloads):
                kind = "ct" if files is corpus.ct else "small"
                key = f"{kind}-{n_assoc}assoc"
                with (
                    simral_server(work, key, dest.port, sampler) as simral,
                    orthanc_server(dest.port, sampler) as orthanc,
                ):
                    targets = [simral, orthanc] if i % 2 == 0 else [orthanc, simral]  # alternate
                    result = store_phase(targets, sink, corpus, files, n_assoc)
                    report["store"][key] = result
                    label = "CT 512x512" if kind == "ct" else "small 64x64"
                    rows.append(
                        Row(
                            f"C-STORE {label} x{len(files)}, {n_assoc} assoc",
                            result["simral"]["instances_per_s"],
                            result["orthanc"]["instances_per_s"],
                            "inst/s",
                            sink=result["sender_max"]["instances_per_s"],
                        )
                    )
                    if i == len(workloads) - 1:  # find and move on the data this last pair holds
                        rows += find_move_phase(targets, dest, corpus, sizes, report)
            peaks = {name: round(sampler.peak_mb(name), 1) for name in ("simral", "orthanc")}
            report["peak_rss_mb"] = peaks
            pss = {name: round(sampler.peak_pss_mb(name), 1) for name in ("simral", "orthanc")}
            report["peak_pss_mb"] = pss
            rows.append(
                Row("peak RSS over the whole run", peaks["simral"], peaks["orthanc"], "MB", better="lower")
            )
            rows.append(
                Row("peak PSS over the whole run", pss["simral"], pss["orthanc"], "MB", better="lower")
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    elapsed = time.perf_counter() - started
    # CPU used on this machine by processes other than this benchmark and what it started.
    foreign = max(0.0, (busy_jiffies() - busy0) / CLK_TCK - (own_cpu_seconds() - own0)) / elapsed
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["other_cpu_load"] = round(foreign, 2)
    report["elapsed_s"] = round(elapsed, 1)
    report["table"] = [{**r.__dict__, "ratio": round(r.ratio, 3)} for r in rows]
    print_table(rows)
    print(
        f"run time {elapsed:.0f} s; CPU used by other processes meanwhile: "
        f"{foreign:.2f} of {os.cpu_count()} CPUs"
    )
    if foreign > 0.25 or load_before[0] > 0.5:
        print("note: other work was running on this machine: the figures may be noisy.")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small corpus (100 CT, 200 small): a smoke run")
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        help="generate the corpus here and reuse it on later runs (default: a temp dir, removed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs) at the end")
    parser.add_argument(
        "--output", type=Path, help="JSON result file (default: bench/results/dimse-<ts>.json)"
    )
    args = parser.parse_args(argv)
    if not Path(SIMRAL).exists():
        parser.error(f"{SIMRAL} not found: run with the project's virtualenv (.venv/bin/python)")
    for tool in ("storescu", "storescp", "movescu"):
        if not (DCMTK / tool).exists():
            parser.error(f"{DCMTK / tool} not found: install dcmtk (make test-deps)")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    report = run(args)
    write_results(report, args.output, "dimse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
