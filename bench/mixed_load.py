#!/usr/bin/env python3
"""Sustained mixed load on one ``simral serve`` (issue 10, item 4): C-STORE from 4 sites, QIDO-RS /
WADO-RS from 10 viewer sessions, HL7 ADT and teleradiology orders over MLLP, all at once for
``--minutes`` (10 by default, 2 with ``--quick``).

Pass criteria, checked at the end and stated in the report: no error of any kind (client side and in
the server's own ``/metrics`` failure counters), the ``/metrics`` totals equal to what the clients
did, and the RSS of the server's process tree at the end at most ``--rss-bound`` (20 %) above its
value after the warm-up (the first 20 % of the run). Latency percentiles per operation are reported.
Results go to ``bench/results/mixed-load-<timestamp>.json``. Exit status 1 when a criterion fails.

Run with the project's virtualenv: ``.venv/bin/python bench/mixed_load.py [--quick | --minutes N]``
(``make load``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import logging
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from bench.common import (  # noqa: E402
    busy_jiffies,
    cpu_seconds,
    log,
    machine_info,
    own_cpu_seconds,
    process_tree,
    pss_kb,
    status_kb,
    write_results,
)
from bench.dimse_bench import (  # noqa: E402
    git_commit,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    ComputedRadiographyImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from tests.corpus import small_instances  # noqa: E402
from tests.peers import free_port  # noqa: E402
from tests.simral_proc import SimralProcess  # noqa: E402
from tests.test_hl7_adt import adt_upsert  # noqa: E402
from tests.test_teleradiology_requests import (  # noqa: E402
    CHX_IPP_OID,
    RIS_APP,
    RIS_FACILITY,
    RisListener,
    flux1,
    ihe_omi,
)

from simral.dimse import sending  # noqa: E402

#: The four sending sites: (organisation, modality AE title). CHX also has the RIS and the
#: teleradiology contract (its messages come from tests/test_teleradiology_requests.py).
SITES = (("CHA", "MOD_CHA"), ("CHB", "MOD_CHB"), ("CHC", "MOD_CHC"), ("CHX", "MOD_CHX"))
GROUP = "TLRG"
PASSWORD = "Charge-Mixte-2026!x"
PATIENTS_PER_SITE = 5
VT, FS, CR = b"\x0b", b"\x1c", b"\r"
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
MAX_PDU = 131072
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as tests/corpus.py


@dataclass(frozen=True)
class Rates:
    """The offered load (stated in the report)."""

    store_batch: int = 5  # instances per association (one new series of a new study)
    store_interval: float = 2.0  # seconds between the associations of one site
    viewers: int = 10
    think: tuple[float, float] = (0.5, 1.5)  # seconds between two steps of a viewer session
    adt_interval: float = 1.0  # one ADT message (A28 or A31) per second
    order_interval: float = 2.0  # one ORM^O01 / OMI^O23 message every 2 s

    def describe(self) -> dict[str, Any]:
        sites = len(SITES)
        return {
            "c_store": f"{sites} sites x {self.store_batch} instances (64x64, one new study) per association "
            f"every {self.store_interval:g} s = {sites * self.store_batch / self.store_interval:g} inst/s",
            "viewers": f"{self.viewers} sessions: QIDO studies by PatientID -> series -> series metadata "
            f"-> every frame of that series, think time {self.think[0]:g}-{self.think[1]:g} s between steps",
            "hl7_adt": f"A28 (new IPP) then A31 (same IPP), 1 message every {self.adt_interval:g} s",
            "hl7_orders": f"ORM^O01 NW (flux 1), OMI^O23 NW, OMI^O23 CA in turn, 1 message every "
            f"{self.order_interval:g} s",
        }


# --------------------------------------------------------------------------------------------- record


class Recorder:
    """Thread-safe latencies and errors per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, list[str]] = defaultdict(list)

    def ok(self, op: str, seconds: float, n: int = 1) -> None:
        with self._lock:
            self.latencies[op].append(seconds * 1000)
            self.counts[op] += n

    def count(self, op: str, n: int = 1) -> None:
        with self._lock:
            self.counts[op] += n

    def error(self, op: str, detail: str) -> None:
        with self._lock:
            self.errors[op] += 1
            if len(self.error_samples[op]) < 5:
                self.error_samples[op].append(detail[:500])
        log(f"ERROR {op}: {detail[:300]}")

    @contextlib.contextmanager
    def timed(self, op: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:  # every failure is counted, whatever it is
            self.error(op, repr(exc))
            raise
        self.ok(op, time.perf_counter() - t0)

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for op, values in sorted(self.latencies.items()):
            ordered = sorted(values)

            def pick(q: float, ordered: list[float] = ordered) -> float:
                return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

            out[op] = {
                "n": len(ordered),
                "median_ms": round(statistics.median(ordered), 2),
                "p95_ms": pick(0.95),
                "p99_ms": pick(0.99),
                "max_ms": round(ordered[-1], 2),
            }
        return out


class Pacer:
    """Fixed-rate ticks (no catch-up burst when late; the lag is kept)."""

    def __init__(self, interval: float, stop: threading.Event, offset: float = 0.0) -> None:
        self.interval, self.stop = interval, stop
        self.next = time.monotonic() + offset
        self.late = 0

    def wait(self) -> bool:
        """Sleep until the next tick; False once stopping."""
        delay = self.next - time.monotonic()
        if delay < 0:
            self.late += 1
            self.next = time.monotonic()
        elif self.stop.wait(delay):
            return False
        self.next += self.interval
        return not self.stop.is_set()


# --------------------------------------------------------------------------------------------- C-STORE


class Site:
    """A modality of one organisation: new studies of its patients, ``batch`` instances each."""

    def __init__(self, index: int, organisation: str, ae_title: str, templates: Sequence[Dataset]) -> None:
        self.index, self.organisation, self.ae_title = index, organisation, ae_title
        self.templates = templates
        self.batches = 0
        self.patients = [f"LOAD{index}-{p:02d}" for p in range(PATIENTS_PER_SITE)]

    def next_batch(self, size: int) -> list[Dataset]:
        """One new study (one series of ``size`` instances) of the next patient in turn."""
        k = self.batches
        self.batches += 1
        p = k % PATIENTS_PER_SITE
        template = self.templates[k % len(self.templates)]
        study_uid = generate_uid(UID_PREFIX, [f"load-study-{self.index}-{k}"])
        series_uid = generate_uid(UID_PREFIX, [f"load-series-{self.index}-{k}"])
        out = []
        for i in range(size):
            ds = copy.deepcopy(template)
            ds.PatientID = self.patients[p]
            ds.PatientName = f"CHARGE^SITE{self.index}^P{p}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid(UID_PREFIX, [f"load-instance-{self.index}-{k}-{i}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AccessionNumber = f"L{self.index}{k:07d}"
            ds.StudyID = str(k)
            ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
            out.append(ds)
        return out


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def storage_ae(ae_title: str) -> AE:
    # pynetdicom 3.0.4's requestor can have its own reactor take the C-STORE-RSP meant for the
    # sending thread under CPU load (then "status None" after the DIMSE timeout, the instance
    # stored all the same): the load client uses the fix simral's own SCU uses.
    sending.install()
    ae = AE(ae_title=ae_title)
    for sop_class in (SecondaryCaptureImageStorage, MRImageStorage, ComputedRadiographyImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def send_batch(site: Site, ae: AE, port: int, server_ae: str, size: int, rec: Recorder) -> None:
    """One association: C-STORE every instance of a new study, then release."""
    batch = site.next_batch(size)
    t0 = time.perf_counter()
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=server_ae, max_pdu=MAX_PDU, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        rec.error("c-store-association", f"{site.ae_title}: association refused or aborted")
        return
    try:
        for ds in batch:
            t1 = time.perf_counter()
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                rec.error("c-store", f"{site.ae_title}: status {code if code is None else hex(code)}")
            else:
                rec.ok("c-store", time.perf_counter() - t1)
    finally:
        assoc.release()
    rec.ok("c-store-association", time.perf_counter() - t0)


def store_loop(
    site: Site, port: int, server_ae: str, rates: Rates, rec: Recorder, stop: threading.Event, offset: float
) -> None:
    ae = storage_ae(site.ae_title)
    pacer = Pacer(rates.store_interval, stop, offset)
    while pacer.wait():
        try:
            send_batch(site, ae, port, server_ae, rates.store_batch, rec)
        except Exception as exc:
            rec.error("c-store-association", f"{site.ae_title}: {exc!r}")
    rec.count(f"late-ticks:c-store:{site.ae_title}", pacer.late)


# --------------------------------------------------------------------------------------------- viewers


def viewer_loop(
    number: int, root: str, token: str, site: Site, rates: Rates, rec: Recorder, stop: threading.Event
) -> None:
    """A viewer session: study list of a patient -> series -> series metadata -> frames; repeat."""
    rng = random.Random(number)
    headers = {"Authorization": f"Bearer {token}", "Accept": DICOM_JSON}

    def think() -> bool:
        return not stop.wait(rng.uniform(*rates.think))

    def get(op: str, url: str, **kw: Any) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = client.get(url, **kw)
        except httpx.HTTPError as exc:
            rec.error(op, repr(exc))
            return None
        if r.status_code not in (200, 204):
            rec.error(op, f"HTTP {r.status_code}: {r.text[:300]}")
            return None
        rec.ok(op, time.perf_counter() - t0)
        return r

    with httpx.Client(timeout=60, trust_env=False, headers=headers) as client:

        def browse() -> None:
            patient = rng.choice(site.patients)
            r = get("qido-studies", f"{root}/studies", params={"PatientID": patient})
            if r is None or r.status_code == 204 or not r.json() or not think():
                return
            study = rng.choice(r.json())["0020000D"]["Value"][0]
            r = get("qido-series", f"{root}/studies/{study}/series")
            if r is None or r.status_code == 204 or not think():
                return
            series = r.json()[0]["0020000E"]["Value"][0]
            r = get("wado-metadata", f"{root}/studies/{study}/series/{series}/metadata")
            if r is None or not think():
                return
            for instance in r.json():
                sop = instance["00080018"]["Value"][0]
                url = f"{root}/studies/{study}/series/{series}/instances/{sop}/frames/1"
                frame = get("wado-frame", url, headers={"Accept": FRAMES_ACCEPT})
                if frame is not None and not frame.content:
                    rec.error("wado-frame", "empty body")

        while think():
            try:
                browse()
            except (ValueError, LookupError) as exc:  # an answer without what a viewer needs
                rec.error("viewer-answer", repr(exc))


# --------------------------------------------------------------------------------------------- HL7


class MllpClient:
    """One persistent MLLP connection (HL7 v2 MLLP, Release 2): a message, then its acknowledgement."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def exchange(self, message: bytes) -> str:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.buffer = b""
        self.sock.sendall(VT + message + FS + CR)
        while FS + CR not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                self.close()
                raise ConnectionError("connection closed before the acknowledgement")
            self.buffer += data
        block, self.buffer = self.buffer.split(FS + CR, 1)
        return block[block.index(VT) + 1 :].decode("utf-8")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def ack_code(ack: str) -> str:
    """MSA-1 of an acknowledgement (HL7 v2.5 2.14.8)."""
    for segment in ack.split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")[1]
    return "?"


def hl7_loop(
    kind: str,
    port: int,
    interval: float,
    make: Callable[[int], tuple[str, bytes]],
    rec: Recorder,
    stop: threading.Event,
) -> None:
    """Send ``make(n)`` = (operation, message) every ``interval`` seconds over one connection."""
    client = MllpClient(port)
    pacer = Pacer(interval, stop)
    n = 0
    try:
        while pacer.wait():
            op, message = make(n)
            n += 1
            t0 = time.perf_counter()
            try:
                ack = client.exchange(message)
            except (OSError, ValueError) as exc:  # ValueError: a block that is not MLLP-framed UTF-8
                client.close()
                rec.error(op, repr(exc))
                continue
            code = ack_code(ack)
            if code != "AA":
                rec.error(op, f"MSA-1 {code}: {ack[:400]!r}")
            else:
                rec.ok(op, time.perf_counter() - t0)
    finally:
        client.close()
    rec.count(f"late-ticks:{kind}", pacer.late)


def adt_message(n: int) -> tuple[str, bytes]:
    """A28 for a new IPP, then A31 for it (PAM France PID, no INS: no identity vigilance case).

    Each new IPP is another patient: its own birth name and birth date. (With the same strict
    traits for every IPP, each A28 was a suspected duplicate of all the earlier ones, one vigilance
    case per pair: its transaction grew with the run, 220 ms median at 5 min, 990 ms at 30 min, and
    held the database's write lock from the other writers: every p95 grew with it.)"""
    patient = n // 2
    ipp = f"IPP-LOAD-{patient}"
    event = "A28" if n % 2 == 0 else "A31"
    used = "MARTIN" if event == "A28" else "DURAND"
    birth_date = (dt.date(1930, 1, 1) + dt.timedelta(days=(patient * 7919) % 32000)).strftime("%Y%m%d")
    message = adt_upsert(
        event,
        f"LOAD-ADT-{n}",
        ipp,
        ins=None,
        status=None,
        used_name=used,
        birth_name=f"CHARGE-{patient}",
        birth_date=birth_date,
    )
    return f"hl7 ADT^{event}", message


def order_message(n: int) -> tuple[str, bytes]:
    """Flux 1 (ORM^O01 NW), then an IHE OMI^O23 NW and its cancellation (CA), in turn."""
    cycle, step = divmod(n, 3)
    if step == 0:
        return "hl7 ORM^O01", flux1(f"LOAD-ORM-{cycle}", f"LOADORM{cycle}")
    control = "NW" if step == 1 else "CA"
    study_uid = generate_uid(UID_PREFIX, [f"load-omi-{cycle}"])
    message = ihe_omi(
        f"LOAD-OMI-{cycle}-{control}",
        control,
        f"LOADOMI{cycle}",
        accession=f"LOMI{cycle}",
        study_uid=study_uid,
    )
    return f"hl7 OMI^O23 {control}", message


def guarded(rec: Recorder, loop: Callable[..., None]) -> Callable[..., None]:
    """``loop`` as a thread target: an unexpected exception ending it early is an error too."""

    def target(*args: Any) -> None:
        try:
            loop(*args)
        except Exception as exc:
            rec.error(f"thread {loop.__name__}", repr(exc))

    return target


# --------------------------------------------------------------------------------------------- memory


class RssLog:
    """The summed VmRSS (and Pss) of the server's process tree every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        self.pid, self.interval, self.t0 = pid, interval, t0
        self.samples: list[tuple[float, float]] = []  # (seconds since the start, MiB)
        self.pss_samples: list[tuple[float, float]] = []  # the same for Pss (shared pages divided)
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> None:
        tree = process_tree(self.pid)
        self.processes = max(self.processes, len(tree))
        mib = sum(status_kb(p, "VmRSS") for p in tree) / 1024
        pss = sum(pss_kb(p) for p in tree) / 1024
        at = round(time.monotonic() - self.t0, 1)
        self.samples.append((at, round(mib, 1)))
        self.pss_samples.append((at, round(pss, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssLog:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def at(self, seconds: float) -> float:
        """The sample nearest ``seconds``."""
        return min(self.samples, key=lambda s: abs(s[0] - seconds))[1]

    @staticmethod
    def slope(samples: Sequence[tuple[float, float]], since: float) -> float:
        """Least-squares growth of ``samples`` from ``since`` on, in MiB per minute."""
        points = [(t, m) for t, m in samples if t >= since]
        if len(points) < 2:
            return 0.0
        return 60 * statistics.linear_regression([t for t, _ in points], [m for _, m in points]).slope


# --------------------------------------------------------------------------------------------- /metrics


def _samples(http_url: str) -> Iterator[Any]:
    """Every sample of ``/metrics`` (loopback: no token needed)."""
    text = httpx.get(f"{http_url}/metrics", timeout=30, trust_env=False).text
    for family in text_string_to_metric_families(text):
        yield from family.samples


def scrape(http_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters of ``/metrics``, keyed by sample name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in _samples(http_url)
        if s.name.endswith("_total")
    }


def native_memory(http_url: str) -> dict[str, float]:
    """``simral_native_memory_bytes`` summed over the serving processes, MiB by kind (each process
    refreshes its figures once a minute)."""
    out: dict[str, float] = {}
    for s in _samples(http_url):
        if s.name == "simral_native_memory_bytes":
            kind = s.labels.get("kind", "")
            out[kind] = out.get(kind, 0.0) + s.value / 2**20
    return {k: round(v, 1) for k, v in sorted(out.items())}


def metrics_check(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], rec: Recorder
) -> dict[str, Any]:
    """Compare the server's counters with the client's counts; every failure counter must be 0."""

    def total(name: str, **labels: str) -> float:
        return sum(
            v
            for (n, ls), v in samples.items()
            if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
        )

    ok_outcomes = {"success", "stored", "AA"}
    failures = {
        f"{name}{dict(ls)}": v
        for (name, ls), v in samples.items()
        if name.startswith("simral_")
        and v
        and any(k in ("outcome", "ack_code") for k, _ in ls)
        and not any(k in ("outcome", "ack_code") and x in ok_outcomes for k, x in ls)
    }
    c = rec.counts
    pairs = {
        "dimse instances stored": (
            total("simral_ingest_instances_total", entry="dimse", outcome="stored"),
            c["c-store"],
        ),
        "qido (studies + series)": (
            total("simral_query_requests_total", protocol="qido", outcome="success"),
            c["qido-studies"] + c["qido-series"],
        ),
        "wado-rs metadata": (
            total("simral_retrieve_requests_total", protocol="wado-rs-metadata", outcome="success"),
            c["wado-metadata"],
        ),
        "wado-rs frames": (
            total("simral_retrieve_requests_total", protocol="frames", outcome="success"),
            c["wado-frame"],
        ),
        "ADT^A28": (
            total("simral_hl7_messages_total", message_type="ADT^A28", ack_code="AA"),
            c["hl7 ADT^A28"],
        ),
        "ADT^A31": (
            total("simral_hl7_messages_total", message_type="ADT^A31", ack_code="AA"),
            c["hl7 ADT^A31"],
        ),
        "ORM^O01": (
            total("simral_hl7_messages_total", message_type="ORM^O01", ack_code="AA"),
            c["hl7 ORM^O01"],
        ),
        "OMI^O23": (
            total("simral_hl7_messages_total", message_type="OMI^O23", ack_code="AA"),
            c["hl7 OMI^O23 NW"] + c["hl7 OMI^O23 CA"],
        ),
    }
    rows = {
        k: {"server": int(s), "client": int(cl), "equal": int(s) == int(cl)} for k, (s, cl) in pairs.items()
    }
    return {
        "totals": rows,
        "server_failures": failures,
        "pass": not failures and all(r["equal"] for r in rows.values()),
    }


# --------------------------------------------------------------------------------------------- setup


def setup(simral: SimralProcess, rates: Rates) -> dict[str, str]:
    """Organisations, their modality nodes and a radiologist each, the RIS of CHX, its contract with
    the teleradiology group; the radiologists' bearer tokens by organisation."""
    for i, (code, ae_title) in enumerate(SITES):
        extra = ["--patient-id-oid", CHX_IPP_OID] if code == "CHX" else []
        simral.cli(
            "organisations", "add", code, "--name", f"Site {code}", "--finess", f"9900000{i + 3}1", *extra
        )
        simral.add_node(f"modality-{code.lower()}", ae_title, 104, organisation=code)
    simral.cli(
        "organisations", "add", GROUP, "--name", "Téléradiologie Grand Est", "--kind", "teleradiology-group"
    )
    tokens = {}
    for i, (code, _ae) in enumerate(SITES):
        login = f"radio_{code.lower()}"
        simral.cli(
            "users", "add", login, "--organisation", code, "--role", "radiologist",
            "--rpps", f"1000600010{i}", "--name", f"Radiologue {code}", "--password-stdin",
            input=PASSWORD + "\n",
        )  # fmt: skip
        tokens[code] = simral.token_for(login)
    return tokens


def wait_ready(http_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{http_url}/readyz", timeout=5, trust_env=False).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("simral did not become ready")


def templates(base: Path, site: int) -> list[Dataset]:
    """Three 64x64 instances (SC, MR, CR) from tests/corpus.py, the site's templates."""
    paths = small_instances(base / f"templates{site}", count=3, per_series=1, studies=3, seed=100 + site)
    return [pydicom.dcmread(p) for p in paths]


# --------------------------------------------------------------------------------------------- run


@dataclass
class Outcome:
    report: dict[str, Any] = field(default_factory=dict)
    passed: bool = False


def run(args: argparse.Namespace) -> Outcome:
    rates = Rates()
    duration = args.minutes * 60
    warmup = duration * 0.2
    load_before = os.getloadavg()
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="simral-load-") as tmp:
        base = Path(tmp)
        simral = SimralProcess(
            base / "data",
            hl7=True,
            extra_env={"SIMRAL_WORKERS": str(args.workers), "SIMRAL_INS_TEST_OIDS_ALLOWED": "true"},
        )
        tokens = setup(simral, rates)
        ris = RisListener(free_port())
        simral.cli(
            "ris", "add", "RIS_CHX", "--organisation", "CHX", "--host", "127.0.0.1", "--port", str(ris.port),
            "--application", RIS_APP, "--facility", RIS_FACILITY, "--data-dir", str(simral.data_dir),
        )  # fmt: skip
        simral.cli(
            "contracts", "add", "CHX", GROUP, "--modalities", "CT\\MR", "--data-dir", str(simral.data_dir)
        )
        sites = [Site(i, code, ae_title, templates(base, i)) for i, (code, ae_title) in enumerate(SITES)]
        ris.start()
        simral.start()
        try:
            assert simral.proc is not None
            pid = simral.proc.pid
            wait_ready(simral.http_url)
            # Every patient gets a first study before the viewers start (counted like the rest).
            for site in sites:
                ae = storage_ae(site.ae_title)
                for _ in range(PATIENTS_PER_SITE):
                    send_batch(site, ae, simral.dicom_port, simral.ae_title, rates.store_batch, rec)
            log(
                f"seeded {sum(s.batches for s in sites) * rates.store_batch} instances; "
                f"load for {duration:.0f} s"
            )
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=guarded(rec, store_loop),
                    args=(
                        site,
                        simral.dicom_port,
                        simral.ae_title,
                        rates,
                        rec,
                        stop,
                        i * rates.store_interval / 4,
                    ),
                    name=f"store-{site.organisation}",
                )
                for i, site in enumerate(sites)
            ]
            threads += [
                threading.Thread(
                    target=guarded(rec, viewer_loop),
                    args=(
                        v,
                        simral.dicomweb_url,
                        tokens[sites[v % 4].organisation],
                        sites[v % 4],
                        rates,
                        rec,
                        stop,
                    ),
                    name=f"viewer-{v}",
                )
                for v in range(rates.viewers)
            ]
            threads += [
                threading.Thread(
                    target=guarded(rec, hl7_loop),
                    args=("adt", simral.hl7_port, rates.adt_interval, adt_message, rec, stop),
                ),
                threading.Thread(
                    target=guarded(rec, hl7_loop),
                    args=("orders", simral.hl7_port, rates.order_interval, order_message, rec, stop),
                ),
            ]
            t0 = time.monotonic()
            busy0, own0, server0 = busy_jiffies(), own_cpu_seconds(), cpu_seconds(pid)
            with RssLog(pid, 5.0, t0) as rss:
                for t in threads:
                    t.start()
                next_log = 60.0
                native: list[tuple[float, dict[str, float]]] = []
                while (elapsed := time.monotonic() - t0) < duration:
                    time.sleep(min(1.0, duration - elapsed))
                    if elapsed >= next_log:
                        next_log += 60
                        errs = sum(rec.errors.values())
                        native.append((elapsed, native_memory(simral.http_url)))
                        log(
                            f"{elapsed:.0f} s: {dict(rec.counts)} errors={errs} rss={rss.samples[-1][1]} MiB "
                            f"native={native[-1][1]}"
                        )
                stop.set()
                for t in threads:
                    t.join(120)
            wall = time.monotonic() - t0
            busy = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
            own, server_cpu = own_cpu_seconds() - own0, cpu_seconds(pid) - server0
            time.sleep(1.0)  # the server counts a request just after its answer is sent
            check = metrics_check(scrape(simral.http_url), rec)
        except BaseException:
            log(f"simral log tail:\n{simral.log_tail()}")
            raise
        finally:
            simral.stop()
            ris.stop()

    start_mib, warm_mib, end_mib = rss.samples[0][1], rss.at(warmup), rss.samples[-1][1]
    after_warmup = [m for s, m in rss.samples if s >= warmup]
    growth = (end_mib - warm_mib) / warm_mib if warm_mib else float("inf")
    memory = {
        "bound": f"RSS at the end <= {1 + args.rss_bound:.2f} x RSS after the warm-up ({warmup:.0f} s)",
        "start_mib": start_mib,
        "after_warmup_mib": warm_mib,
        "end_mib": end_mib,
        "max_after_warmup_mib": max(after_warmup),
        "growth_after_warmup_pct": round(100 * growth, 1),
        "growth_after_warmup_mib_per_min": round(RssLog.slope(rss.samples, warmup), 2),
        "pss_after_warmup_mib": min(rss.pss_samples, key=lambda s: abs(s[0] - warmup))[1],
        "pss_end_mib": rss.pss_samples[-1][1],
        "pss_growth_after_warmup_mib_per_min": round(RssLog.slope(rss.pss_samples, warmup), 2),
        "processes": rss.processes,
        # Where the RSS is (simral_native_memory_bytes, MiB summed over the processes): after the
        # warm-up, at the end, and the least-squares growth in MiB/min.
        "native": {
            kind: {
                "after_warmup_mib": min(native, key=lambda s: abs(s[0] - warmup))[1].get(kind),
                "end_mib": native[-1][1].get(kind),
                "growth_mib_per_min": round(
                    RssLog.slope([(t, f[kind]) for t, f in native if kind in f], warmup), 2
                ),
            }
            for kind in (native[-1][1] if native else {})
        },
        "pass": growth <= args.rss_bound,
        "samples": rss.samples,
        "pss_samples": rss.pss_samples,
    }
    errors = {op: n for op, n in rec.errors.items() if n}
    cpus = os.cpu_count() or 1
    others = max(0.0, busy - own - server_cpu)
    report = {
        "kind": "mixed-load",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {**machine_info(load_before), "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "duration_s": round(wall, 1),
        "warmup_s": round(warmup, 1),
        "rates": rates.describe(),
        "counts": {k: v for k, v in sorted(rec.counts.items())},
        "rates_achieved_per_s": {
            op: round(n / wall, 2) for op, n in sorted(rec.counts.items()) if not op.startswith("late")
        },
        "errors": errors,
        "error_samples": dict(rec.error_samples),
        "latency": rec.percentiles(),
        "memory": memory,
        "metrics": check,
        "cpu": {
            "server_s": round(server_cpu, 1),
            "server_share_of_machine": round(server_cpu / (wall * cpus), 3),
            "load_client_s": round(own, 1),
            "other_processes_s": round(others, 1),
            "other_share_of_machine": round(others / (wall * cpus), 3),
        },
    }
    passed = not errors and memory["pass"] and check["pass"]
    report["pass"] = passed
    return Outcome(report, passed)


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\nmixed load, {report['duration_s']:.0f} s (warm-up {report['warmup_s']:.0f} s), "
        f"commit {report['commit']}"
    )
    for name, text in report["rates"].items():
        print(f"  {name:11s} {text}")
    print(f"\n{'operation':22s} {'n':>7s} {'median ms':>10s} {'p95 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}")
    for op, row in report["latency"].items():
        print(
            f"{op:22s} {row['n']:7d} {row['median_ms']:10.1f} {row['p95_ms']:9.1f} {row['p99_ms']:9.1f} "
            f"{row['max_ms']:9.1f}"
        )
    print(f"\nerrors: {report['errors'] or 'none'}")
    m = report["memory"]
    print(
        f"RSS (process tree, {m['processes']} processes): start {m['start_mib']} MiB, after warm-up "
        f"{m['after_warmup_mib']} MiB, end {m['end_mib']} MiB, "
        f"max after warm-up {m['max_after_warmup_mib']} MiB; "
        f"growth {m['growth_after_warmup_pct']} % -> {'PASS' if m['pass'] else 'FAIL'} ({m['bound']})"
    )
    print(
        f"growth after warm-up (least squares): RSS {m['growth_after_warmup_mib_per_min']} MiB/min, "
        f"PSS {m['pss_growth_after_warmup_mib_per_min']} MiB/min (PSS after warm-up "
        f"{m['pss_after_warmup_mib']} MiB, end {m['pss_end_mib']} MiB)"
    )
    for kind, row in m["native"].items():
        print(
            f"  native {kind}: after warm-up {row['after_warmup_mib']} MiB, end {row['end_mib']} MiB, "
            f"{row['growth_mib_per_min']} MiB/min"
        )
    print("/metrics totals (server = client):")
    for name, row in report["metrics"]["totals"].items():
        print(f"  {name:24s} {row['server']:7d} {row['client']:7d} {'ok' if row['equal'] else 'MISMATCH'}")
    if report["metrics"]["server_failures"]:
        print(f"  server failure counters: {report['metrics']['server_failures']}")
    cpu, mach = report["cpu"], report["machine"]
    print(
        f"CPU: server {cpu['server_s']} s ({100 * cpu['server_share_of_machine']:.0f} % of the machine), "
        f"load client {cpu['load_client_s']} s, other processes {cpu['other_processes_s']} s "
        f"({100 * cpu['other_share_of_machine']:.0f} %); load average before {mach['loadavg_before']}, "
        f"after {mach['loadavg_after']}"
    )
    if cpu["other_share_of_machine"] > 0.15:
        print(
            "  note: other processes used the CPUs during the run; "
            "latencies are noisier than on an idle machine"
        )
    print(f"RESULT: {'PASS' if report['pass'] else 'FAIL'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="duration of the load (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    parser.add_argument("--rss-bound", type=float, default=0.20, help="allowed RSS growth after the warm-up")
    parser.add_argument(
        "--workers", type=int, default=0, help="simral serve worker processes (default 0: one per CPU)"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON result (default bench/results/mixed-load-<time>.json)"
    )
    args = parser.parse_args(argv)
    # What the client's own DICOM stack reports (aborts, unexpected messages) explains its errors.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.quick:
        args.minutes = 2.0
    outcome = run(args)
    print_report(outcome.report)
    write_results(outcome.report, args.output, "mixed-load")
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
