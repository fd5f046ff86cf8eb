"""A real syslog collector for the audit export tests: Debian's rsyslogd on a loopback port, TLS.

rsyslog runs in the foreground as the test's user with its own configuration: ``imtcp`` with the
OpenSSL network stream driver (RFC 5425: TLS, octet-counted framing), requiring a client
certificate signed by the test CA (``x509/certvalid``), and writes every message it receives to a
file, one per line. The PKI (a CA, the collector's certificate for ``localhost``/127.0.0.1, a client
certificate, and a collector certificate from a CA simral does not trust) is made with
``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.peers import free_port, wait_port

RSYSLOGD = "/usr/sbin/rsyslogd"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, the collector's and a client's certificates, and a collector certificate of another CA."""
    paths: dict[str, Path] = {}
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("simral test audit CA", ca_key, None, ca=True)
    rogue_ca = _certificate("rogue CA", rogue_ca_key, None, ca=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, issuer, server in (
        ("server", (ca.subject, ca_key), True),
        ("client", (ca.subject, ca_key), False),
        ("rogue", (rogue_ca.subject, rogue_ca_key), True),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("localhost" if server else "simral-audit-client", key, issuer, server=server)
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = _write_key(key, directory / f"{name}.key")
    return Pki(ca=directory / "ca.pem", **paths)


class RsyslogCollector:
    """rsyslogd listening with TLS on 127.0.0.1; :meth:`messages` reads what it received."""

    def __init__(self, pki: Pki, *, port: int | None = None, rogue: bool = False) -> None:
        self.pki = pki
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="simral-rsyslog-"))
        self.output = self.dir / "received.log"
        self.rogue = rogue
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        cert, key = (
            (self.pki.rogue_cert, self.pki.rogue_key)
            if self.rogue
            else (self.pki.server_cert, self.pki.server_key)
        )
        work = self.dir / "work"
        work.mkdir(exist_ok=True)
        return f"""
global(workDirectory="{work}"
       DefaultNetstreamDriver="ossl"
       DefaultNetstreamDriverCAFile="{self.pki.ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" StreamDriver.Authmode="x509/certvalid")
input(type="imtcp" port="{self.port}" address="127.0.0.1")
template(name="whole" type="string" string="%rawmsg%\\n")
*.* action(type="omfile" file="{self.output}" template="whole" flushOnTXEnd="on" asyncWriting="off")
"""

    def start(self) -> None:
        conf = self.dir / "rsyslog.conf"
        conf.write_text(self._config())
        log = open(self.dir / "rsyslogd.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(
            "127.0.0.1",
            self.port,
            timeout=30,
            alive=lambda: self.proc is not None and self.proc.poll() is None,
            what="rsyslogd",
        )

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def messages(self) -> list[bytes]:
        """Every message received so far, in order (rsyslog escapes control characters as #ooo)."""
        if not self.output.exists():
            return []
        return [line for line in self.output.read_bytes().split(b"\n") if line.strip()]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.2)
        return self.messages()
