"""A quick probe of the DICOM association loop's cost: one ``simral serve``, one worker process.

Not a benchmark run (see dimse_bench.py for those): a minute or two, for before/after figures of a
change in the DIMSE receive/send path. It starts one ``simral serve`` (embedded defaults, random
ports, hence one worker process, see ``simral.server.effective_workers``) and reports:

- C-STORE: ``--count`` generated 512x512 CT instances (tests.corpus.ct_series, as dimse_bench.py)
  sent by dcmtk storescu over one association (TCP_NODELAY=1): server CPU ms per instance (the
  server's process tree, /proc) and wall instances per second;
- C-FIND: the median latency of ``--finds`` study-level queries over one open pynetdicom
  association (dimse_bench.find_latency, 10 warm-up queries not counted);
- idle: the server's CPU over ``--idle`` seconds while 4 pynetdicom associations stay open and
  send nothing (percent of one core), the cost of waiting for a peer.

Usage: ``PYTHONPATH=src python bench/dimse_cpu_probe.py [--count 200] [--json out.json]``.
Generated instances are kept in ``--corpus`` (default /tmp/simral-dimse-probe) between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, log, reuse_generated  # noqa: E402
from bench.dimse_bench import (  # noqa: E402
    DEST_AE,
    MAX_PDU,
    SCU_AE,
    Target,
    _http_json,
    _nodelay,
    find_latency,
    store,
)
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402
from tests.corpus import ct_series  # noqa: E402
from tests.peers import HOST  # noqa: E402
from tests.simral_proc import SimralProcess  # noqa: E402


@contextlib.contextmanager
def simral_server(base: Path) -> Iterator[Target]:
    """A fresh ``simral serve`` with one worker process (SIMRAL_WORKERS=1), embedded defaults."""
    proc = SimralProcess(base / "simral", extra_env={"SIMRAL_WORKERS": "1"})
    proc.add_node("bench", SCU_AE, 104)
    proc.add_node("dest", DEST_AE, 11112)
    proc.start()
    try:
        assert proc.proc is not None
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
        proc.stop()


def store_probe(target: Target, files: list[Path]) -> dict[str, float]:
    before = target.count()
    cpu0 = cpu_seconds(target.pid)
    seconds = store(target.ae, target.port, [files])
    cpu = cpu_seconds(target.pid) - cpu0
    stored = target.count() - before
    if stored != len(files):
        raise RuntimeError(f"{stored} of {len(files)} instances stored")
    return {
        "instances": len(files),
        "seconds": round(seconds, 3),
        "instances_per_s": round(len(files) / seconds, 2),
        "server_cpu_ms_per_instance": round(1000 * cpu / len(files), 2),
    }


def idle_probe(target: Target, associations: int, seconds: float) -> dict[str, float]:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    opened = []
    try:
        for _ in range(associations):
            assoc = ae.associate(
                HOST,
                target.port,
                ae_title=target.ae,
                max_pdu=MAX_PDU,
                evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
            )
            if not assoc.is_established:
                raise RuntimeError("association refused")
            opened.append(assoc)
        time.sleep(1.0)  # let the acceptor settle after the negotiations
        cpu0 = cpu_seconds(target.pid)
        t0 = time.perf_counter()
        time.sleep(seconds)
        cpu = cpu_seconds(target.pid) - cpu0
        wall = time.perf_counter() - t0
    finally:
        for assoc in opened:
            assoc.release()
    return {
        "associations": associations,
        "seconds": round(wall, 2),
        "server_cpu_percent": round(100 * cpu / wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--finds", type=int, default=100)
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "simral-dimse-probe")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    files = reuse_generated(
        args.corpus / f"ct{args.count}", args.count, lambda d: ct_series(d, slices=args.count)
    )
    warmup = reuse_generated(
        args.corpus / "warmup", 4, lambda d: ct_series(d, slices=4, patient_id="WARMUP", seed=9)
    )
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="dimse-probe-") as base, simral_server(Path(base)) as target:
        store_probe(target, warmup)
        log("C-STORE")
        report["store"] = store_probe(target, files)
        log("C-FIND")
        find = find_latency(target, ["BENCH001", "WARMUP"], args.finds)
        report["find"] = {k: find[k] for k in ("queries", "median_ms", "p95_ms", "server_cpu_ms_per_query")}
        log("idle")
        report["idle"] = idle_probe(target, 4, args.idle)
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
