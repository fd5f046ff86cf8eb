"""A test DMP: an XDS.b registry/repository answering TD0.2, ITI-41 and ITI-57 over HTTPS on loopback.

It requires a client certificate from the test CA (mutual TLS), and checks every request the way the
DMP does before answering:

* the VIHF: the SAML assertion's XML signature is verified with signxml against the test CA, and its
  attributes (VIHF_Version 3.0, NameID, Issuer = the signing certificate's subject, roles,
  Secteur_Activite, resource-id = an INS, purpose of use, authentication mode, LPS fields);
* ITI-41: the body passes the conformance kit's ``validate.py xds`` (ebRS 3.0 + IHE XDS.b schemas,
  subprocess), the DocumentEntry codes are in the CI-SIS value sets of the kit (J01 author specialty,
  J02, J04, J07, J08, J231 reference id types), each document's ``hash`` (SHA-1) and ``size`` match
  its MTOM attachment, the XAdES signature document verifies with signxml against the test CA, its
  manifest digests every other document, and a ``signs`` association ties it to the SubmissionSet;
  an eventCode in JDV_ModaliteAcquisition_CISIS (1.2.250.1.213.1.1.5.618) is one of its codes; a
  CR-IMG report (text/xml, typeCode 18748-4) names the SubmissionSet's patient by INS in its
  recordTarget (1.2.250.1.213.1.4.8 … .11) and passes ``validate.py cda`` (the CR-IMG schematron for
  structured headings, the XSD only for a level 1 document);
* TD0.2: the sender device id (and the message id's root) is an OID;
* ITI-57: the ``lcm:SubmitObjectsRequest`` is schema-valid (ebRS 3.0 ``lcm.xsd`` of the kit); a
  metadata update names (``lid``) an entry the test DMP registered and its PreviousVersion is that
  entry's current version (XDSMetadataVersionError otherwise), which the update then increments.

It then answers like the DMP: from a scripted behaviour queue (:class:`Success`, :class:`Failure` with
registry errors, :class:`NoAnswer` until the client gives up), a Failure
``XDSRegistryMetadataError`` whenever a check failed. Everything received is recorded
(:attr:`TestDmp.received`) for the tests to assert on (RPLC associations, attachments, problems).

Usage from any test module::

    with TestDmp(make_pki(tmp_path)) as dmp:
        dmp.set_patient("248039263001064", authorisation="VALIDE")
        dmp.behaviours.append(Failure([("XDSPatientIdDoesNotMatch", "…")]))
        ... DmpEndpoint(iti41_url=dmp.url("iti41"), ...)
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import http.server
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree
from signxml import SignatureConfiguration, XMLVerifier
from signxml.xades import XAdESVerifier
from tests.peers import HOST, free_port

from simral.xds import metadata as md
from simral.xds import soap
from simral.xds.vihf import ATTR_PURPOSE_OF_USE, ATTR_RESOURCE_ID, ATTR_ROLE, ATTR_SUBJECT_ID, SAML

REPO = Path(__file__).resolve().parent.parent
#: The conformance kit (never copied): SIMRAL_CONFORMANCE_DIR, else ../shared/conformance.
CONFORMANCE_DIR = Path(os.environ.get("SIMRAL_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
VALIDATE = CONFORMANCE_DIR / "validate.py"
JDV = CONFORMANCE_DIR / "ans-cisis" / "jeuxDeValeurs"
LCM_XSD = CONFORMANCE_DIR / "ihe-xds" / "schema" / "ebRS30" / "lcm.xsd"
#: The DRIM-M ITI-41 samples of the kit (the shape our submissions are compared with).
DRIMM_SAMPLES = [
    CONFORMANCE_DIR / "drim-m" / "validateur-xds" / "XDS.xml",
    CONFORMANCE_DIR / "drim-m" / "cross-validateur" / "XDS.xml",
]
CDA_NS = "urn:hl7-org:v3"
#: eventCodeList codingScheme of the acquisition modality (JDV_ModaliteAcquisition_CISIS).
MODALITY_JDV = "1.2.250.1.213.1.1.5.618"
RIM = f"{{{md.RIM}}}"
DS = "http://www.w3.org/2000/09/xmldsig#"
INS_OIDS = {"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"}
#: classCode (JDV J06 is not in the kit): the values simral sends, as the DMP lists them.
CLASS_CODES = {
    ("10", "1.2.250.1.213.1.1.4.1"),
    ("31", "1.2.250.1.213.1.1.4.1"),
    (md.SIGNATURE_CLASS.code, "URN"),
}
FORMAT_CODES = {
    (md.REPORT_FORMAT_STRUCTURED.code, md.REPORT_FORMAT_STRUCTURED.scheme),
    (md.REPORT_FORMAT_PDF.code, md.REPORT_FORMAT_PDF.scheme),
    (md.KOS_FORMAT.code, md.KOS_FORMAT.scheme),
    (md.SIGNATURE_FORMAT.code, md.SIGNATURE_FORMAT.scheme),
}
SIGNATURE_TYPE = (md.SIGNATURE_TYPE.code, md.SIGNATURE_TYPE.scheme)


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    org_cert: Path  # the organisation's certificate: TLS client and signing (RSA)
    org_key: Path
    rogue_cert: Path  # a certificate from a CA the test DMP does not trust
    rogue_key: Path


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=not ca and not server,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _name(**parts: str) -> x509.Name:
    oids = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}
    attributes = [x509.NameAttribute(oids[k], v) for k, v in parts.items() if k in oids]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, parts["CN"]))
    return x509.Name(attributes)


def make_pki(directory: Path) -> Pki:
    """A test CA (IGC-Santé stand-in), the test DMP's server certificate, the organisation's
    certificate (subject shaped like an ANS "personne morale" certificate) and a rogue one."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = _rsa(), _rsa()
    ca_name, rogue_ca_name = _name(C="FR", O="Test IGC-Sante", CN="simral test CA"), _name(CN="rogue CA")
    ca = _cert(ca_name, ca_key, None, ca=True)
    rogue_ca = _cert(rogue_ca_name, rogue_ca_key, None, ca=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    paths: dict[str, Path] = {}
    for name, subject, issuer, server in (
        ("server", _name(CN="localhost"), (ca_name, ca_key), True),
        (
            "org",
            _name(C="FR", O="CH TEST SIMRAL", OU="11890000037", CN="simral.test"),
            (ca_name, ca_key),
            False,
        ),
        ("rogue", _name(C="FR", O="ROGUE", CN="rogue"), (rogue_ca_name, rogue_ca_key), False),
    ):
        key = _rsa()
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(_cert(subject, key, issuer, server=server).public_bytes(pem))
        paths[f"{name}_key"] = directory / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    del rogue_ca
    return Pki(ca=directory / "ca.pem", **paths)


# --------------------------------------------------------------------------- behaviours and records


@dataclass(frozen=True)
class Success:
    warnings: tuple[tuple[str, str], ...] = ()  # (errorCode, codeContext) answered as Warning severity


@dataclass(frozen=True)
class Failure:
    errors: list[tuple[str, str]]  # (errorCode, codeContext)
    soap_fault: bool = False  # answer a SOAP 1.2 Fault instead of a RegistryResponse


@dataclass(frozen=True)
class NoAnswer:
    seconds: float = 30.0  # hold the connection without answering (the client times out first)


Behaviour = Success | Failure | NoAnswer


@dataclass(frozen=True)
class PatientDmp:
    exists: bool = True
    authorisation: str = "VALIDE"  # VALIDE, EXPIREE, INTERDITE, NON_EXISTE


@dataclass
class Received:
    """One request as the test DMP saw it, with what its checks found."""

    transaction: str  # "TD0.2" | "ITI-41" | "ITI-57" | "?"
    envelope: etree._Element
    attachments: dict[str, bytes]
    client_subject: str
    vihf: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    validate_output: str = ""
    validate_seconds: float = 0.0
    #: ``validate.py cda`` output for each CR-IMG report attached (by DocumentEntry id).
    cda_output: dict[str, str] = field(default_factory=dict)
    #: Metadata updates (ITI-57) to apply once accepted: logicalId → new version.
    updates: dict[str, int] = field(default_factory=dict)
    answered: str = ""

    def objects(self, tag: str) -> list[etree._Element]:
        """The ebRIM objects of the request (``ExtrinsicObject``, ``Association``, ``RegistryPackage``)."""
        return list(self.envelope.iter(f"{RIM}{tag}"))

    def associations(self, kind: str) -> list[tuple[str, str]]:
        return [
            (a.get("sourceObject", ""), a.get("targetObject", ""))
            for a in self.objects("Association")
            if a.get("associationType") == kind
        ]

    def td02_sender(self) -> str:
        """TD0.2: the sender device's id root."""
        found = self.envelope.find(f".//{{{soap.HL7}}}sender/{{{soap.HL7}}}device/{{{soap.HL7}}}id")
        return found.get("root", "") if found is not None else ""

    def documents(self) -> dict[str, bytes]:
        """Attachment bytes by DocumentEntry id (``xdsb:Document/@id``)."""
        found: dict[str, bytes] = {}
        for document in self.envelope.iter(f"{{{md.XDSB}}}Document"):
            include = document.find(f"{{{md.XOP}}}Include")
            if include is not None:
                found[document.get("id", "")] = self.attachments.get(
                    include.get("href", "").removeprefix("cid:"), b""
                )
        return found


# --------------------------------------------------------------------------- checks


def _jdv(name: str) -> set[tuple[str, str]]:
    svs = etree.parse(str(JDV / name))
    return {(c.get("code", ""), c.get("codeSystem", "")) for c in svs.iter("{urn:ihe:iti:svs:2008}Concept")}


class _ValueSets:
    def __init__(self) -> None:
        self.by_scheme = {
            md.DE_TYPE: ("typeCode", _jdv("JDV_J07_XdsTypeCode_CISIS.xml") | {SIGNATURE_TYPE}),
            md.DE_CONFIDENTIALITY: ("confidentialityCode", _jdv("JDV_J08_XdsConfidentialityCode_CISIS.xml")),
            md.DE_FACILITY_TYPE: (
                "healthcareFacilityTypeCode",
                _jdv("JDV_J02_XdsHealthcareFacilityTypeCode_CISIS.xml"),
            ),
            md.DE_PRACTICE_SETTING: ("practiceSettingCode", _jdv("JDV_J04_XdsPracticeSettingCode_CISIS.xml")),
            md.DE_CLASS: ("classCode", CLASS_CODES),
            md.DE_FORMAT: ("formatCode", FORMAT_CODES),
        }
        self.specialties = _jdv("JDV_J01_XdsAuthorSpecialty_CISIS.xml")
        self.reference_id_types = {
            code for code, _ in _jdv("JDV_J231_XdsTypesIdentifiantsReferenceId_DMP.xml")
        }
        self.modalities = {code for code, _ in _jdv("JDV_ModaliteAcquisition_CISIS.xml")}


def _slot_values(element: etree._Element, name: str) -> list[str]:
    return [v.text or "" for v in element.iterfind(f"{RIM}Slot[@name='{name}']/{RIM}ValueList/{RIM}Value")]


def _external_id(element: etree._Element, scheme: str) -> str | None:
    found = element.find(f"{RIM}ExternalIdentifier[@identificationScheme='{scheme}']")
    return found.get("value") if found is not None else None


def _subject_dn(certificate: x509.Certificate) -> str:
    return ", ".join(rdn.rfc4514_string() for rdn in reversed(certificate.subject.rdns))


def _ins_ok(value: str) -> bool:
    match = re.fullmatch(r"(\d{13,15})\^\^\^&([0-9.]+)&ISO\^NH", value)
    return match is not None and match.group(2) in INS_OIDS


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def record_target_ins(cda: bytes) -> list[str]:
    """The INS ids of a CDA's recordTarget, as XDS patientIds (``matricule^^^&OID&ISO^NH``)."""
    root = etree.fromstring(cda, etree.XMLParser(resolve_entities=False, no_network=True))
    return [
        f"{element.get('extension', '')}^^^&{element.get('root', '')}&ISO^NH"
        for element in root.iterfind(f"{{{CDA_NS}}}recordTarget/{{{CDA_NS}}}patientRole/{{{CDA_NS}}}id")
        if element.get("root") in INS_OIDS
    ]


def shape(element: etree._Element) -> tuple[set[str], set[str], set[str], set[str]]:
    """Of an ExtrinsicObject or RegistryPackage: its direct slot names, classification schemes (or
    nodes), external identifier schemes and author slot names."""
    slots = {s.get("name", "") for s in element.iterfind(f"{RIM}Slot")}
    schemes = {
        c.get("classificationScheme") or c.get("classificationNode") or ""
        for c in element.iterfind(f"{RIM}Classification")
    }
    externals = {e.get("identificationScheme", "") for e in element.iterfind(f"{RIM}ExternalIdentifier")}
    author_slots = {
        s.get("name", "")
        for c in element.iterfind(f"{RIM}Classification")
        if c.get("classificationScheme") in (md.SS_AUTHOR, md.DE_AUTHOR)
        for s in c.iterfind(f"{RIM}Slot")
    }
    return slots, schemes, externals, author_slots


def entry_by_class(root: etree._Element, class_code: str) -> etree._Element:
    """The ExtrinsicObject of ``root`` with this classCode."""
    for eo in root.iter(f"{RIM}ExtrinsicObject"):
        for cl in eo.iterfind(f"{RIM}Classification[@classificationScheme='{md.DE_CLASS}']"):
            if cl.get("nodeRepresentation") == class_code:
                return eo
    raise AssertionError(f"no ExtrinsicObject with classCode {class_code}")


def shape_differences(ours: etree._Element, sample: etree._Element) -> list[str]:
    """How an ITI-41 request (``ours``: its body or SOAP envelope) differs in shape from a DRIM-M
    sample: the SubmissionSet's, and each of our KOS, signature and report entries' against the
    sample's KOS or signature entry — slot names, classification schemes, external identifier schemes
    (equal), author slots (at least the sample's) — and the association types (the sample's, plus RPLC
    when we replace an entry). The sample's URI slot is XDM's (ITI TF-3 §4.2.3.2.26), never sent in
    ITI-41; the cross-validateur sample leaves out hash and size, which ITI-41 sources may send."""
    found: list[str] = []
    sample_extra = {"URI"}
    ours_extra = set() if "hash" in {s.get("name") for s in sample.iter(f"{RIM}Slot")} else {"hash", "size"}

    def compare(label: str, mine: etree._Element, theirs: etree._Element, extra: set[str]) -> None:
        our_shape, their_shape = shape(mine), shape(theirs)
        if our_shape[0] - extra != their_shape[0] - sample_extra:
            found.append(
                f"{label}: slots {sorted(our_shape[0] - extra)} vs {sorted(their_shape[0] - sample_extra)}"
            )
        for index, what in ((1, "classifications"), (2, "external identifiers")):
            if our_shape[index] != their_shape[index]:
                found.append(f"{label}: {what} {sorted(our_shape[index] ^ their_shape[index])} differ")
        if not our_shape[3] >= their_shape[3]:
            found.append(f"{label}: author slots {sorted(their_shape[3] - our_shape[3])} missing")

    compare(
        "SubmissionSet",
        next(ours.iter(f"{RIM}RegistryPackage")),
        next(sample.iter(f"{RIM}RegistryPackage")),
        set(),
    )
    classes = {
        cl.get("nodeRepresentation", "")
        for cl in ours.iter(f"{RIM}Classification")
        if cl.get("classificationScheme") == md.DE_CLASS
    }
    for our_class, sample_class in (
        (md.KOS_CLASS.code, md.KOS_CLASS.code),
        (md.SIGNATURE_CLASS.code, md.SIGNATURE_CLASS.code),
        (md.REPORT_CLASS.code, md.KOS_CLASS.code),  # a report entry: the same slots and schemes
    ):
        if our_class in classes:
            compare(
                f"classCode {our_class}",
                entry_by_class(ours, our_class),
                entry_by_class(sample, sample_class),
                ours_extra,
            )
    our_types = {a.get("associationType", "") for a in ours.iter(f"{RIM}Association")} - {md.RPLC}
    sample_types = {a.get("associationType", "") for a in sample.iter(f"{RIM}Association")}
    if our_types != sample_types:
        found.append(f"association types {sorted(our_types)} vs {sorted(sample_types)}")
    return found


def event_codes(entry: etree._Element) -> set[tuple[str, str]]:
    """(code, codingScheme) of an ExtrinsicObject's eventCodeList."""
    return {
        (cl.get("nodeRepresentation", ""), (_slot_values(cl, "codingScheme") or [""])[0])
        for cl in entry.iterfind(f"{RIM}Classification[@classificationScheme='{md.DE_EVENT}']")
    }


class TestDmp:
    """The test DMP server; a context manager (``start()`` / ``stop()`` may also be called again)."""

    __test__ = False  # not a pytest test class

    def __init__(self, pki: Pki, *, port: int | None = None, validate_timeout: float = 120.0) -> None:
        self.pki = pki
        self.port = port or free_port()
        self.behaviours: collections.deque[Behaviour] = collections.deque()
        self.patients: dict[str, PatientDmp] = {}
        self.received: list[Received] = []
        self.validate_timeout = validate_timeout
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._value_sets = _ValueSets()
        self._lcm_schema: etree.XMLSchema | None = None
        #: The entries registered (accepted ITI-41): logicalId → metadata version (ITI TF-3 §4.1.16).
        self.registry: dict[str, int] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="simral-test-dmp-"))

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, service: str) -> str:
        """``https://127.0.0.1:PORT/<service>`` (any path answers; the action selects the transaction)."""
        return f"https://{HOST}:{self.port}/{service}"

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.pki.server_cert), str(self.pki.server_key))
        context.load_verify_locations(cafile=str(self.pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        dmp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # no PHI in test logs either
                return

            def do_POST(self) -> None:
                dmp._handle(self)

        self._release.clear()
        server = http.server.ThreadingHTTPServer((HOST, self.port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="test-dmp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ scripting

    def set_patient(self, ins: str, *, exists: bool = True, authorisation: str = "VALIDE") -> None:
        self.patients[ins] = PatientDmp(exists=exists, authorisation=authorisation)

    def last(self, transaction: str) -> Received:
        found = [r for r in self.received if r.transaction == transaction]
        assert found, f"the test DMP received no {transaction}"
        return found[-1]

    # ------------------------------------------------------------------ request handling

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        body = request.rfile.read(length)
        peer = request.connection.getpeercert() if isinstance(request.connection, ssl.SSLSocket) else None
        client_subject = ", ".join(
            f"{k}={v}" for rdn in reversed((peer or {}).get("subject", ())) for k, v in rdn
        )
        try:
            env, attachments = soap.parse_message(request.headers.get("Content-Type", ""), body)
        except soap.SoapFormatError as exc:
            self._send(request, 400, "text/plain", str(exc).encode())
            return
        action = soap.header_text(env, "Action") or ""
        transaction = {
            soap.ACTION_TD02: "TD0.2",
            soap.ACTION_ITI41: "ITI-41",
            soap.ACTION_ITI57: "ITI-57",
        }.get(action, "?")
        received = Received(transaction, env, attachments, client_subject)
        with self._lock:
            self.received.append(received)
        received.vihf = self._check_vihf(env, received.problems)
        if transaction == "ITI-41":
            self._check_iti41(received)
        elif transaction == "ITI-57":
            self._check_iti57(received)
        elif transaction == "TD0.2":
            self._check_td02(received)
        elif transaction == "?":
            received.problems.append(f"unknown WS-Addressing Action {action!r}")
        if transaction == "TD0.2":
            self._answer_td02(request, received)
            return
        behaviour: Behaviour = Success()
        with self._lock:
            if self.behaviours:
                behaviour = self.behaviours.popleft()
        if isinstance(behaviour, NoAnswer):
            received.answered = "no answer"
            self._release.wait(behaviour.seconds)
            request.close_connection = True
            return
        if received.problems:
            behaviour = Failure([("XDSRegistryMetadataError", p) for p in received.problems])
        self._answer_registry(request, received, behaviour, action)

    def _send(
        self, request: http.server.BaseHTTPRequestHandler, code: int, content_type: str, body: bytes
    ) -> None:
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def _reply(self, received: Received, action: str, body: etree._Element) -> etree._Element:
        env = soap.envelope(action=action, to=soap.ANONYMOUS, body=body, assertion=None)
        header = env.find(f"{{{soap.SOAP12}}}Header")
        assert header is not None
        relates = etree.SubElement(header, f"{{{soap.WSA}}}RelatesTo")
        relates.text = soap.header_text(received.envelope, "MessageID")
        return env

    def _answer_registry(
        self,
        request: http.server.BaseHTTPRequestHandler,
        received: Received,
        behaviour: Behaviour,
        action: str,
    ) -> None:
        response_action = action + "Response"
        if isinstance(behaviour, Failure) and behaviour.soap_fault:
            received.answered = "soap fault"
            code, reason = behaviour.errors[0]
            fault = etree.Element(f"{{{soap.SOAP12}}}Fault")
            code_el = etree.SubElement(fault, f"{{{soap.SOAP12}}}Code")
            etree.SubElement(code_el, f"{{{soap.SOAP12}}}Value").text = "soap:Sender"
            sub = etree.SubElement(code_el, f"{{{soap.SOAP12}}}Subcode")
            etree.SubElement(sub, f"{{{soap.SOAP12}}}Value").text = code
            reason_el = etree.SubElement(fault, f"{{{soap.SOAP12}}}Reason")
            text = etree.SubElement(reason_el, f"{{{soap.SOAP12}}}Text")
            text.set("{http://www.w3.org/XML/1998/namespace}lang", "fr")
            text.text = reason
            env = self._reply(received, "http://www.w3.org/2005/08/addressing/soap/fault", fault)
            self._send(request, 500, "application/soap+xml; charset=UTF-8", etree.tostring(env))
            return
        if isinstance(behaviour, Failure):
            received.answered = "failure"
            errors = tuple(soap.RegistryError(c, soap.SEVERITY_ERROR, t, "") for c, t in behaviour.errors)
            status = soap.STATUS_FAILURE
        else:
            assert isinstance(behaviour, Success)
            received.answered = "success"
            errors = tuple(soap.RegistryError(c, soap.SEVERITY_WARNING, t, "") for c, t in behaviour.warnings)
            status = soap.STATUS_SUCCESS
            with self._lock:
                if received.transaction == "ITI-41":
                    self.registry.update((eo.get("id", ""), 1) for eo in received.objects("ExtrinsicObject"))
                self.registry.update(received.updates)
        env = self._reply(received, response_action, soap.registry_response_element(status, errors))
        if received.transaction == "ITI-41":  # answered as MTOM, as CXF-based registries do
            message = soap.mtom_encode(env, {}, action=response_action)
            self._send(request, 200, message.content_type, message.body)
        else:
            self._send(request, 200, "application/soap+xml; charset=UTF-8", etree.tostring(env))

    def _answer_td02(self, request: http.server.BaseHTTPRequestHandler, received: Received) -> None:
        h = soap.HL7
        query = soap.body_of(received.envelope)
        ins = query.find(f".//{{{h}}}patientIdentifier/{{{h}}}value")
        patient = self.patients.get(
            ins.get("extension", "") if ins is not None else "", PatientDmp(exists=False)
        )
        answer = etree.Element(f"{{{h}}}PRPA_IN201308UV02", nsmap={None: h}, ITSVersion="XML_1.0")
        etree.SubElement(answer, f"{{{h}}}id", root=soap.DMP_DEVICE_OID, extension=str(time.time_ns()))
        ack = etree.SubElement(
            answer, f"{{{h}}}acknowledgement", typeCode="AE" if received.problems else "AA"
        )
        if received.problems:
            detail = etree.SubElement(ack, f"{{{h}}}acknowledgementDetail")
            etree.SubElement(detail, f"{{{h}}}text").text = "; ".join(received.problems)
        line = etree.SubElement(answer, f"{{{h}}}attentionLine")
        etree.SubElement(line, f"{{{h}}}keyWordText", code="AUTORISATION")
        etree.SubElement(
            line, f"{{{h}}}value", code=patient.authorisation if patient.exists else "NON_EXISTE"
        )
        control = etree.SubElement(answer, f"{{{h}}}controlActProcess", classCode="CACT", moodCode="EVN")
        query_ack = etree.SubElement(control, f"{{{h}}}queryAck")
        etree.SubElement(query_ack, f"{{{h}}}queryResponseCode", code="OK" if patient.exists else "NF")
        received.answered = "td0.2"
        env = self._reply(received, soap.ACTION_TD02_RESPONSE, answer)
        self._send(request, 200, "application/soap+xml; charset=UTF-8", etree.tostring(env))

    # ------------------------------------------------------------------ VIHF

    def _check_vihf(self, env: etree._Element, problems: list[str]) -> dict[str, list[str]]:
        assertion = env.find(f"{{{soap.SOAP12}}}Header/{{{soap.WSSE}}}Security/{{{SAML}}}Assertion")
        if assertion is None:
            problems.append("VIHF: no saml2:Assertion in wsse:Security")
            return {}
        try:
            result = XMLVerifier().verify(
                assertion,
                ca_pem_file=str(self.pki.ca),
                id_attribute="ID",
                expect_config=SignatureConfiguration(expect_references=1),
            )
        except Exception as exc:  # signxml raises several exception types
            problems.append(f"VIHF: signature does not verify: {exc}")
            return {}
        signed = result.signed_xml
        assert signed is not None
        values: dict[str, list[str]] = {}
        for attribute in signed.iterfind(f"{{{SAML}}}AttributeStatement/{{{SAML}}}Attribute"):
            values[attribute.get("Name", "")] = [
                (etree.tostring(v[0]).decode() if len(v) else (v.text or "")).strip()
                for v in attribute.iterfind(f"{{{SAML}}}AttributeValue")
            ]
        certificate = x509.load_der_x509_certificate(
            base64.b64decode(assertion.findtext(f".//{{{DS}}}X509Certificate", ""))
        )
        issuer = signed.findtext(f"{{{SAML}}}Issuer", "")
        name_id = signed.findtext(f"{{{SAML}}}Subject/{{{SAML}}}NameID", "")
        values["Issuer"], values["NameID"] = [issuer], [name_id]
        checks = [
            (values.get("VIHF_Version") == ["3.0"], "VIHF_Version must be 3.0"),
            (issuer == _subject_dn(certificate), "Issuer must be the signing certificate's subject DN"),
            (re.fullmatch(r"8\d{11}", name_id) is not None, "NameID must be a national id 8 + RPPS"),
            (bool(values.get(ATTR_SUBJECT_ID, [""])[0]), "subject-id missing"),
            (bool(values.get("Identifiant_Structure", [""])[0]), "Identifiant_Structure missing"),
            (
                re.fullmatch(r"SA\d\d\^1\.2\.250\.1\.71\.4\.2\.4", values.get("Secteur_Activite", [""])[0])
                is not None,
                "Secteur_Activite must be SAnn^1.2.250.1.71.4.2.4",
            ),
            (_ins_ok(values.get(ATTR_RESOURCE_ID, [""])[0]), "resource-id must be an INS ^^^&OID&ISO^NH"),
            (
                any('codeSystem="1.2.250.1.71.1.2.7"' in r for r in values.get(ATTR_ROLE, [])),
                "subject:role must hold the profession (1.2.250.1.71.1.2.7)",
            ),
            (
                any('codeSystem="1.2.250.1.213.1.1.4.248"' in r for r in values.get(ATTR_PURPOSE_OF_USE, [])),
                "purposeofuse must be a CE of 1.2.250.1.213.1.1.4.248",
            ),
            (
                values.get("Authentification_Mode", [""])[0] in {"DIRECTE", "INDIRECTE"},
                "Authentification_Mode",
            ),
            (values.get("Ressource_URN") == ["urn:dmp"], "Ressource_URN must be urn:dmp"),
        ]
        checks += [
            (bool(values.get(k, [""])[0]), f"{k} missing") for k in ("LPS_ID", "LPS_Nom", "LPS_Version")
        ]
        checks.append(
            (bool(values.get("LPS_ID_HOMOLOGATION_DMP", [""])[0]), "LPS_ID_HOMOLOGATION_DMP missing")
        )
        problems.extend(f"VIHF: {message}" for ok, message in checks if not ok)
        return values

    # ------------------------------------------------------------------ ITI-41

    def _run_validate(self, received: Received) -> None:
        path = self.dir / f"iti41-{time.time_ns()}.xml"
        path.write_bytes(etree.tostring(received.envelope, xml_declaration=True, encoding="UTF-8"))
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(VALIDATE), "xds", str(path)],
            capture_output=True,
            text=True,
            timeout=self.validate_timeout,
            check=False,
        )
        received.validate_seconds = time.monotonic() - started
        received.validate_output = result.stdout + result.stderr
        if result.returncode != 0:
            received.problems.append(f"validate.py xds failed: {received.validate_output.strip()}")
        received.problems.extend(
            f"value set: {line.strip()}"
            for line in result.stdout.splitlines()
            if line.strip().startswith("WARN")
        )

    def _check_iti41(self, received: Received) -> None:
        self._run_validate(received)
        problems = received.problems
        documents = received.documents()
        packages = received.objects("RegistryPackage")
        if len(packages) != 1:
            problems.append("exactly one SubmissionSet expected")
            return
        submission = packages[0]
        ss_patient = _external_id(submission, md.SS_PATIENT_ID) or ""
        if not _ins_ok(ss_patient):
            problems.append("SubmissionSet.patientId must be an INS")
        if received.vihf.get(ATTR_RESOURCE_ID, [""])[0] != ss_patient:
            problems.append("VIHF resource-id differs from the SubmissionSet patientId")
        entries = {eo.get("id", ""): eo for eo in received.objects("ExtrinsicObject")}
        unique_ids: dict[str, str] = {}
        for entry_id, eo in entries.items():
            unique_ids[entry_id] = _external_id(eo, md.DE_UNIQUE_ID) or ""
            if _external_id(eo, md.DE_PATIENT_ID) != ss_patient:
                problems.append(f"{entry_id}: patientId differs from the SubmissionSet's")
            content = documents.get(entry_id)
            if content is None:
                problems.append(f"{entry_id}: no xdsb:Document / MTOM attachment")
                continue
            if _slot_values(eo, "hash") != [hashlib.sha1(content).hexdigest().upper()]:
                problems.append(
                    f"{entry_id}: hash does not match the attachment (XDSRepositoryMetadataError)"
                )
            if _slot_values(eo, "size") != [str(len(content))]:
                problems.append(f"{entry_id}: size does not match the attachment")
            for cl in eo.iterfind(f"{RIM}Classification"):
                scheme = cl.get("classificationScheme", "")
                if scheme == md.DE_AUTHOR:
                    for specialty in _slot_values(cl, "authorSpecialty"):
                        code, system = specialty.split("^")[0], specialty.rsplit("^", 1)[-1]
                        if (code, system) not in self._value_sets.specialties:
                            problems.append(f"{entry_id}: authorSpecialty {code} not in J01")
                    continue
                if scheme not in self._value_sets.by_scheme:
                    continue
                label, allowed = self._value_sets.by_scheme[scheme]
                coded = (cl.get("nodeRepresentation", ""), (_slot_values(cl, "codingScheme") or [""])[0])
                if coded not in allowed:
                    problems.append(f"{entry_id}: {label} {coded[0]}^{coded[1]} not in its value set")
            for value in _slot_values(eo, "urn:ihe:iti:xds:2013:referenceIdList"):
                if value.rsplit("^", 1)[-1] not in self._value_sets.reference_id_types:
                    problems.append(f"{entry_id}: referenceIdList type of {value} not in J231")
            for code, scheme in event_codes(eo):
                if scheme == MODALITY_JDV and code not in self._value_sets.modalities:
                    problems.append(f"{entry_id}: eventCode {code} not in JDV_ModaliteAcquisition_CISIS")
            if eo.get("mimeType") == "text/xml" and any(
                cl.get("classificationScheme") == md.DE_TYPE
                and cl.get("nodeRepresentation") == md.REPORT_TYPE.code
                for cl in eo.iterfind(f"{RIM}Classification")
            ):
                self._check_report_cda(received, entry_id, eo, content, ss_patient)
        self._check_signature(received, entries, unique_ids, documents, submission.get("id", ""))

    def _check_report_cda(
        self, received: Received, entry_id: str, eo: etree._Element, content: bytes, ss_patient: str
    ) -> None:
        """A CR-IMG report: its recordTarget names the SubmissionSet's patient by INS, and it passes
        ``validate.py cda`` (the CR-IMG 2024.01 schematron, or only the XSD for a level 1 document)."""
        try:
            named = record_target_ins(content)
        except etree.XMLSyntaxError as exc:
            received.problems.append(f"{entry_id}: the CDA is not well-formed: {exc}")
            return
        if ss_patient not in named:
            received.problems.append(
                f"{entry_id}: the CDA's recordTarget does not name the SubmissionSet's patient by INS"
                f" (found {named or 'no INS'})"
            )
        format_code = next(
            (
                cl.get("nodeRepresentation", "")
                for cl in eo.iterfind(f"{RIM}Classification[@classificationScheme='{md.DE_FORMAT}']")
            ),
            "",
        )
        path = self.dir / f"cda-{time.time_ns()}.xml"
        path.write_bytes(content)
        command = [sys.executable, str(VALIDATE), "cda", str(path)]
        if format_code != md.REPORT_FORMAT_STRUCTURED.code:
            command += ["--sch", "none"]  # CDA R2 level 1: the volet schematron applies to level 3 only
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=self.validate_timeout, check=False
        )
        received.cda_output[entry_id] = result.stdout + result.stderr
        if result.returncode != 0:
            received.problems.append(f"{entry_id}: validate.py cda failed: {received.cda_output[entry_id]}")

    def _check_signature(
        self,
        received: Received,
        entries: dict[str, etree._Element],
        unique_ids: dict[str, str],
        documents: dict[str, bytes],
        submission_id: str,
    ) -> None:
        problems = received.problems
        signatures = [
            entry_id
            for entry_id, eo in entries.items()
            if any(
                cl.get("classificationScheme") == md.DE_CLASS
                and cl.get("nodeRepresentation") == md.SIGNATURE_CLASS.code
                for cl in eo.iterfind(f"{RIM}Classification")
            )
        ]
        if len(signatures) != 1:
            problems.append(f"expected one signature document, found {len(signatures)}")
            return
        signature_id = signatures[0]
        if (signature_id, submission_id) not in received.associations(md.SIGNS):
            problems.append("no signs association from the signature document to the SubmissionSet")
        try:
            results = XAdESVerifier().verify(documents.get(signature_id, b""), ca_pem_file=str(self.pki.ca))
        except Exception as exc:  # signxml raises several exception types
            problems.append(f"XAdES signature does not verify: {exc}")
            return
        manifest = next(
            (
                r.signed_xml
                for r in results
                if r.signed_xml is not None and r.signed_xml.tag == f"{{{DS}}}Manifest"
            ),
            None,
        )
        if manifest is None:
            problems.append("XAdES: the signed references hold no ds:Manifest")
            return
        digests = {
            ref.get("URI", "").removeprefix("urn:oid:"): ref.findtext(f"{{{DS}}}DigestValue", "")
            for ref in manifest.iterfind(f"{{{DS}}}Reference")
        }
        for entry_id, content in documents.items():
            if entry_id == signature_id:
                continue
            expected = base64.b64encode(hashlib.sha256(content).digest()).decode()
            if digests.get(unique_ids.get(entry_id, "")) != expected:
                problems.append(f"XAdES manifest: no matching SHA-256 digest for {entry_id}")

    # ------------------------------------------------------------------ ITI-57

    def _check_iti57(self, received: Received) -> None:
        if self._lcm_schema is None:
            self._lcm_schema = etree.XMLSchema(etree.parse(str(LCM_XSD)))
        try:
            request = soap.body_of(received.envelope)
        except soap.SoapFormatError as exc:
            received.problems.append(str(exc))
            return
        if not self._lcm_schema.validate(etree.ElementTree(etree.fromstring(etree.tostring(request)))):
            received.problems.extend(
                f"lcm.xsd: line {e.line}: {e.message}" for e in self._lcm_schema.error_log
            )
        packages = received.objects("RegistryPackage")
        ss_patient = _external_id(packages[0], md.SS_PATIENT_ID) if packages else None
        if ss_patient != received.vihf.get(ATTR_RESOURCE_ID, [""])[0]:
            received.problems.append("VIHF resource-id differs from the SubmissionSet patientId")
        previous = {
            a.get("targetObject", ""): _slot_values(a, "PreviousVersion")
            for a in received.objects("Association")
            if a.get("associationType") == md.HAS_MEMBER
        }
        for eo in received.objects("ExtrinsicObject"):
            lid = eo.get("lid", "")
            with self._lock:
                current = self.registry.get(lid)
            if current is None:
                received.problems.append(f"XDSUnknownDocumentEntry: no registered entry {lid!r}")
                continue
            versions = previous.get(eo.get("id", ""), [])
            if versions != [str(current)]:
                received.problems.append(
                    f"XDSMetadataVersionError: PreviousVersion {versions} for {lid}, at version {current}"
                )
                continue
            received.updates[lid] = current + 1

    def _check_td02(self, received: Received) -> None:
        try:
            message = soap.body_of(received.envelope)
        except soap.SoapFormatError as exc:
            received.problems.append(str(exc))
            return
        sender = received.td02_sender()
        message_id = message.find(f"{{{soap.HL7}}}id")
        if not _OID.fullmatch(sender):
            received.problems.append(f"TD0.2: the sender device id {sender!r} is not an OID")
        if message_id is None or message_id.get("root") != sender:
            received.problems.append("TD0.2: the message id's root is not the sender's OID")
