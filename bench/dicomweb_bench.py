#!/usr/bin/env python3
"""DICOMweb benchmark: simral next to Orthanc + its DICOMweb plugin on the same corpus, in the same run.

Not a test: there are no thresholds. It prints absolute figures and a ratio per row, oriented so that
>= 1.0 means simral does better (simral/Orthanc for throughputs, Orthanc/simral for latencies and memory):
WADO-RS series retrieve (cold and warm), QIDO-RS latency (studies by PatientID, all studies), STOW-RS
throughput (1 and 4 clients, 10 and 1 instances per request) and the peak memory of both servers while
they serve a WADO-RS retrieve of a ~2 GB study. Results also go to
``bench/results/dicomweb-<timestamp>.json``. See bench/README.md.

Run with the project's virtualenv: ``.venv/bin/python bench/dicomweb_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.message
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
import requests  # noqa: E402
from bench.common import (  # noqa: E402
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
from bench.dimse_bench import (  # noqa: E402
    git_commit,
    orthanc_version,
)
from tests.corpus import ct_series, small_instances  # noqa: E402
from tests.peers import DICOMWEB_PLUGIN, HOST, OrthancServer, free_port  # noqa: E402
from tests.simral_proc import SIMRAL, SimralProcess  # noqa: E402

DCMTK = Path("/usr/bin")  # absolute: the venv's bin/ holds pynetdicom scripts with the same names
SCU_AE = "BENCHSCU"  # only used to load the big study over DIMSE
# What Orthanc's own DICOMweb client asks for: the stored transfer syntax, no transcoding.
DICOM_PARTS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20  # bytes per read of a streamed retrieve
MB = 1e6  # MB/s and MB are decimal; RSS is in MiB (as the kernel counts it, kB = KiB)
RSS_TARGET_MB = 300.0


@dataclass(frozen=True)
class Sizes:
    series: int  # CT slices (512x512, 16 bit) of the retrieved series, also the STOW-RS payload
    qido_studies: int  # small studies (2 instances each, 2 studies per patient) for QIDO-RS
    qidos: int  # timed QIDO-RS queries by PatientID (per server)
    qido_all: int  # timed QIDO-RS queries for all studies (per server)
    warm_runs: int  # warm series retrieves after the cold one (median reported)
    big_series: int  # series of the big study
    big_per_series: int  # CT slices per series of the big study

    @property
    def big(self) -> int:
        return self.big_series * self.big_per_series


FULL = Sizes(
    series=300, qido_studies=100, qidos=200, qido_all=50, warm_runs=5, big_series=4, big_per_series=1000
)
QUICK = Sizes(
    series=100, qido_studies=50, qidos=50, qido_all=20, warm_runs=2, big_series=2, big_per_series=200
)
STOW_ROWS = ((10, 1), (10, 4), (1, 1), (1, 4))  # (instances per request, concurrent clients)


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def _median_p95(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


# --------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    series: list[Path]
    qido: list[Path]
    warmup: list[Path]
    big: list[Path]
    study_uid: str = ""  # of the series
    series_uid: str = ""
    big_study_uid: str = ""
    patient_ids: list[str] = field(default_factory=list)  # of the QIDO studies

    @property
    def mb(self) -> dict[str, float]:
        def size(paths: list[Path]) -> float:
            return round(sum(p.stat().st_size for p in paths) / MB, 1)

        return {"series": size(self.series), "qido": size(self.qido), "big": size(self.big)}


def _big_study(out_dir: Path, sizes: Sizes) -> list[Path]:
    # Same seed and patient: one study (UID derived from them), one series per series number.
    paths: list[Path] = []
    for s in range(sizes.big_series):
        paths += ct_series(
            out_dir,
            slices=sizes.big_per_series,
            patient_id="BENCHBIG",
            patient_name="BENCH^BIG",
            series_number=s + 1,
            seed=7,
        )
    return paths


def build_corpus(base: Path, sizes: Sizes) -> Corpus:
    t0 = time.perf_counter()
    series = reuse_generated(
        base / f"web-ct{sizes.series}",
        sizes.series,
        lambda d: ct_series(d, slices=sizes.series, patient_id="BENCHWEB", patient_name="BENCH^WEB", seed=3),
    )
    n_qido = 2 * sizes.qido_studies
    qido = reuse_generated(
        base / f"qido{sizes.qido_studies}",
        n_qido,
        lambda d: small_instances(d, count=n_qido, per_series=2, studies=sizes.qido_studies, seed=5),
    )
    warmup = reuse_generated(
        base / "web-warmup",
        6,
        lambda d: (
            ct_series(d, slices=2, patient_id="WARMUP", patient_name="WARM^UP", seed=9)
            + small_instances(d, count=4, seed=9)
        ),
    )
    big = reuse_generated(
        base / f"big{sizes.big_series}x{sizes.big_per_series}", sizes.big, lambda d: _big_study(d, sizes)
    )
    corpus = Corpus(series=series, qido=qido, warmup=warmup, big=big)
    head = pydicom.dcmread(series[0], stop_before_pixels=True)
    corpus.study_uid, corpus.series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    corpus.big_study_uid = str(pydicom.dcmread(big[0], stop_before_pixels=True).StudyInstanceUID)
    corpus.patient_ids = sorted(
        {str(pydicom.dcmread(p, specific_tags=["PatientID"]).PatientID) for p in qido}
    )
    patients = len(corpus.patient_ids)
    log(f"corpus ready in {time.perf_counter() - t0:.1f} s: {corpus.mb} MB, {patients} patients")
    return corpus


# --------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """One DICOMweb server under test."""

    name: str
    root: str  # .../dicom-web
    ae: str
    dicom_port: int
    pid: Callable[[], int]  # current process (changes on restart)
    count: Callable[[], int]  # instances stored
    restart: Callable[[], None]
    log_tail: Callable[[], str]


#: The bearer token of simral's bench user (Orthanc, without authentication, ignores the header).
AUTH_HEADERS: dict[str, str] = {}


def _http() -> httpx.Client:
    # loopback only, whatever *_proxy says
    return httpx.Client(timeout=600, trust_env=False, headers=AUTH_HEADERS)


def wait_dicomweb(root: str, timeout: float = 60) -> None:
    """Wait until QIDO-RS on ``root`` answers (200 or 204)."""
    deadline = time.monotonic() + timeout
    last = ""
    with _http() as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(root + "/studies", params={"limit": "1"}, headers={"Accept": DICOM_JSON})
                if r.status_code in (200, 204):
                    return
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
    raise TimeoutError(f"{root}/studies did not answer within {timeout:.0f} s: {last}")


@contextlib.contextmanager
def simral_server(base: Path, tag: str) -> Iterator[Server]:
    """A fresh ``simral serve`` on its embedded defaults (SQLite + filesystem) in ``base/tag``."""
    proc = SimralProcess(base / f"simral-{tag}", extra_env={"SIMRAL_WORKERS": "0"})
    proc.add_node("bench", SCU_AE, 104)
    AUTH_HEADERS.update(proc.auth_headers)  # DICOMweb needs a token (or a session)
    root = f"http://{HOST}:{proc.http_port}/dicom-web"
    status = f"http://{HOST}:{proc.http_port}/api/status"

    def pid() -> int:
        assert proc.proc is not None
        return proc.proc.pid

    def count() -> int:
        with _http() as client:
            return int(client.get(status).json()["instances"])

    def restart() -> None:
        proc.stop()
        proc.start()
        wait_dicomweb(root)

    proc.start()
    try:
        wait_dicomweb(root)
        yield Server("simral", root, proc.ae_title, proc.dicom_port, pid, count, restart, proc.log_tail)
    except BaseException:
        log(f"simral log tail:\n{proc.log_tail()}")
        raise
    finally:
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


@contextlib.contextmanager
def orthanc_server() -> Iterator[Server]:
    """A fresh Orthanc (Debian package, SQLite index, SyncStorageArea) with its DICOMweb plugin."""
    with OrthancServer(
        aet="ORTHANC", plugins=[DICOMWEB_PLUGIN], extra_config={"DicomWeb": {"Enable": True}}
    ) as server:

        def pid() -> int:
            assert server.proc is not None
            return server.proc.pid

        def restart() -> None:
            server.stop()
            server.start()
            wait_dicomweb(root)

        root = f"{server.http_url}/dicom-web"
        try:
            wait_dicomweb(root)
            yield Server(
                "orthanc",
                root,
                server.aet,
                server.dicom_port,
                pid,
                lambda: int(server.rest_get("/statistics")["CountInstances"]),
                restart,
                server.log_tail,
            )
        except BaseException:
            log(f"Orthanc log tail:\n{server.log_tail()}")
            raise


# --------------------------------------------------------------------------------------------- STOW-RS


def stow_bodies(files: Sequence[Path], per_request: int) -> tuple[str, list[bytes]]:
    """(Content-Type, request bodies): ``per_request`` Part 10 files per multipart/related body."""
    boundary = f"simral-bench-{uuid.uuid4().hex}"
    bodies = []
    for i in range(0, len(files), per_request):
        chunks = []
        for path in files[i : i + per_request]:
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes()]
            chunks.append(b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        bodies.append(b"".join(chunks))
    return f'multipart/related; type="application/dicom"; boundary={boundary}', bodies


def stow(server: Server, content_type: str, bodies: Sequence[bytes], clients: int) -> float:
    """POST ``bodies`` to ``/studies`` from ``clients`` concurrent clients; seconds until the last answer."""
    headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
    shares = [
        list(bodies[i * len(bodies) // clients : (i + 1) * len(bodies) // clients]) for i in range(clients)
    ]
    start = threading.Barrier(clients + 1)
    errors: list[str] = []

    def client(share: list[bytes]) -> None:
        with _http() as http:
            start.wait()
            for body in share:
                try:
                    r = http.post(server.root + "/studies", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    return
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:1000]}")
                    return

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{server.name}: STOW-RS failed: {errors[0]}")
    return seconds


def timed_stow(server: Server, files: Sequence[Path], per_request: int, clients: int) -> dict[str, Any]:
    content_type, bodies = stow_bodies(files, per_request)
    before = server.count()
    os.sync()  # no write-back of earlier runs' dirty pages during the measurement
    cpu0 = cpu_seconds(server.pid())
    seconds = stow(server, content_type, bodies, clients)
    cpu = cpu_seconds(server.pid()) - cpu0
    stored = server.count() - before
    if stored != len(files):
        raise RuntimeError(f"{server.name}: {stored} of {len(files)} instances stored")
    return {
        "seconds": round(seconds, 3),
        "instances_per_s": round(_rate(len(files), seconds), 2),
        "requests": len(bodies),
        "server_cpu_s": round(cpu, 2),
    }


def load(server: Server, files: Sequence[Path]) -> None:
    """Store ``files`` untimed with STOW-RS (10 per request, one client) and check they all arrived."""
    before = server.count()
    content_type, bodies = stow_bodies(files, 10)
    stow(server, content_type, bodies, 1)
    if server.count() - before != len(files):
        raise RuntimeError(f"{server.name}: {server.count() - before} of {len(files)} instances stored")


# --------------------------------------------------------------------------------------------- QIDO-RS


def _matches(response: httpx.Response, what: str) -> int:
    if response.status_code == 204:
        return 0
    if response.status_code != 200:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return len(response.json())


def qido_latency(server: Server, queries: Sequence[dict[str, str]], repeats: int) -> dict[str, Any]:
    """``repeats`` study-level QIDO-RS requests over one keep-alive connection (10 untimed first)."""
    latencies: list[float] = []
    per_query: dict[str, set[int]] = {}
    cpu0 = cpu_seconds(server.pid())
    with _http() as client:
        for i in range(repeats + 10):
            params = queries[i % len(queries)]
            t0 = time.perf_counter()
            r = client.get(server.root + "/studies", params=params, headers={"Accept": DICOM_JSON})
            n = _matches(r, f"{server.name} QIDO {params}")  # the JSON is parsed inside the timing
            elapsed = time.perf_counter() - t0
            if i >= 10:
                latencies.append(elapsed * 1000)
                per_query.setdefault(json.dumps(params), set()).add(n)
    cpu = cpu_seconds(server.pid()) - cpu0
    median, p95 = _median_p95(latencies)
    return {
        "queries": len(latencies),
        "matches_per_query": {k: sorted(v) for k, v in sorted(per_query.items())},
        "median_ms": round(median, 3),
        "p95_ms": round(p95, 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "server_cpu_ms_per_query": round(1000 * cpu / (repeats + 10), 3),
    }


# --------------------------------------------------------------------------------------------- WADO-RS


def _boundary(content_type: str) -> bytes:
    msg = email.message.Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if msg.get_content_type() != "multipart/related" or not isinstance(boundary, str) or not boundary:
        raise RuntimeError(f"not a multipart/related answer: Content-Type {content_type!r}")
    return boundary.encode("ascii")


class PartCounter:
    """Counts the parts of a streamed multipart body without keeping it (delimiters across chunks too)."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.close = b"--" + boundary + b"--"
        self.tail = b"\r\n"  # the last len(delimiter) - 1 bytes; the first delimiter has no CRLF before it
        self.last = b""  # the last bytes of the body, for the closing delimiter
        self.hits = 0
        self.bytes = 0

    def feed(self, chunk: bytes) -> None:
        keep = len(self.delimiter) - 1
        self.bytes += len(chunk)
        # Delimiters inside the chunk, plus the one that may straddle the previous chunk and this one.
        self.hits += chunk.count(self.delimiter) + (self.tail + chunk[:keep]).count(self.delimiter)
        self.tail = (self.tail + chunk)[-keep:] if len(chunk) < keep else chunk[-keep:]
        self.last = (
            (self.last + chunk)[-2 * len(self.close) :]
            if len(chunk) < 2 * len(self.close)
            else chunk[-2 * len(self.close) :]
        )

    @property
    def parts(self) -> int:
        if self.close not in self.last:
            raise RuntimeError("multipart body without its closing delimiter")
        return self.hits - 1  # the closing delimiter is not a part


def retrieve(session: requests.Session, url: str, pid: int | None = None) -> dict[str, Any]:
    """Stream a WADO-RS retrieve, counting bytes and parts; seconds from request to last byte."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    headers = {"Accept": DICOM_PARTS, "Accept-Encoding": "identity"}
    with session.get(url, headers=headers, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status_code}: {r.text[:1000]}")
        counter = PartCounter(_boundary(r.headers["Content-Type"]))
        for chunk in r.raw.stream(CHUNK, decode_content=False):
            counter.feed(chunk)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    return {
        "seconds": round(seconds, 3),
        "bytes": counter.bytes,
        "parts": counter.parts,
        "mb_per_s": round(_rate(counter.bytes / MB, seconds), 1),
        "server_cpu_s": round(cpu, 2),
    }


def _session() -> requests.Session:
    # requests (urllib3) reads a streamed body about 3x faster than httpx here: see bench/README.md.
    session = requests.Session()
    session.trust_env = False
    session.headers.update(AUTH_HEADERS)
    return session


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache (root only); False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def series_retrieve(server: Server, corpus: Corpus, warm_runs: int) -> dict[str, Any]:
    """Cold (just restarted, page cache dropped) then ``warm_runs`` warm retrieves of the series."""
    url = f"{server.root}/studies/{corpus.study_uid}/series/{corpus.series_uid}"
    server.restart()
    dropped = drop_page_cache()
    runs = []
    with _session() as session:
        for _ in range(1 + warm_runs):
            run = retrieve(session, url, server.pid())
            if run["parts"] != len(corpus.series):
                raise RuntimeError(f"{server.name}: {run['parts']} parts, {len(corpus.series)} expected")
            runs.append(run)
    warm = statistics.median(r["mb_per_s"] for r in runs[1:])
    return {"page_cache_dropped": dropped, "cold": runs[0], "warm_runs": runs[1:], "warm_mb_per_s": warm}


_SENDFILE_SERVER = """
import os, socket, sys
path, port, ctype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size = os.path.getsize(path)
srv = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            more = conn.recv(65536)
            if not more:
                break
            data += more
        head = (f"HTTP/1.1 200 OK\\r\\nContent-Type: {ctype}\\r\\nContent-Length: {size}\\r\\n"
                "Connection: close\\r\\n\\r\\n")
        conn.sendall(head.encode())
        with open(path, "rb") as f:
            conn.sendfile(f)
"""


def client_max(work: Path, files: Sequence[Path], runs: int) -> dict[str, Any]:
    """The same retrieve from a trivial server that sendfile()s a prepared body: the client's ceiling."""
    content_type, (body,) = stow_bodies(files, len(files))
    path = work / "client-max.body"
    path.write_bytes(body)
    del body
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SENDFILE_SERVER, str(path), str(port), content_type],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        with _session() as session:
            measured = [retrieve(session, f"http://{HOST}:{port}/x") for _ in range(1 + runs)]
    finally:
        proc.kill()
        proc.wait()
        path.unlink()
    if any(r["parts"] != len(files) for r in measured):
        raise RuntimeError("client max: part count mismatch")
    return {"runs": measured, "mb_per_s": statistics.median(r["mb_per_s"] for r in measured[1:])}


# --------------------------------------------------------------------------------------------- memory


class TreeMemory:
    """Samples a process tree every ``interval`` s: largest sum of VmHWM, VmRSS and Pss over the tree.

    Pss (proportional set size) counts a page shared by n processes as 1/n in each: the honest sum
    for simral's forked workers, which share the libraries and start-up objects of their parent.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.hwm_kb = 0
        self.rss_kb = 0
        self.pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def sample(self) -> None:
        tree = process_tree(self.pid)
        self.hwm_kb = max(self.hwm_kb, sum(status_kb(p, "VmHWM") for p in tree))
        self.rss_kb = max(self.rss_kb, sum(status_kb(p, "VmRSS") for p in tree))
        self.pss_kb = max(self.pss_kb, sum(pss_kb(p) for p in tree))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def dimse_load(server: Server, files: Sequence[Path], associations: int = 2) -> None:
    """Store ``files`` with dcmtk storescu (untimed), ``associations`` at once; check they all arrived."""
    before = server.count()
    parts = [
        files[i * len(files) // associations : (i + 1) * len(files) // associations]
        for i in range(associations)
    ]
    procs = []
    for part in parts:
        argv = [str(DCMTK / "storescu"), "-aet", SCU_AE, "-aec", server.ae, "--required", "--no-halt"]
        argv += ["--max-pdu", "131072", HOST, str(server.dicom_port), *map(str, part)]
        procs.append(
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        )
    outputs = [p.communicate(timeout=3600)[0].decode(errors="replace") for p in procs]
    stored = server.count() - before
    if stored != len(files):
        raise RuntimeError(f"{server.name}: {stored} of {len(files)} stored:\n{outputs[0][-2000:]}")


def big_retrieve(server: Server, corpus: Corpus) -> dict[str, Any]:
    """Memory of a just-restarted server while it serves the whole big study (study-level WADO-RS)."""
    server.restart()
    drop_page_cache()
    pid = server.pid()
    baseline = sum(status_kb(p, "VmRSS") for p in process_tree(pid)) / 1024
    with TreeMemory(pid) as memory, _session() as session:
        run = retrieve(session, f"{server.root}/studies/{corpus.big_study_uid}", pid)
    if run["parts"] != len(corpus.big):
        raise RuntimeError(f"{server.name}: {run['parts']} parts, {len(corpus.big)} expected")
    return {
        **run,
        "rss_after_start_mib": round(baseline, 1),
        "peak_hwm_mib": round(memory.hwm_kb / 1024, 1),
        "peak_rss_sampled_mib": round(memory.rss_kb / 1024, 1),
        "peak_pss_sampled_mib": round(memory.pss_kb / 1024, 1),
        "processes": len(process_tree(pid)),
    }


# --------------------------------------------------------------------------------------------- driver


@dataclass
class Row:
    metric: str
    simral: float
    orthanc: float
    unit: str
    better: str = "higher"  # "higher" (throughput) or "lower" (latency, memory)
    client_max: float | None = None
    target: str = "ratio >= 1.0"

    @property
    def ratio(self) -> float:
        """>= 1.0 when simral does better."""
        num, den = (self.simral, self.orthanc) if self.better == "higher" else (self.orthanc, self.simral)
        return num / den if den else float("nan")

    @property
    def met(self) -> bool:
        if self.target.startswith("< "):
            return self.simral < float(self.target.split()[1])
        return self.ratio >= 1.0


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'measurement':<50} {'unit':<6} {'simral':>9} {'Orthanc':>9} {'ratio':>7} {'client max':>11}"
        f"  {'target':<14} met"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        cmax = f"{r.client_max:>11.1f}" if r.client_max is not None else " " * 11
        print(
            f"{r.metric:<50} {r.unit:<6} {r.simral:>9.1f} {r.orthanc:>9.1f} {r.ratio:>7.2f} {cmax}"
            f"  {r.target:<14} {'yes' if r.met else 'NO'}"
        )
    print()
    print(
        "ratio >= 1.0 means simral does better: simral/Orthanc for MB/s and inst/s, Orthanc/simral for ms and"
    )
    print(
        "MiB. client max: the same retrieve from a trivial server that sendfile()s the body (client ceiling)."
    )


def stow_phase(
    work: Path, corpus: Corpus, report: dict[str, Any]
) -> tuple[list[Row], contextlib.ExitStack, list[Server]]:
    """One fresh pair of servers per STOW-RS row; the pair of the last row stays up (returned)."""
    rows = []
    report["stow"] = {}
    for i, (per_request, clients) in enumerate(STOW_ROWS):
        key = f"{per_request}per-request-{clients}clients"
        stack = contextlib.ExitStack()
        try:
            simral = stack.enter_context(simral_server(work, key))
            orthanc = stack.enter_context(orthanc_server())
            pair = [simral, orthanc] if i % 2 == 0 else [orthanc, simral]  # alternate who goes first
            for server in pair:
                load(server, corpus.warmup)
            result: dict[str, Any] = {
                "instances": len(corpus.series),
                "per_request": per_request,
                "clients": clients,
            }
            for server in pair:
                n = len(corpus.series)
                log(f"STOW-RS {n} CT instances, {per_request}/request, {clients} client(s) to {server.name}")
                result[server.name] = timed_stow(server, corpus.series, per_request, clients)
                log(f"  {result[server.name]}")
            report["stow"][key] = result
            rows.append(
                Row(
                    f"STOW-RS CT x{len(corpus.series)}, {per_request}/request, {clients} client(s)",
                    result["simral"]["instances_per_s"],
                    result["orthanc"]["instances_per_s"],
                    "inst/s",
                )
            )
            if i < len(STOW_ROWS) - 1:
                stack.close()
        except BaseException:
            stack.close()
            raise
    return rows, stack, [simral, orthanc]


def qido_phase(servers: Sequence[Server], corpus: Corpus, sizes: Sizes, report: dict[str, Any]) -> list[Row]:
    for server in servers:
        load(server, corpus.qido)
    report["instances_for_qido_wado"] = {s.name: s.count() for s in servers}
    by_patient = [{"PatientID": pid} for pid in corpus.patient_ids]
    results: dict[str, dict[str, Any]] = {"by_patient": {}, "all": {}}
    for server in servers:
        log(f"QIDO-RS studies by PatientID x{sizes.qidos} on {server.name}")
        results["by_patient"][server.name] = qido_latency(server, by_patient, sizes.qidos)
        log(f"  {results['by_patient'][server.name]['median_ms']} ms median")
        log(f"QIDO-RS all studies x{sizes.qido_all} on {server.name}")
        results["all"][server.name] = qido_latency(server, [{}], sizes.qido_all)
        answer = results["all"][server.name]
        log(f"  {answer['median_ms']} ms median, matches {answer['matches_per_query']}")
    report["qido"] = results
    for kind, res in results.items():
        if res["simral"]["matches_per_query"] != res["orthanc"]["matches_per_query"]:
            log(f"warning: QIDO-RS {kind}: simral and Orthanc answer different numbers of studies")
    bp, al = results["by_patient"], results["all"]
    n_all = max(max(v) for v in al["simral"]["matches_per_query"].values())
    return [
        Row(
            "QIDO-RS studies by PatientID, median",
            bp["simral"]["median_ms"],
            bp["orthanc"]["median_ms"],
            "ms",
            "lower",
        ),
        Row(
            "QIDO-RS studies by PatientID, p95",
            bp["simral"]["p95_ms"],
            bp["orthanc"]["p95_ms"],
            "ms",
            "lower",
        ),
        Row(
            f"QIDO-RS all studies ({n_all}), median",
            al["simral"]["median_ms"],
            al["orthanc"]["median_ms"],
            "ms",
            "lower",
        ),
    ]


def wado_phase(
    servers: Sequence[Server], corpus: Corpus, sizes: Sizes, work: Path, report: dict[str, Any]
) -> list[Row]:
    results: dict[str, Any] = {}
    for server in servers:
        n = len(corpus.series)
        log(f"WADO-RS series retrieve ({n} instances) on {server.name}: cold + {sizes.warm_runs} warm")
        res = results[server.name] = series_retrieve(server, corpus, sizes.warm_runs)
        log(f"  cold {res['cold']['mb_per_s']} MB/s, warm {res['warm_mb_per_s']} MB/s")
    results["client_max"] = client_max(work, corpus.series, sizes.warm_runs)
    log(f"  client max {results['client_max']['mb_per_s']} MB/s")
    report["wado_series"] = results
    s, o, cmax = results["simral"], results["orthanc"], results["client_max"]["mb_per_s"]
    cold = "cold" + ("" if s["page_cache_dropped"] else " (page cache NOT dropped)")
    n = len(corpus.series)
    return [
        Row(
            f"WADO-RS series x{n} 512x512, {cold}",
            s["cold"]["mb_per_s"],
            o["cold"]["mb_per_s"],
            "MB/s",
            client_max=cmax,
        ),
        Row(
            f"WADO-RS series x{n} 512x512, warm",
            s["warm_mb_per_s"],
            o["warm_mb_per_s"],
            "MB/s",
            client_max=cmax,
        ),
    ]


def big_phase(servers: Sequence[Server], corpus: Corpus, quick: bool, report: dict[str, Any]) -> list[Row]:
    gb = sum(p.stat().st_size for p in corpus.big) / 1e9
    for server in servers:
        log(f"loading the big study ({len(corpus.big)} instances, {gb:.2f} GB) into {server.name} (storescu)")
        dimse_load(server, corpus.big)
    results: dict[str, Any] = {"instances": len(corpus.big), "gb": round(gb, 2), "quick": quick}
    for server in servers:
        log(f"WADO-RS study retrieve of {gb:.2f} GB from {server.name} (just restarted)")
        results[server.name] = big_retrieve(server, corpus)
        log(f"  {results[server.name]}")
    report["big_study"] = results
    s, o = results["simral"], results["orthanc"]
    quick_note = " (quick)" if quick else ""
    return [
        Row(f"WADO-RS study {gb:.1f} GB, cold{quick_note}", s["mb_per_s"], o["mb_per_s"], "MB/s"),
        Row(
            f"peak memory (PSS of the process tree) serving the {gb:.1f} GB study{quick_note}",
            s["peak_pss_sampled_mib"],
            o["peak_pss_sampled_mib"],
            "MiB",
            "lower",
            target=f"< {RSS_TARGET_MB:.0f} MiB",
        ),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="simral-webbench-"))
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
            "orthanc_dicomweb": _dpkg_version("orthanc-dicomweb"),
            "httpx": httpx.__version__,
            "requests": requests.__version__,
        },
        "sizes": sizes.__dict__,
    }
    rows: list[Row] = []
    try:
        corpus = build_corpus(corpus_dir, sizes)
        report["corpus_mb"] = corpus.mb
        stow_rows, stack, servers = stow_phase(work, corpus, report)
        with stack:
            qido_rows = qido_phase(servers, corpus, sizes, report)
            rows += wado_phase(servers, corpus, sizes, work, report) + qido_rows + stow_rows
            rows += big_phase(servers, corpus, args.quick, report)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    elapsed = time.perf_counter() - started
    foreign = (
        max(0.0, (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_cpu_seconds() - own0)) / elapsed
    )
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["other_cpu_load"] = round(foreign, 2)
    report["elapsed_s"] = round(elapsed, 1)
    report["table"] = [{**r.__dict__, "ratio": round(r.ratio, 3), "met": r.met} for r in rows]
    print_table(rows)
    if args.quick:
        print(
            "--quick: smaller corpus; the big study is ~0.2 GB, not the ~2 GB study the RSS target is about."
        )
    missed = [r.metric for r in rows if not r.met]
    print(
        f"targets met: {len(rows) - len(missed)} of {len(rows)}"
        + (f"; missed: {'; '.join(missed)}" if missed else "")
    )
    cpus = os.cpu_count()
    print(f"run time {elapsed:.0f} s; CPU used by other processes meanwhile: {foreign:.2f} of {cpus} CPUs")
    if foreign > 0.25 or load_before[0] > 0.5:
        print("note: other work was running on this machine: the figures may be noisy.")
    return report


def _dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
        )
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (under 3 minutes): 100-slice series, 50 QIDO studies, a ~0.2 GB big study",
    )
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        help="generate the corpus here and reuse it on later runs (default: a temp dir, removed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs) at the end")
    parser.add_argument(
        "--output", type=Path, help="JSON result file (default: bench/results/dicomweb-<ts>.json)"
    )
    args = parser.parse_args(argv)
    if not Path(SIMRAL).exists():
        parser.error(f"{SIMRAL} not found: run with the project's virtualenv (.venv/bin/python)")
    if not Path(DICOMWEB_PLUGIN).exists():
        parser.error(f"{DICOMWEB_PLUGIN} not found: install orthanc-dicomweb (make test-deps)")
    if not (DCMTK / "storescu").exists():
        parser.error(f"{DCMTK / 'storescu'} not found: install dcmtk (make test-deps)")
    report = run(args)
    write_results(report, args.output, "dicomweb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
