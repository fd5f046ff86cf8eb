"""The platform's Prometheus instruments (counters and latency histograms) and their exposition.

Families (the Prometheus text exposition format):

- ``simral_ingest_instances_total{entry, outcome}`` and ``simral_ingest_seconds{entry}``: every
  instance through :func:`simral.archive.service.ingest_files`, by entry point (``dimse``,
  ``stow``, ``import``, ``internal`` for the reports and manifests simral stores itself) and outcome
  (``stored``, ``duplicate``, ``duplicate-conflict``, ``replaced``, ``rejected``, ``error``); the
  histogram is the time from the start of the call until the instance is durable and indexed.
- ``simral_retrieve_requests_total{protocol, outcome}``, ``simral_retrieve_seconds{protocol}``:
  WADO-RS (``wado-rs``, ``wado-rs-metadata``, ``frames``, ``bulkdata``, ``rendered``), ``wado-uri``,
  ``c-get``, ``c-move``; ``simral_retrieve_instances_total{protocol}`` the C-STORE sub-operations
  of C-GET and C-MOVE.
- ``simral_query_requests_total{protocol, outcome}``, ``simral_query_seconds{protocol}``:
  ``c-find``, ``mwl`` (Modality Worklist C-FIND), ``qido``.
- ``simral_hl7_messages_total{message_type, ack_code}``, ``simral_hl7_seconds{message_type}``.

Labels are closed vocabularies (protocol names, outcomes, HL7 message types checked against
``XXX^XNN``): never a patient identifier, a name or a UID.

Several worker processes (``simral serve --workers N``) each count what they serve. ``simral serve``
calls :func:`use_multiprocess_directory` before anything is counted: every process then keeps its
values in memory-mapped files of one per-run folder (prometheus-client's multiprocess mode), and a
scrape, whichever worker answers it, merges the files of all of them, so counters and histograms
cover the whole node. Without that call (tests, CLI commands) values stay in this process.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, mmap_dict, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

#: Latency buckets (seconds): from a cached QIDO answer to a large C-MOVE.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

INGEST = Counter(
    "simral_ingest_instances",
    "Instances received, by entry point and outcome.",
    ["entry", "outcome"],
)
INGEST_SECONDS = Histogram(
    "simral_ingest_seconds",
    "Seconds until an instance was durable and indexed (or refused), by entry point.",
    ["entry"],
    buckets=LATENCY_BUCKETS,
)
RETRIEVE = Counter(
    "simral_retrieve_requests",
    "Retrieve requests (WADO-RS, WADO-URI, C-GET, C-MOVE), by protocol and outcome.",
    ["protocol", "outcome"],
)
RETRIEVE_SECONDS = Histogram(
    "simral_retrieve_seconds",
    "Seconds to answer a retrieve request completely (body sent, sub-operations done).",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
)
RETRIEVE_INSTANCES = Counter(
    "simral_retrieve_instances",
    "Instances sent by C-GET and C-MOVE sub-operations.",
    ["protocol"],
)
QUERY = Counter(
    "simral_query_requests",
    "Queries (C-FIND, Modality Worklist, QIDO-RS), by protocol and outcome.",
    ["protocol", "outcome"],
)
QUERY_SECONDS = Histogram(
    "simral_query_seconds",
    "Seconds to answer a query completely.",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
)
HL7 = Counter(
    "simral_hl7_messages",
    "HL7 v2 messages received over MLLP, by message type and acknowledgement code.",
    ["message_type", "ack_code"],
)
HL7_SECONDS = Histogram(
    "simral_hl7_seconds",
    "Seconds from an HL7 message's receipt to its acknowledgement.",
    ["message_type"],
    buckets=LATENCY_BUCKETS,
)
NATIVE_MEMORY = Gauge(
    "simral_native_memory_bytes",
    "Native memory of each serving process, updated every minute: glibc malloc in use "
    "(malloc_in_use), free inside its arenas (malloc_free), SQLite's own allocations (sqlite, part "
    "of malloc_in_use), the whole anonymous resident memory (rss_anon).",
    ["kind"],
    multiprocess_mode="liveall",
)

#: Ingest entry points (label ``entry``).
ENTRIES = ("dimse", "stow", "import", "internal")
#: Request kinds and their families.
KINDS = {"retrieve": (RETRIEVE, RETRIEVE_SECONDS), "query": (QUERY, QUERY_SECONDS)}
_HL7_TYPE = re.compile(r"^[A-Z]{3}\^[A-Z0-9]{3}$")

#: Environment variable prometheus-client reads for its multiprocess folder.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ReservedMmapedDict(mmap_dict.MmapedDict):  # type: ignore[misc]
    """prometheus-client's value file with its disk blocks reserved before they are written.

    The library grows its files sparse (``truncate``) and writes through ``mmap``: on a full
    filesystem the first write into a page without a block behind it kills the process with
    SIGBUS. Reserving the blocks first (``posix_fallocate``) turns that into an ``OSError``.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size == 0:
                    os.posix_fallocate(fd, 0, mmap_dict._INITIAL_MMAP_SIZE)
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        encoded = len(key.encode("utf-8"))
        size = 4 + encoded + (8 - (encoded + 4) % 8) + 16  # as the library lays an entry out
        capacity = self._capacity
        while self._used + size > capacity:
            capacity *= 2
        if capacity != self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


#: Where per-run folders go: RAM (tmpfs), off the archive's disk, when the machine has it.
RUN_ROOT = Path("/dev/shm")
_RUN_PREFIX = "simral-metrics-"


def run_directory(fallback: Path) -> Path:
    """A new per-run folder for :func:`use_multiprocess_directory`, named after this process.

    In :data:`RUN_ROOT` when it is a writable folder, else under ``fallback``: values are
    per run, and the archive's disk filling up must end in refusals (PS3.4 B.2.3 A700), never
    in a metrics write failing. Folders of earlier runs whose process is gone are removed.
    """
    root = RUN_ROOT if RUN_ROOT.is_dir() and os.access(RUN_ROOT, os.W_OK) else fallback
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(_RUN_PREFIX + "*"):
        pid = old.name[len(_RUN_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{os.getpid()}-", dir=root))


def use_multiprocess_directory(folder: Path) -> None:
    """Keep this process's values, and those of the processes it forks, in ``folder`` (emptied).

    Must run before the first value is counted. prometheus-client picks its value class when it is
    imported, from :data:`MULTIPROC_ENV`; simral sets the variable (for processes started later) and
    the class (for this one and its forks) here instead, so the import order does not matter.
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    values.MmapedDict = ReservedMmapedDict  # type: ignore[misc]
    values.ValueClass = values.MultiProcessValue()


def end_multiprocess_directory() -> None:
    """Remove this run's folder (at exit of the process that made it)."""
    folder = multiprocess_directory()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def multiprocess_directory() -> Path | None:
    """The per-run folder of multiprocess mode, when it is on."""
    folder = os.environ.get(MULTIPROC_ENV, "")
    return Path(folder) if folder and Path(folder).is_dir() else None


def scrape_registry(*extra: Collector) -> CollectorRegistry:
    """The registry a scrape reads: every worker's values (multiprocess mode) or this process's,
    plus ``extra`` collectors (the figures read from the database at scrape time)."""
    folder = multiprocess_directory()
    if folder is None and not extra:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    if folder is not None:
        MultiProcessCollector(registry, path=str(folder))
    else:
        registry.register(_Forward(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return registry


class _Forward(Collector):
    """This process's own instruments, in a registry that also holds scrape-time collectors."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        yield from self.source.collect()


def record_native_memory(figures: dict[str, int]) -> None:
    """Set this process's :data:`NATIVE_MEMORY` figures (kind -> bytes)."""
    for kind, value in figures.items():
        NATIVE_MEMORY.labels(kind).set(value)


def record_ingest(entry: str, outcomes: Iterable[str], seconds: float) -> None:
    """Count ingested instances (one per outcome) that took ``seconds`` to be acknowledged."""
    entry = entry if entry in ENTRIES else "internal"
    for outcome in outcomes:
        INGEST.labels(entry, outcome).inc()
        INGEST_SECONDS.labels(entry).observe(seconds)


def record_request(kind: str, protocol: str, outcome: str, seconds: float) -> None:
    """Count one retrieve or query request of ``protocol`` with its outcome and duration."""
    counter, histogram = KINDS[kind]
    counter.labels(protocol, outcome).inc()
    histogram.labels(protocol).observe(seconds)


def record_retrieved_instances(protocol: str, count: int) -> None:
    """Count instances sent by DIMSE retrieve sub-operations."""
    if count:
        RETRIEVE_INSTANCES.labels(protocol).inc(count)


def hl7_message_type(message_type: str, event: str) -> str:
    """The ``message_type`` label (``ADT^A28``): anything that is not ``XXX^XNN`` is ``other``."""
    label = f"{message_type}^{event}".upper()
    return label if _HL7_TYPE.match(label) else "other"


def record_hl7(message_type: str, ack_code: str, seconds: float) -> None:
    """Count one HL7 message and its acknowledgement code (AA, AE, AR, CA, CE, CR)."""
    code = ack_code if ack_code in ("AA", "AE", "AR", "CA", "CE", "CR") else "other"
    HL7.labels(message_type, code).inc()
    HL7_SECONDS.labels(message_type).observe(seconds)


def dimse_outcome(status: int | None) -> str:
    """A DIMSE status (PS3.7 Annex C) as an outcome label."""
    if status is None:
        return "failure"
    if status in (0x0000, 0xFF00, 0xFF01):
        return "success"
    if status == 0xFE00:
        return "cancelled"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def http_outcome(status: int) -> str:
    """An HTTP status as an outcome label."""
    if status < 400:
        return "success"
    return "client-error" if status < 500 else "server-error"


@dataclass
class _Watch:
    outcome: str = "success"


@contextmanager
def watched(kind: str, protocol: str) -> Iterator[_Watch]:
    """Time a request; the caller may set ``outcome``; an exception makes it ``failure``."""
    watch = _Watch()
    started = time.perf_counter()
    try:
        yield watch
    except BaseException:
        watch.outcome = "failure"
        raise
    finally:
        record_request(kind, protocol, watch.outcome, time.perf_counter() - started)


#: Outcomes counted as failures on the administration page.
FAILED_OUTCOMES = frozenset(
    {"failure", "client-error", "server-error", "rejected", "error", "AE", "AR", "CE", "CR"}
)
#: (flow, counter, histogram, key label, outcome label) of each family shown as activity.
_FLOWS = (
    ("ingest", "simral_ingest_instances", "simral_ingest_seconds", "entry", "outcome"),
    ("retrieve", "simral_retrieve_requests", "simral_retrieve_seconds", "protocol", "outcome"),
    ("query", "simral_query_requests", "simral_query_seconds", "protocol", "outcome"),
    ("hl7", "simral_hl7_messages", "simral_hl7_seconds", "message_type", "ack_code"),
)


@dataclass
class Activity:
    """What one entry point or protocol did since the node started (all workers)."""

    flow: str
    name: str
    count: float = 0.0
    failures: float = 0.0
    seconds_sum: float = 0.0
    seconds_count: float = 0.0
    #: (upper bound, cumulative count) of the latency histogram.
    buckets: list[tuple[float, float]] | None = None

    @property
    def mean_seconds(self) -> float | None:
        return self.seconds_sum / self.seconds_count if self.seconds_count else None

    def quantile_bound(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (an estimate from buckets)."""
        if not self.buckets or not self.seconds_count:
            return None
        wanted = q * self.seconds_count
        for bound, cumulative in sorted(self.buckets):
            if cumulative >= wanted:
                return bound
        return None


def activity(registry: CollectorRegistry) -> list[Activity]:
    """The counters and histograms of ``registry`` (see :func:`scrape_registry`) per flow and name."""
    samples: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in registry.collect():
        samples.setdefault(family.name, []).extend((s.name, s.labels, s.value) for s in family.samples)
    found: dict[tuple[str, str], Activity] = {}
    for flow, counter, histogram, key, outcome_label in _FLOWS:
        for name, labels, value in samples.get(counter, []):
            if not name.endswith("_total"):
                continue
            item = found.setdefault((flow, labels[key]), Activity(flow, labels[key]))
            item.count += value
            if labels.get(outcome_label) in FAILED_OUTCOMES:
                item.failures += value
        for name, labels, value in samples.get(histogram, []):
            item = found.setdefault((flow, labels[key]), Activity(flow, labels[key]))
            if name.endswith("_sum"):
                item.seconds_sum += value
            elif name.endswith("_count"):
                item.seconds_count += value
            elif name.endswith("_bucket"):
                bound = float(labels["le"])
                buckets = item.buckets if item.buckets is not None else []
                merged = dict(buckets)
                merged[bound] = merged.get(bound, 0.0) + value
                item.buckets = sorted(merged.items())
    order = {flow: index for index, (flow, *_rest) in enumerate(_FLOWS)}
    return sorted(found.values(), key=lambda a: (order[a.flow], a.name))
