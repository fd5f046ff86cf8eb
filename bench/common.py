"""Helpers shared by the benchmarks: logging, corpus reuse, machine facts, result files."""

from __future__ import annotations

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
