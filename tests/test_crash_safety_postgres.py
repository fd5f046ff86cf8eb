"""Crash safety of the ingest path on PostgreSQL + S3 (DESIGN.md §3, "must"): the rounds of
tests/test_crash_safety.py (SIGKILL during concurrent C-STOREs, every acknowledged instance
retrievable with the bytes sent, ``simral check`` consistent), in a file of their own so that the two
pytest-xdist workers (``--dist loadfile``) run the two backends side by side.
PS3.4 B.2.3 (C-STORE statuses), C.4.3 (C-GET).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_crash_safety import Archive, _chunked_sends, crash_archive, run_crash_rounds

pytestmark = pytest.mark.slow

__all__ = ["_chunked_sends"]  # the autouse fixture applies here too


@pytest.fixture(params=["postgres-s3"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    with crash_archive(request, tmp_path) as archive:
        yield archive


def test_sigkill_during_concurrent_stores_loses_no_acknowledged_instance(
    archive: Archive, tmp_path: Path
) -> None:
    run_crash_rounds(archive, tmp_path)
