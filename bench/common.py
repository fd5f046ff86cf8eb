"""Helpers shared by the benchmarks: logging, corpus reuse, machine facts, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reuse_generated(out_dir: Path, count: int, make: Callable[[Path], list[Path]]) -> list[Path]:
    """Reuse ``out_dir`` if it holds exactly ``count`` files (the generators are deterministic)."""
    existing = sorted(out_dir.glob("*.dcm")) if out_dir.is_dir() else []
    if len(existing) == count:
        return existing
    shutil.rmtree(out_dir, ignore_errors=True)
    return make(out_dir)


def machine_info(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before],
    }


def write_results(report: dict[str, Any], output: Path | None, stem: str) -> Path:
    """Write ``report`` as JSON (default ``bench/results/<stem>-<timestamp>.json``)."""
    out = output or RESULTS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {out}")
    return out


# ------------------------------------------------------------ CPU and memory of processes (/proc)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (0 when it is gone).

    A page shared by n processes counts 1/n in each: the honest sum for a forked process tree,
    whose workers share the libraries and start-up objects of their parent (VmRSS counts them
    in every process).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree rooted at ``pid`` (live processes only)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def busy_jiffies() -> int:
    """CPU time (clock ticks) the whole machine spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def own_cpu_seconds() -> float:
    """CPU time of this process and of its waited-for descendants (servers, dcmtk tools)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
