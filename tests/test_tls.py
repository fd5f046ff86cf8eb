"""Encryption in transit: DICOM TLS (PS3.15 B.1), HTTPS (RFC 8446 / RFC 9110) and security headers.

A throwaway PKI is made with the ``openssl`` CLI: a CA, simral's certificate (CN=localhost, SAN
DNS:localhost and IP:127.0.0.1, also used by the dcmtk ``storescp`` destination), a client
certificate for dcmtk (CN=dcmtk-node), and a client certificate from a CA simral does not trust.
Two ``simral serve`` processes: one whose DICOM TLS listener requires a client certificate (plain
HTTP), one that only verifies a certificate when presented and serves HTTPS.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from tests.corpus import ct_series
from tests.peers import StoreSCP, free_port
from tests.simral_proc import SIMRAL, TEST_ORGANISATION, SimralProcess

from simral.config import load_settings
from simral.server import PortInUse, check_ports_free

SCU = "DCMTK"
DEST = "TLSDEST"
CLIENT_CN = "dcmtk-node"


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: Signed by a CA simral does not trust.
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(
        ["/usr/bin/openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _leaf(directory: Path, name: str, cn: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n" + (f"subjectAltName={san}\n" if san else "")
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", key, "-out", csr,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2",
        "-extfile", extensions, "-out", cert,
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "simral-test-ca")
    rogue_ca = _ca(directory, "rogue-ca")
    server = _leaf(directory, "server", "localhost", ca, "DNS:localhost,IP:127.0.0.1")
    client = _leaf(directory, "client", CLIENT_CN, ca, "")
    rogue = _leaf(directory, "rogue", CLIENT_CN, rogue_ca, "")
    return Pki(ca[0], *server, *client, *rogue)


def _tls_env(pki: Pki, *, tls_port: int, require_client_cert: bool, https: bool) -> dict[str, str]:
    return {
        "SIMRAL_TLS_CERT_FILE": str(pki.server_cert),
        "SIMRAL_TLS_KEY_FILE": str(pki.server_key),
        "SIMRAL_TLS_CA_FILE": str(pki.ca),
        "SIMRAL_DICOM_TLS_PORT": str(tls_port),
        "SIMRAL_DICOM_TLS_REQUIRE_CLIENT_CERT": "true" if require_client_cert else "false",
        "SIMRAL_HTTPS": "true" if https else "false",
    }


# --------------------------------------------------------------------------- simral processes


@dataclass
class TlsArchive:
    simral: SimralProcess
    tls_port: int
    pki: Pki

    def dcmtk(
        self,
        tool: str,
        *args: str,
        files: list[Path] | None = None,
        tls: tuple[str | Path, ...] | None = None,
        plain: bool = False,
        aet: str = SCU,
    ) -> subprocess.CompletedProcess[str]:
        """Run a dcmtk tool against the TLS port with ``tls`` options (``plain``: the plain port)."""
        port = self.simral.dicom_port if plain else self.tls_port
        tls_options = () if plain else (tls if tls is not None else self.client_tls)
        return subprocess.run(
            [
                f"/usr/bin/{tool}", "-aet", aet, "-aec", self.simral.ae_title, *map(str, tls_options),
                *args, "127.0.0.1", str(port), *map(str, files or ()),
            ],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def client_tls(self) -> tuple[str | Path, ...]:
        """dcmtk options: authenticated TLS with the dcmtk client certificate, trusting our CA."""
        return ("+tls", self.pki.client_key, self.pki.client_cert, "+cf", self.pki.ca)

    def stored_uids(self, study_uid: str, *, plain: bool = False) -> list[str]:
        """SOP Instance UIDs of ``study_uid`` as C-FIND (findscu) reports them."""
        result = self.dcmtk(
            "findscu", "-v", "-S", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid}",
            "-k", "SOPInstanceUID", plain=plain,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        lines = (result.stdout + result.stderr).splitlines()
        return [line.split("[", 1)[1].split("]", 1)[0] for line in lines if "(0008,0018) UI [" in line]


def _start(base: Path, pki: Pki, *, require_client_cert: bool, https: bool) -> TlsArchive:
    tls_port = free_port()
    simral = SimralProcess(
        base / "data",
        env=_tls_env(pki, tls_port=tls_port, require_client_cert=require_client_cert, https=https),
    )
    simral.add_node("dcmtk", SCU, 104)
    return TlsArchive(simral, tls_port, pki)


@pytest.fixture(scope="module")
def strict(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsArchive]:
    """Client certificates required on the TLS port; plain HTTP."""
    archive = _start(tmp_path_factory.mktemp("tls-strict"), pki, require_client_cert=True, https=False)
    with archive.simral:
        yield archive


@pytest.fixture(scope="module")
def lenient(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsArchive]:
    """Client certificates verified when presented; HTTPS."""
    archive = _start(tmp_path_factory.mktemp("tls-lenient"), pki, require_client_cert=False, https=True)
    with archive.simral:
        yield archive


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    files = ct_series(
        tmp_path_factory.mktemp("tls-ct"),
        slices=3,
        rows=64,
        cols=64,
        patient_id="TLS001",
        patient_name="TLS^TEST",
    )
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


@pytest.fixture(scope="module")
def stored(strict: TlsArchive, study: tuple[str, list[Path]]) -> tuple[str, list[Path]]:
    """``study`` sent to ``strict`` with storescu over authenticated TLS (PS3.15 B.1)."""
    result = strict.dcmtk("storescu", files=study[1])
    assert result.returncode == 0, result.stdout + result.stderr + strict.simral.log_tail()
    return study


def _uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


# --------------------------------------------------------------------------- DICOM TLS as SCP


def test_dcmtk_store_and_find_over_tls_with_client_certificate(
    strict: TlsArchive, stored: tuple[str, list[Path]]
) -> None:
    """PS3.15 B.1: storescu and findscu over authenticated TLS; the client CN reaches simral."""
    study_uid, files = stored
    assert set(strict.stored_uids(study_uid)) == _uids(files)
    assert f"client certificate CN={CLIENT_CN}" in strict.simral.log_tail(200)


def test_tls_port_refuses_clients_without_a_trusted_certificate(strict: TlsArchive, tmp_path: Path) -> None:
    """With dicom_tls_require_client_cert: anonymous TLS and a foreign CA's certificate are refused."""
    other = ct_series(tmp_path, slices=1, rows=32, cols=32, patient_id="TLS002", seed=7)
    anonymous = ("+tla", "+cf", strict.pki.ca)
    rogue = ("+tls", strict.pki.rogue_key, strict.pki.rogue_cert, "+cf", strict.pki.ca)
    for options in (anonymous, rogue):
        result = strict.dcmtk("storescu", files=other, tls=options)
        assert result.returncode != 0, result.stdout + result.stderr
    # Plain TCP on the TLS port is no DICOM association either.
    assert strict.dcmtk("echoscu", tls=()).returncode != 0
    other_study = str(dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)
    assert strict.stored_uids(other_study, plain=True) == []
    assert "DICOM TLS handshake" in strict.simral.log_tail(200)


def test_plain_port_works_alongside(strict: TlsArchive, tmp_path: Path) -> None:
    """The TLS listener is a second port: the plain one still stores and answers."""
    files = ct_series(tmp_path, slices=1, rows=32, cols=32, patient_id="TLS003", seed=3)
    result = strict.dcmtk("storescu", files=files, plain=True)
    assert result.returncode == 0, result.stdout + result.stderr
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert set(strict.stored_uids(study_uid, plain=True)) == _uids(files)
    assert set(strict.stored_uids(study_uid)) == _uids(files)  # and over TLS


def test_optional_client_certificate_allows_anonymous_tls(lenient: TlsArchive, tmp_path: Path) -> None:
    """Without the requirement a requestor may use TLS without a certificate (server-authenticated)."""
    files = ct_series(tmp_path, slices=1, rows=32, cols=32, patient_id="TLS004", seed=4)
    result = lenient.dcmtk("storescu", files=files, tls=("+tla", "+cf", lenient.pki.ca))
    assert result.returncode == 0, result.stdout + result.stderr + lenient.simral.log_tail()
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert set(lenient.stored_uids(study_uid)) == _uids(files)
    # A presented certificate is still verified: a foreign CA's is refused.
    rogue = ("+tls", lenient.pki.rogue_key, lenient.pki.rogue_cert, "+cf", lenient.pki.ca)
    assert lenient.dcmtk("echoscu", tls=rogue).returncode != 0


def test_node_bound_to_its_certificate(lenient: TlsArchive, tmp_path: Path) -> None:
    """A node registered with --tls-subject is accepted only over TLS with that verified certificate:
    its AE title alone (plain port, or anonymous TLS) is refused and the refusal is audited."""
    simral = lenient.simral
    simral.cli(
        "nodes", "add", "bound", "--ae", "BOUNDSCU", "--host", "127.0.0.1", "--port", "104",
        "--organisation", TEST_ORGANISATION, "--tls-subject", CLIENT_CN,
    )  # fmt: skip
    assert CLIENT_CN in simral.cli("nodes", "list").stdout
    files = ct_series(tmp_path, slices=1, rows=32, cols=32, patient_id="TLS005", seed=5)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    plain = lenient.dcmtk("storescu", files=files, plain=True, aet="BOUNDSCU")
    anonymous = lenient.dcmtk("storescu", files=files, tls=("+tla", "+cf", lenient.pki.ca), aet="BOUNDSCU")
    assert plain.returncode != 0 and anonymous.returncode != 0
    assert lenient.stored_uids(study_uid) == []
    refusals = simral.cli(
        "audit", "search", "--action", "association.refused", "--actor", "dicom-node:BOUNDSCU"
    ).stdout
    assert refusals.count("failure") == 2, refusals
    assert "client certificate" in simral.log_tail(200)
    # With the certificate: stored, and the node's principal says how it was identified.
    good = lenient.dcmtk("storescu", files=files, aet="BOUNDSCU")
    assert good.returncode == 0, good.stdout + good.stderr + simral.log_tail()
    assert set(lenient.stored_uids(study_uid)) == _uids(files)
    assert (
        "association.refused"
        not in simral.cli("audit", "search", "--actor", "dicom-node:BOUNDSCU", "--limit", "1").stdout
    )


# --------------------------------------------------------------------------- DICOM TLS as SCU


def test_move_to_a_tls_destination(strict: TlsArchive, stored: tuple[str, list[Path]]) -> None:
    """C-MOVE sub-operations go over TLS to a node registered with tls: storescp (dcmtk) requires
    and verifies simral's client certificate, simral verifies storescp's against the CA and name."""
    study_uid, files = stored
    pki = strict.pki
    tls_options = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)]
    with StoreSCP(aet=DEST, extra_args=tls_options) as dest:
        strict.simral.cli(
            "nodes", "add", "tlsdest", "--ae", DEST, "--host", "127.0.0.1", "--port", str(dest.dicom_port),
            "--organisation", TEST_ORGANISATION, "--tls",
        )  # fmt: skip
        result = strict.dcmtk(
            "movescu",
            "-S",
            "-aem",
            DEST,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            plain=True,  # dcmtk's movescu has no TLS: the sub-operations are what is tested
        )
        assert result.returncode == 0, result.stdout + result.stderr + strict.simral.log_tail()
        assert "Failed" not in result.stdout + result.stderr
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in dest.files()}
        assert received == _uids(files), dest.log_tail()


def test_storage_commitment_report_over_tls(strict: TlsArchive, stored: tuple[str, list[Path]]) -> None:
    """PS3.4 J.3.3 over PS3.15 B.1: a requestor (pynetdicom) asks over TLS and releases at once;
    simral opens a TLS association to the requestor's registered node, which requires and verifies
    simral's client certificate, and reports the instance committed."""
    _, files = stored
    ds = dcmread(files[0], stop_before_pixels=True)
    pki = strict.pki
    port = free_port()
    strict.simral.cli(
        "nodes", "add", "stgcmt", "--ae", "STGCMT", "--host", "127.0.0.1", "--port", str(port),
        "--organisation", TEST_ORGANISATION, "--tls",
    )  # fmt: skip
    received: list[Dataset] = []
    got = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        received.append(event.event_information)
        got.set()
        return 0x0000, None

    listener_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    listener_context.load_cert_chain(pki.server_cert, pki.server_key)
    listener_context.load_verify_locations(pki.ca)
    listener_context.verify_mode = ssl.CERT_REQUIRED
    listener = AE(ae_title="STGCMT")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=listener_context,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    try:
        client_context = ssl.create_default_context(cafile=pki.ca)
        client_context.load_cert_chain(pki.client_cert, pki.client_key)
        requestor = AE(ae_title="STGCMT")
        requestor.add_requested_context(StorageCommitmentPushModel)
        assoc = requestor.associate(
            "127.0.0.1",
            strict.tls_port,
            ae_title=strict.simral.ae_title,
            tls_args=(client_context, "localhost"),
        )
        assert assoc.is_established
        request = Dataset()
        request.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        request.ReferencedSOPSequence = [item]
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert status.Status == 0x0000
        assoc.release()
        assert got.wait(30), "no N-EVENT-REPORT over TLS:\n" + strict.simral.log_tail()
    finally:
        server.shutdown()
    assert str(received[0].TransactionUID) == str(request.TransactionUID)
    assert [str(i.ReferencedSOPInstanceUID) for i in received[0].ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID)
    ]


# --------------------------------------------------------------------------- HTTPS and headers


def _https_client(archive: TlsArchive) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://localhost:{archive.simral.http_port}",
        verify=ssl.create_default_context(cafile=str(archive.pki.ca)),
        trust_env=False,
        timeout=30,
        headers=archive.simral.auth_headers,
    )


def test_https_with_hsts_and_no_plain_http(lenient: TlsArchive) -> None:
    """RFC 8446 on the HTTP port, HSTS (RFC 6797) on every answer, plain HTTP refused."""
    with _https_client(lenient) as https:
        response = https.get("/healthz")
        assert response.status_code == 200
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert response.extensions["network_stream"].get_extra_info("ssl_object").version() in {
            "TLSv1.2",
            "TLSv1.3",
        }
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{lenient.simral.http_port}/healthz", trust_env=False, timeout=10)
    with pytest.raises(httpx.ConnectError):  # our certificate is not trusted without the test CA
        httpx.get(f"https://localhost:{lenient.simral.http_port}/healthz", trust_env=False, timeout=10)


EXPECTED_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


def _check_headers(response: httpx.Response, *, viewer: bool = False) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name, response.headers)
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert ("'wasm-unsafe-eval'" in csp) == viewer, csp


def test_security_headers(strict: TlsArchive, lenient: TlsArchive, stored: tuple[str, list[Path]]) -> None:
    """CSP, nosniff, no-referrer, DENY, COOP on pages, on a streamed DICOMweb answer and on the viewer;
    HSTS only over HTTPS."""
    study_uid, _ = stored
    with httpx.Client(
        base_url=strict.simral.http_url, trust_env=False, timeout=30, headers=strict.simral.auth_headers
    ) as http:
        home = http.get("/")
        _check_headers(home)
        assert "strict-transport-security" not in home.headers
        retrieve = http.get(f"/dicom-web/studies/{study_uid}")  # WADO-RS: a streamed multipart body
        assert retrieve.status_code == 200, retrieve.text[:200]
        assert retrieve.headers["content-type"].startswith("multipart/related")
        _check_headers(retrieve)
        _check_headers(http.get("/dicom-web/studies", params={"PatientID": "TLS001"}))
        _check_headers(http.get("/viewer/"), viewer=True)
        _check_headers(http.get("/viewer/app-config.js"), viewer=True)
    with _https_client(lenient) as https:
        for path in ("/", "/dicom-web/studies", "/viewer/"):
            response = https.get(path)
            _check_headers(response, viewer=path.startswith("/viewer"))
            assert response.headers["strict-transport-security"] == "max-age=31536000"


# --------------------------------------------------------------------------- configuration errors


def test_missing_certificate_stops_startup(tmp_path: Path) -> None:
    """A TLS listener without a readable certificate is a start-up error, not a runtime surprise."""
    result = subprocess.run(
        [SIMRAL, "serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", "0", "--http-port", "0"],
        env={
            **SimralProcess(tmp_path / "data").env,
            "SIMRAL_DICOM_TLS_PORT": str(free_port()),
            "SIMRAL_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
            "SIMRAL_TLS_KEY_FILE": str(tmp_path / "missing.key"),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tls_cert_file: no such file" in result.stderr


def test_tls_port_must_be_free(tmp_path: Path) -> None:
    """``simral serve`` checks the DICOM TLS port like the others before starting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            environ={},
            overrides={
                "data_dir": tmp_path,
                "dicom_host": "127.0.0.1",
                "dicom_port": 0,
                "http_port": 0,
                "dicom_tls_port": port,
            },
        )
        with pytest.raises(PortInUse, match="DICOM TLS port"):
            check_ports_free(settings)
