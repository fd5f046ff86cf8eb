"""Shared fixtures: real PostgreSQL and S3 servers, and simral configured on each backend.

Backends: ``sqlite-fs`` (embedded defaults) and ``postgres-s3`` (PostgreSQL 15 + SeaweedFS S3).
Every peer listens on 127.0.0.1 on a free port and is stopped at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.peers import PostgresServer, SeaweedS3

from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext

BACKENDS = ["sqlite-fs", "postgres-s3"]

os.environ.setdefault("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3() as server:
        yield server


def backend_env(name: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """SIMRAL_* variables selecting a fresh database and store for backend ``name``."""
    if name == "sqlite-fs":
        return {}
    # Unique without a counter: pytest loads this file as ``conftest`` while test modules import it
    # as ``tests.conftest``, two module objects that would each count from 0.
    n = uuid.uuid4().hex[:16]
    pg: PostgresServer = request.getfixturevalue("postgres")
    s3: SeaweedS3 = request.getfixturevalue("seaweed")
    bucket = f"simral-test-{n}"
    s3.create_bucket(bucket)
    return {
        "SIMRAL_DATABASE_URL": pg.create_database(f"simral_test_{n}"),
        "SIMRAL_STORAGE": "s3",
        "SIMRAL_S3_ENDPOINT_URL": s3.endpoint_url,
        "SIMRAL_S3_BUCKET": bucket,
        "SIMRAL_S3_ACCESS_KEY": s3.access_key,
        "SIMRAL_S3_SECRET_KEY": s3.secret_key,
        "SIMRAL_S3_REGION": s3.region,
    }


@pytest.fixture(params=BACKENDS)
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppContext]:
    """An in-process platform on a fresh database and store, once per backend (embedded SQLite +
    filesystem, PostgreSQL + S3). Modules needing another set-up define their own ``ctx``."""
    env = {**backend_env(request.param, request), "SIMRAL_DATA_DIR": str(tmp_path / "data")}
    context = open_app(load_settings(environ=env))
    yield context
    context.db.dispose()


REPO = Path(__file__).resolve().parent.parent


def run_python(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGV…`` from the repository in a child process (for code that changes
    process-wide state, such as pynetdicom's patches, away from the pytest worker)."""
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


#: The test files that take longest (``--durations``, junit per-file totals), longest first, so that the two
#: pytest-xdist workers finish together: ``--dist loadfile --no-loadscope-reorder`` (Makefile) hands the
#: files out in collection order, each to the first free worker. Without ``--no-loadscope-reorder``
#: xdist sorts the files by their number of tests instead, and a 2-test file of several minutes ran last.
SLOW_FILES_FIRST = (
    "test_crash_safety_postgres.py",
    "test_crash_safety.py",
    "test_report_publication.py",
    "test_teleradiology_end_to_end.py",
    "test_dmp_ris_report.py",
    "test_fault_injection.py",
    "test_bad_input.py",
    "test_dimse_dcmtk.py",
    "test_routing.py",
    "test_media_export.py",
    "test_dmp_publication.py",
    "test_worklist_mpps.py",
    "test_deidentification.py",
    "test_reading_priors.py",
    "test_shares.py",
    "test_request_documents.py",
    "test_oncall_page.py",
    "test_hl7_adt.py",
    "test_serve_workers.py",
    "test_report_browser.py",
    "test_oidc_login.py",
    "test_reports.py",
    "test_dimse_services.py",
    "test_portal_browser.py",
    "test_viewer_browser.py",
    "test_portal_accessibility.py",
    "test_tls.py",
    "test_vigilance_browser.py",
    "test_cluster.py",
    "test_ups_workitems.py",
    "test_teleradiology_requests.py",
    "test_fhir_pdqm_pixm.py",
    "test_retention_page.py",
    "test_access_matrix.py",
    "test_orthanc_dicomweb.py",
    "test_audit_export.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow files first; a stable sort keeps each file's tests in their written order."""
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))
