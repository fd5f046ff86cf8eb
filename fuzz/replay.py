"""Replay inputs through a harness without libFuzzer and list those that fail.

``python -m fuzz.replay NAME [FILE_OR_FOLDER ...]`` (default: the seed corpus, the regression
inputs and the inputs libFuzzer kept in ``fuzz/.work/NAME/corpus``); exit status 1 on a failure.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

from fuzz import harness


def inputs(name: str, given: list[str]) -> list[Path]:
    paths = [Path(g) for g in given] or [
        harness.CORPUS_DIR / name,
        harness.REGRESSIONS_DIR / name,
        harness.WORK_DIR / name / "corpus",
    ]
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.is_file():
            found.append(path)
    return found


def main() -> int:
    name, given = sys.argv[1], sys.argv[2:]
    module = importlib.import_module(f"fuzz.fuzz_{name}")
    module.setup()
    failures = 0
    files = inputs(name, given)
    for path in files:
        try:
            module.test_one_input(path.read_bytes())
        except Exception as exc:
            failures += 1
            print(f"FAIL {path}: {type(exc).__name__}: {str(exc)[:300]}")
            if "-v" in sys.argv:
                traceback.print_exc()
    print(f"{len(files)} inputs replayed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
