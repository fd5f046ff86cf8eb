"""HAProxy (Debian ``haproxy``) on loopback in front of simral nodes: one TCP frontend for DICOM,
one HTTP frontend, round robin, health checks every 300 ms (a dead node leaves the pool in < 1 s).

The configuration is the one ``deploy/haproxy.cfg`` documents, with loopback ports filled in.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from tests.peers import _Peer, free_port, wait_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_config(*, dicom_port: int, http_port: int, nodes: Sequence[tuple[str, int, int]]) -> str:
    """The load balancer for ``nodes`` (name, DICOM port, HTTP port) on 127.0.0.1."""
    dicom_servers = "\n".join(
        f"    server {name} 127.0.0.1:{dicom} check inter 300ms fall 2 rise 2" for name, dicom, _ in nodes
    )
    http_servers = "\n".join(
        f"    server {name} 127.0.0.1:{http} check inter 300ms fall 2 rise 2" for name, _, http in nodes
    )
    return f"""global
    maxconn 512

defaults
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 2
    option redispatch

frontend dicom
    mode tcp
    bind 127.0.0.1:{dicom_port}
    default_backend simral_dicom

backend simral_dicom
    mode tcp
    balance roundrobin
{dicom_servers}

frontend http
    mode http
    bind 127.0.0.1:{http_port}
    default_backend simral_http

backend simral_http
    mode http
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
{http_servers}
"""


class HaproxyPeer(_Peer):
    """``haproxy -db`` (foreground) with :func:`haproxy_config`."""

    kind = "haproxy"
    grace = 5.0

    def __init__(self, nodes: Sequence[tuple[str, int, int]], *, timeout: float = 20.0) -> None:
        super().__init__()
        self.nodes = list(nodes)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.timeout = timeout
        self.config_path = self.dir / "haproxy.cfg"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _start(self) -> None:
        self.config_path.write_text(
            haproxy_config(dicom_port=self.dicom_port, http_port=self.http_port, nodes=self.nodes)
        )
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        self.proc = self._spawn([HAPROXY, "-db", "-f", str(self.config_path)], "haproxy")
        for port in (self.dicom_port, self.http_port):
            wait_port("127.0.0.1", port, self.timeout, alive=self._alive, what="haproxy")
