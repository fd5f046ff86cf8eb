"""``simral serve`` worker processes: shared ports, clean stop, refusal of taken ports and exposure."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from tests.corpus import ct_series
from tests.simral_proc import SIMRAL, SimralProcess


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _multipart(paths: list[Path], boundary: str = "wk") -> bytes:
    body = b""
    for path in paths:
        body += (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def test_workers_share_the_ports_and_stop_cleanly(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "ct", slices=40, rows=64, cols=64, patient_id="WORKERS")
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_WORKERS": "2"})
    assert simral.token  # created before the workers start and the STOW threads use it
    simral.start()
    try:
        assert simral.proc is not None
        parent = simral.proc.pid
        deadline = time.monotonic() + 20
        while len(_children(parent)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(parent)
        # Two workers: the parent serves as the first one, beside one forked child (no idle
        # supervisor holding memory).
        assert len(workers) == 1, simral.log_tail()

        def stow(chunk: list[Path]) -> int:
            response = httpx.post(
                simral.dicomweb_url + "/studies",
                content=_multipart(chunk),
                headers={
                    **simral.auth_headers,
                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=wk',
                },
                timeout=120,
            )
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(stow, [paths[i : i + 5] for i in range(0, 40, 5)]))
        assert statuses == [200] * 8
        found = httpx.get(
            simral.dicomweb_url + "/instances",
            params={"PatientID": "WORKERS"},
            headers=simral.auth_headers,
            timeout=60,
        ).json()
        assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
        )
        # Each worker answers on the shared ports: many short connections reach both of them.
        statuses = [httpx.get(simral.http_url + "/healthz", timeout=10).status_code for _ in range(40)]
        assert statuses == [200] * 40
        assert simral.cli("check").returncode == 0
    finally:
        code = simral.stop()
    assert code == 0, simral.log_tail()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_dead_worker_stops_the_service(tmp_path: Path) -> None:
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_WORKERS": "3"})
    simral.start()
    assert simral.proc is not None
    deadline = time.monotonic() + 20
    while len(_children(simral.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(_children(simral.proc.pid)[0], signal.SIGKILL)
    assert simral.proc.wait(30) == 1
    assert _children(simral.proc.pid) == []
    simral.proc = None


def test_the_workers_die_with_the_parent(tmp_path: Path) -> None:
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_WORKERS": "2"})
    simral.start()
    assert simral.proc is not None
    deadline = time.monotonic() + 20
    while len(_children(simral.proc.pid)) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = _children(simral.proc.pid)
    os.kill(simral.proc.pid, signal.SIGKILL)  # the parent, itself a worker, dies without a word
    simral.proc.wait(30)
    simral.proc = None

    def alive() -> bool:
        try:
            return "zombie" not in Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), "the forked worker outlived its parent"


def test_taken_ports_and_open_http_are_refused(tmp_path: Path) -> None:
    first = SimralProcess(tmp_path / "one")
    with first:
        second = SimralProcess(tmp_path / "two")
        second.dicom_port, second.http_port = first.dicom_port, first.http_port
        argv = [SIMRAL, "serve", "--data-dir", str(second.data_dir), "--dicom-host", "127.0.0.1"]
        argv += ["--dicom-port", str(second.dicom_port), "--http-port", str(second.http_port)]
        result = subprocess.run(argv, env=second.env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2
        assert "not available" in result.stdout + result.stderr
        # The first instance still answers alone.
        assert httpx.get(first.http_url + "/healthz", timeout=10).status_code == 200
    exposed = subprocess.run(
        [SIMRAL, "serve", "--data-dir", str(tmp_path / "three"), "--http-host", "0.0.0.0"],
        env=first.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert exposed.returncode == 2
    refusal = exposed.stdout + exposed.stderr
    assert "not a loopback address" in refusal and "https" in refusal


# A child process: count glibc's malloc arenas (malloc_info's <heap> entries) once 12 threads have
# each allocated, with or without simral's cap. Threads get an arena of their own at their first
# allocation until the cap (glibc: 8 per CPU by default) is reached.
ARENA_PROBE = r"""
import ctypes, ctypes.util, os, re, sys, tempfile, threading
from simral.server import limit_malloc_arenas
capped = limit_malloc_arenas() if sys.argv[1] == "cap" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(12)
def allocate():
    libc.malloc(4096)
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(capped, len(re.findall(r'<heap nr="', open(path).read())))
os.unlink(path)
"""


def _arenas(mode: str, env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [str(Path(SIMRAL).with_name("python")), "-c", ARENA_PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_serve_caps_malloc_arenas_unless_the_operator_set_them() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _arenas("cap", env) == ("True", 2)
    capped, uncapped = _arenas("none", env)
    assert capped == "False" and uncapped > 2  # the default: an arena per thread, here
    # The operator's MALLOC_ARENA_MAX (applied by glibc itself) is left alone.
    assert _arenas("cap", {**env, "MALLOC_ARENA_MAX": "4"}) == ("False", 4)


# A child process: 50 MB of 64 KB blocks (below glibc's mmap threshold, so inside the main arena)
# are written, then freed except the last one, which keeps the arena's top in place: glibc's free()
# can only give back the top, so the freed pages stay resident until simral's trim releases them.
TRIM_PROBE = r"""
import ctypes, ctypes.util
from simral.server import release_free_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
blocks = [libc.malloc(64 * 1024) for _ in range(800)]
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
for block in blocks[:-1]:
    libc.free(block)
before = rss_kib()
released = release_free_memory()
print(released, before - rss_kib())
"""


def test_serving_processes_give_free_arena_pages_back() -> None:
    out = subprocess.run(
        [str(Path(SIMRAL).with_name("python")), "-c", TRIM_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    released, freed_kib = out[0], int(out[1])
    assert released == "True"
    assert freed_kib > 40 * 1024  # most of the 50 MB that free() had left resident


def test_the_c_library_is_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes.util.find_library runs ``ldconfig -p`` in a child process: the periodic trim forked
    every serving process once a minute (seen as RSS spikes of a whole process under load)."""
    import ctypes.util

    from simral import server

    found: list[str] = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found.append(name) or real(name))
    server._libc.cache_clear()
    for _ in range(3):
        server.release_free_memory()
    assert found == ["c"]
