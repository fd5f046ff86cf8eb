#!/usr/bin/env python3
"""Cluster ingest benchmark: C-STORE throughput of one simral node and of two nodes behind HAProxy.

Not a test: there are no thresholds. Every configuration gets a fresh database on one PostgreSQL 15
and a fresh bucket on one SeaweedFS S3 server (the cluster deployment of deploy/); the same corpus
(small 64×64 instances, then a 256×256 CT series) is sent by 4 concurrent dcmtk storescu, straight
to the node (one node) or through HAProxy (two nodes, round robin per association). Printed:
instances/s, MB/s, the ratio two nodes / one node against the issue's 1.7× target, and the CPU each
component used. A second pair of rows pins each node to its own CPU (``sched_setaffinity``, what
``taskset`` does) against one node on one CPU; Orthanc (single node) on the same corpus gives the
side-by-side ratio the other benchmarks print. Results go to ``bench/results/cluster-<ts>.json``.

Run with the project's virtualenv: ``.venv/bin/python bench/cluster_ingest_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
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
from bench.common import (  # noqa: E402
    busy_jiffies,
    cpu_seconds,
    log,
    machine_info,
    own_cpu_seconds,
    process_tree,
    reuse_generated,
    write_results,
)
from bench.dimse_bench import (  # noqa: E402
    dcmtk_version,
    git_commit,
    orthanc_version,
    split,
    store,
)
from tests.corpus import ct_series, small_instances  # noqa: E402
from tests.haproxy_peer import HaproxyPeer  # noqa: E402
from tests.peers import HOST, OrthancServer, PostgresServer, SeaweedS3, StoreSCP  # noqa: E402
from tests.simral_proc import SIMRAL, SimralProcess  # noqa: E402

SCU_AE = "BENCHSCU"
SINK_AE = "BENCHSINK"
SENDERS = 4
# The HTTP look-ups (instance counts) stay on loopback whatever *_proxy says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Sizes:
    small: int
    ct: int
    repeats: int


FULL = Sizes(small=2000, ct=300, repeats=2)
QUICK = Sizes(small=400, ct=60, repeats=1)


@dataclass
class Corpus:
    small: list[Path]
    ct: list[Path]
    warmup: list[Path]

    def mb(self, files: Sequence[Path]) -> float:
        return sum(p.stat().st_size for p in files) / 1e6


def build_corpus(base: Path, sizes: Sizes) -> Corpus:
    small = reuse_generated(
        base / f"small{sizes.small}", sizes.small, lambda d: small_instances(d, count=sizes.small, seed=3)
    )
    ct = reuse_generated(
        base / f"ct{sizes.ct}-256",
        sizes.ct,
        lambda d: ct_series(d, slices=sizes.ct, rows=256, cols=256, patient_id="CLUSTERCT", seed=3),
    )
    warmup = reuse_generated(base / "warmup", 8, lambda d: small_instances(d, count=8, per_series=4, seed=77))
    return Corpus(small, ct, warmup)


# --------------------------------------------------------------------------------------------- servers


@dataclass
class Deployment:
    """What the senders talk to, the processes whose CPU is counted, and how to count instances."""

    name: str
    ae: str
    port: int
    count: Callable[[], int]
    pids: dict[str, list[int]] = field(default_factory=dict)  # component -> root pids


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` and of its descendants to ``cpu`` (the syscall taskset uses)."""
    for process in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), {cpu})


def _status_count(node: SimralProcess, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"{node.http_url}/api/status", headers=headers)
    with _HTTP.open(request, timeout=30) as resp:
        return int(json.load(resp)["instances"])


@contextlib.contextmanager
def simral_cluster(
    base: Path,
    tag: str,
    pg: PostgresServer,
    s3: SeaweedS3,
    *,
    nodes: int,
    pin: bool,
    workers: int,
) -> Iterator[Deployment]:
    """``nodes`` ``simral serve`` processes on a fresh database and bucket; HAProxy in front of two."""
    database = f"bench_{tag.replace('-', '_')}"
    bucket = f"bench-{tag}"
    s3.create_bucket(bucket)
    env = {
        "SIMRAL_DATABASE_URL": pg.create_database(database),
        "SIMRAL_STORAGE": "s3",
        "SIMRAL_S3_ENDPOINT_URL": s3.endpoint_url,
        "SIMRAL_S3_BUCKET": bucket,
        "SIMRAL_S3_ACCESS_KEY": s3.access_key,
        "SIMRAL_S3_SECRET_KEY": s3.secret_key,
        "SIMRAL_S3_REGION": s3.region,
        "SIMRAL_WORKERS": str(workers),
        "SIMRAL_LOG_LEVEL": "WARNING",
    }
    procs = [SimralProcess(base / f"{tag}-node{i}", env=env) for i in range(nodes)]
    procs[0].add_node("bench", SCU_AE, 104)  # the modality (organisation of the test directory)
    headers = procs[0].auth_headers
    balancer: HaproxyPeer | None = None
    try:
        for i, proc in enumerate(procs):
            proc.start(timeout=120)
            assert proc.proc is not None
            if pin:
                _pin(proc.proc.pid, i % (os.cpu_count() or 1))
        pids = {"simral": [p.proc.pid for p in procs if p.proc is not None]}
        if nodes > 1:
            balancer = HaproxyPeer([(f"node{i}", p.dicom_port, p.http_port) for i, p in enumerate(procs)])
            balancer.start()
            assert balancer.proc is not None
            pids["haproxy"] = [balancer.proc.pid]
            ae, port = procs[0].ae_title, balancer.dicom_port
        else:
            ae, port = procs[0].ae_title, procs[0].dicom_port
        yield Deployment(tag, ae, port, lambda: _status_count(procs[0], headers), pids)
    except BaseException:
        for proc in procs:
            log(f"{proc.data_dir.name} log tail:\n{proc.log_tail()}")
        raise
    finally:
        if balancer is not None:
            balancer.close()
        for proc in procs:
            proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)
        pg.drop_database(database)


@contextlib.contextmanager
def orthanc_node() -> Iterator[Deployment]:
    """Orthanc (Debian package) as the other benchmarks run it: SQLite index, filesystem storage."""
    with OrthancServer(aet="ORTHANC", modalities={"bench": (SCU_AE, HOST, 104)}) as server:
        assert server.proc is not None
        yield Deployment(
            "orthanc",
            server.aet,
            server.dicom_port,
            lambda: int(server.rest_get("/statistics")["CountInstances"]),
            {"orthanc": [server.proc.pid]},
        )


# --------------------------------------------------------------------------------------------- measurement


class CpuAccount:
    """CPU seconds of each component's process trees over a measurement, and of other work."""

    def __init__(self, components: dict[str, list[int]]) -> None:
        self.components = components
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.components.items()}
        out["_busy"] = busy_jiffies() / os.sysconf("SC_CLK_TCK")
        out["_own"] = own_cpu_seconds()  # this process and the storescu it waited for
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        delta = {k: end[k] - self._start[k] for k in end}
        known = sum(v for k, v in delta.items() if not k.startswith("_"))
        out = {k: round(v, 2) for k, v in delta.items() if not k.startswith("_")}
        out["senders_and_bench"] = round(delta["_own"], 2)
        out["other"] = round(max(0.0, delta["_busy"] - known - delta["_own"]), 2)
        return out


def timed_send(
    target: Deployment, files: Sequence[Path], shared: dict[str, list[int]], mb: float
) -> dict[str, Any]:
    """Send ``files`` in 4 contiguous parts over 4 concurrent storescu; check every one was stored."""
    before = target.count()
    os.sync()
    cpu = CpuAccount({**target.pids, **shared})
    cpu.start()
    seconds = store(target.ae, target.port, split(files, SENDERS))
    used = cpu.stop()
    stored = target.count() - before
    if stored != len(files):
        raise RuntimeError(f"{target.name}: {stored} of {len(files)} instances stored")
    return {
        "seconds": round(seconds, 3),
        "instances_per_s": round(len(files) / seconds, 1),
        "mb_per_s": round(mb / seconds, 1),
        "cpu_s": used,
    }


def measure(target: Deployment, corpus: Corpus, shared: dict[str, list[int]]) -> dict[str, Any]:
    store(target.ae, target.port, [corpus.warmup])  # untimed: pools, caches, first S3 volume
    out: dict[str, Any] = {}
    for kind, files in (("small", corpus.small), ("ct", corpus.ct)):
        log(f"  {target.name}: {len(files)} {kind} instances, {SENDERS} storescu")
        out[kind] = timed_send(target, files, shared, corpus.mb(files))
        result = out[kind]
        log(f"    {result['instances_per_s']} inst/s, {result['mb_per_s']} MB/s, CPU s {result['cpu_s']}")
    return out


# --------------------------------------------------------------------------------------------- driver

CONFIGURATIONS: tuple[tuple[str, int, bool], ...] = (
    ("1node", 1, False),
    ("2nodes", 2, False),
    ("1node-1cpu", 1, True),
    ("2nodes-1cpu-each", 2, True),
)


def _combine(runs: list[dict[str, Any]], kind: str, instances: int, mb: float) -> dict[str, Any]:
    """The mean time over the runs of a configuration, its rates and the mean CPU accounts."""
    seconds = sum(r[kind]["seconds"] for r in runs) / len(runs)
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "instances_per_s": round(instances / seconds, 1),
        "mb_per_s": round(mb / seconds, 1),
        "runs_s": [r[kind]["seconds"] for r in runs],
    }
    if "cpu_s" in runs[0][kind]:
        keys = runs[0][kind]["cpu_s"]
        out["cpu_s"] = {k: round(sum(r[kind]["cpu_s"][k] for r in runs) / len(runs), 2) for k in keys}
    return out


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    print()
    header = f"{'configuration':<44} {'small inst/s':>12} {'MB/s':>6} {'CT inst/s':>10} {'MB/s':>6}"
    print(header)
    print("-" * len(header))
    labels = {
        "1node": "1 simral node (PostgreSQL + S3)",
        "2nodes": "2 simral nodes behind HAProxy",
        "1node-1cpu": "1 node pinned to 1 CPU",
        "2nodes-1cpu-each": "2 nodes behind HAProxy, 1 CPU each",
        "orthanc": "Orthanc 1 node (SQLite + filesystem)",
        "sink": "sender max (storescp --ignore)",
    }
    for name, label in labels.items():
        if name in results:
            small, ct = results[name]["small"], results[name]["ct"]
            print(
                f"{label:<44} {small['instances_per_s']:>12.1f} {small['mb_per_s']:>6.1f} "
                f"{ct['instances_per_s']:>10.1f} {ct['mb_per_s']:>6.1f}"
            )
    print()
    print("CPU ms per small instance (process trees; 'other': work not started by this benchmark):")
    for name, label in labels.items():
        cpu = results.get(name, {}).get("small", {}).get("cpu_s")
        if cpu:
            n = report["corpus"]["instances"]["small"]
            parts = ", ".join(f"{k} {1000 * v / n:.1f}" for k, v in cpu.items())
            print(f"  {label:<42} {parts}")
    print()
    for title, ratio in report["ratios"].items():
        target = "  (target >= 1.7)" if title.startswith("2 nodes") else ""
        print(f"{title:<58} small {ratio['small']:.2f}   CT {ratio['ct']:.2f}{target}")
    print(
        f"\ncorpus: {report['corpus']['instances']['small']} small 64x64 instances "
        f"({report['corpus']['mb']['small']} MB), {report['corpus']['instances']['ct']} CT 256x256 slices "
        f"({report['corpus']['mb']['ct']} MB); {SENDERS} concurrent storescu; "
        f"mean time of {report['sizes']['repeats']} run(s) per simral configuration"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(sizes.small, sizes.ct, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="simral-cluster-bench-"))
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
        },
        "sizes": sizes.__dict__,
        "workers_per_node": args.workers,
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        corpus = build_corpus(args.corpus_dir or work / "corpus", sizes)
        sets = {"small": corpus.small, "ct": corpus.ct}
        counts = {k: len(v) for k, v in sets.items()}
        megabytes = {k: corpus.mb(v) for k, v in sets.items()}
        report["corpus"] = {"instances": counts, "mb": {k: round(v, 1) for k, v in megabytes.items()}}
        with (
            PostgresServer(max_connections=200) as pg,
            SeaweedS3() as s3,
            StoreSCP(aet=SINK_AE, fork=True, extra_args=["--ignore"]) as sink,
        ):
            postmaster = pg._postmaster_pid()
            assert postmaster is not None and s3.proc is not None
            shared = {"postgres": [postmaster], "s3": [s3.proc.pid]}
            for repeat in range(sizes.repeats):
                order = CONFIGURATIONS if repeat % 2 == 0 else tuple(reversed(CONFIGURATIONS))
                for name, nodes, pin in order:
                    log(f"{name} (run {repeat + 1} of {sizes.repeats})")
                    with simral_cluster(
                        work, f"{name}-{repeat}", pg, s3, nodes=nodes, pin=pin, workers=args.workers
                    ) as target:
                        runs.setdefault(name, []).append(measure(target, corpus, shared))
            log("Orthanc, single node")
            with orthanc_node() as orthanc:
                runs["orthanc"] = [measure(orthanc, corpus, {})]
            log("sender max: storescp --ignore")
            sink_run: dict[str, Any] = {}
            for kind, files in (("small", corpus.small), ("ct", corpus.ct)):
                seconds = store(sink.aet, sink.port, split(files, SENDERS))
                sink_run[kind] = {
                    "seconds": round(seconds, 3),
                    "instances_per_s": round(len(files) / seconds, 1),
                    "mb_per_s": round(megabytes[kind] / seconds, 1),
                }
            runs["sink"] = [sink_run]
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = {name: {k: _combine(r, k, counts[k], megabytes[k]) for k in sets} for name, r in runs.items()}
    report["runs"] = runs
    report["results"] = results

    def ratio(a: str, b: str) -> dict[str, float]:
        return {
            k: round(results[a][k]["instances_per_s"] / results[b][k]["instances_per_s"], 2)
            for k in ("small", "ct")
        }

    report["ratios"] = {
        "2 nodes / 1 node": ratio("2nodes", "1node"),
        "2 nodes (1 CPU each) / 1 node (1 CPU)": ratio("2nodes-1cpu-each", "1node-1cpu"),
        "1 simral node / Orthanc": ratio("1node", "orthanc"),
        "2 simral nodes / Orthanc": ratio("2nodes", "orthanc"),
    }
    elapsed = time.perf_counter() - started
    foreign = max(0.0, (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_cpu_seconds() - own0))
    report["elapsed_s"] = round(elapsed, 1)
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_table(report)
    print(
        f"run time {elapsed:.0f} s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    # ``foreign`` counts the servers too (they are not this process's waited-for children): see the
    # per-run CPU accounts in the JSON for the CPU of other work during each measurement.
    report["machine"]["busy_cpus_during_run"] = round(foreign / elapsed, 2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="400 small instances, 60 CT slices, 1 run")
    parser.add_argument("--repeats", type=int, help="runs of each simral configuration (default 2)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="SIMRAL_WORKERS of each node (default 1: a node is one process)",
    )
    parser.add_argument("--corpus-dir", type=Path, help="generate the corpus here and reuse it later")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (node logs) at the end")
    parser.add_argument(
        "--output", type=Path, help="JSON result file (default: bench/results/cluster-<ts>.json)"
    )
    args = parser.parse_args(argv)
    if not Path(SIMRAL).exists():
        parser.error(f"{SIMRAL} not found: run with the project's virtualenv (.venv/bin/python)")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    report = run(args)
    write_results(report, args.output, "cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
