#!/usr/bin/env python3
"""What each server makes durable before it acknowledges a C-STORE: the sync system calls per
stored instance, simral next to Orthanc (the servers of ``dimse_bench.py``), counted with strace.

Not a test and not a speed measurement (strace slows both servers down): it explains the C-STORE
rows of ``dimse_bench.py``. On one association a C-STORE is answered only after its syncs, so where
a sync costs milliseconds (a virtual disk, a RAID controller without a write cache) their number
sets a floor to the time per instance that no CPU work can lower.

``strace -f -c`` is attached to every process of each server while dcmtk ``storescu`` sends
``--count`` small generated instances over one association (after 3 untimed ones); it prints the
calls of the fsync family and renames per instance, and, with ``--paths``, which files were synced
(``strace -y``). Usage: ``.venv/bin/python bench/sync_count.py [--count 100] [--paths]``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import process_tree  # noqa: E402
from bench.dimse_bench import RssSampler, Target, orthanc_server, simral_server, store  # noqa: E402
from tests.corpus import small_instances  # noqa: E402

SYSCALLS = "fsync,fdatasync,sync_file_range,syncfs,msync,rename,renameat,renameat2"
#: strace's -c table row: % time, seconds, usecs/call, calls, [errors,] syscall.
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
_SYNCED = re.compile(r"\b(f(?:data)?sync)\(\d+<([^>]*)>\)")


def _strace(target: Target, files: list[Path], *, paths: bool, out: Path) -> float:
    """Send ``files`` to ``target`` under strace; the seconds the sending took."""
    store(target.ae, target.port, [files[:3]])  # the first association and files: untimed
    argv = ["strace", "-f", "-y" if paths else "-c", "-e", f"trace={SYSCALLS}", "-o", str(out)]
    for pid in process_tree(target.pid):
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # strace attaches to each thread
    started = time.perf_counter()
    store(target.ae, target.port, [files[3:]])
    elapsed = time.perf_counter() - started
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    return elapsed


def _counts(text: str) -> dict[str, int]:
    return {m.group(2): int(m.group(1)) for line in text.splitlines() if (m := _ROW.match(line))}


def _shape(name: str) -> str:
    """A file or folder name with its generated parts (UUIDs, UIDs, hex levels, temp names) masked."""
    name = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "UUID", name)
    name = re.sub(r"[\d.]{12,}", "UID", name)
    name = re.sub(r"^[0-9a-f]{2}$", "XX", name)
    return re.sub(r"^tmp\w{8}", "tmpXXXXXXXX", name)


def _synced_files(text: str) -> collections.Counter[str]:
    """Synced files by kind: the folder of each, its last path component reduced to its shape."""
    kinds: collections.Counter[str] = collections.Counter()
    for call, path in _SYNCED.findall(text):
        folder, name = (_shape(part) for part in (Path(path).parent.name, Path(path).name))
        kinds[f"{call} {folder}/{name}"] += 1
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100, help="instances sent (3 more first, untimed)")
    parser.add_argument("--paths", action="store_true", help="list the synced files (strace -y)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="simral-sync-count-"))
    small_instances(work / "corpus", count=args.count + 3, seed=3)
    files = sorted(p for p in (work / "corpus").rglob("*") if p.is_file())
    sampler = RssSampler()
    servers = {
        "orthanc": lambda: orthanc_server(11999, sampler),
        "simral": lambda: simral_server(work, "s", 11999, sampler),
    }
    try:
        for name, server in servers.items():
            _report(name, server, files, paths=args.paths, out=work / f"strace-{name}.txt")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(
    name: str,
    server: Callable[[], AbstractContextManager[Target]],
    files: list[Path],
    *,
    paths: bool,
    out: Path,
) -> None:
    with server() as target:
        seconds = _strace(target, files, paths=paths, out=out)
    text = out.read_text(errors="replace")
    sent = len(files) - 3
    print(f"\n{name}: {sent} instances over one association ({sent / seconds:.1f} inst/s under strace)")
    if paths:
        for kind, n in sorted(_synced_files(text).items()):
            print(f"  {n / sent:5.2f} per instance  {kind}")
    else:
        for call, n in sorted(_counts(text).items()):
            print(f"  {call:<10} {n:>6} calls  {n / sent:5.2f} per instance")


if __name__ == "__main__":
    sys.exit(main())
