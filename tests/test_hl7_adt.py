"""HL7 v2.5 ADT over MLLP against a real ``simral serve --hl7-port`` (IHE ITI TF-2b 3.30 PAM, IHE PAM
France national extension, HL7 v2 Transport Specification MLLP).

Messages are built with hl7apy, with PID segments shaped like the ANS samples in
``shared/conformance`` (INS + IPP in PID-3, birth name type L and used name type D in PID-5, birth
place INSEE code in PID-11, status in PID-32), ANS test INS only (OID 1.2.250.1.213.1.4.10).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from sqlalchemy import select
from tests.simral_proc import SimralProcess

from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext
from simral.patients import service as patients
from simral.patients.models import CASE_CONFLICTING_TRAITS, Hl7Message, PatientIdentity
from simral.patients.service import AuthorityRef

OID_CHA = "1.2.250.1.999.1.1"
CHA = AuthorityRef(namespace="CHA", oid=OID_CHA)
INS_TEST_OID = "1.2.250.1.213.1.4.10"
NIR = "279035121518989"  # ANS test NIR
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


@dataclass
class Feed:
    simral: SimralProcess
    ctx: AppContext
    tls: ssl.SSLContext | None = None

    def send(self, *messages: bytes, chunk: int = 0) -> list[Message]:
        """Send framed messages over one connection (in ``chunk``-byte pieces if given) and
        return the parsed acknowledgements, one per message."""
        payload = b"".join(VT + m + FS + CR for m in messages)
        acks: list[Message] = []
        with socket.create_connection(("127.0.0.1", self.simral.hl7_port), timeout=30) as plain:
            sock = self.tls.wrap_socket(plain, server_hostname="localhost") if self.tls else plain
            if chunk:
                for start in range(0, len(payload), chunk):
                    sock.sendall(payload[start : start + chunk])
            else:
                sock.sendall(payload)
            buffer = b""
            while len(acks) < len(messages):
                data = sock.recv(65536)
                assert data, "connection closed before every acknowledgement"
                buffer += data
                while FS + CR in buffer:
                    block, buffer = buffer.split(FS + CR, 1)
                    assert block.startswith(VT)
                    text = block[1:].decode("utf-8")
                    acks.append(
                        parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
                    )
        return acks

    def identity(self, local_id: str, authority: AuthorityRef = CHA) -> PatientIdentity:
        with self.ctx.db.reading() as session:
            return patients.get_identity_or_raise(session, local_id=local_id, authority=authority)

    def message_log(self, control_id: str) -> list[Hl7Message]:
        with self.ctx.db.reading() as session:
            return list(session.scalars(select(Hl7Message).where(Hl7Message.control_id == control_id)))


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feed]:
    base = tmp_path_factory.mktemp("hl7")
    simral = SimralProcess(base / "data", hl7=True, extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            yield Feed(simral, ctx)
        finally:
            ctx.db.dispose()


def _msh(message: Message, event: str, structure: str, control_id: str) -> None:
    message.msh.msh_3 = "GAM_CHA"
    message.msh.msh_4 = "CHA"
    message.msh.msh_5 = "SIMRAL"
    message.msh.msh_6 = "GRADES"
    message.msh.msh_7 = "20260106134418"
    message.msh.msh_9 = f"ADT^{event}^{structure}"
    message.msh.msh_10 = control_id
    message.msh.msh_11 = "P"
    message.msh.msh_12 = "2.5"
    message.msh.msh_17 = "FRA"
    message.msh.msh_18 = "UNICODE UTF-8"


def _pid(
    pid: object,
    ipp: str,
    *,
    ins: str | None = NIR,
    birth_name: str = "PAT-TROIS",
    first_names: str = "DOMINIQUE",
    used_name: str = "MARTIN",
    used_first_name: str = "DOMI",
    birth_date: str = "19790328",
    sex: str = "F",
    birth_place: str = "63220",
    status: str | None = "QUAL",
    authority: str = f"CHA&{OID_CHA}&ISO",
) -> None:
    """Fill a PID the PAM France way (repetitions added field by field, as hl7apy builds them)."""
    identifiers = ([f"{ins}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS"] if ins else []) + [
        f"{ipp}^^^{authority}^PI"
    ]
    names = [
        f"{birth_name}^{first_names.split()[0]}^{first_names}^^^^L",
        f"{used_name}^{used_first_name}^^^^^D",
    ]
    addresses = [f"^^^^^^BDL^^{birth_place}", "28 Av de Breteuil^^PARIS^^75007^FRA^H"]
    for name, values in (("PID_3", identifiers), ("PID_5", names), ("PID_11", addresses)):
        for value in values:
            pid.add_field(name).value = value  # type: ignore[attr-defined]
    pid.pid_7 = birth_date  # type: ignore[attr-defined]
    pid.pid_8 = sex  # type: ignore[attr-defined]
    if status:
        pid.pid_32 = status  # type: ignore[attr-defined]


def adt_upsert(event: str, control_id: str, ipp: str, **traits: object) -> bytes:
    structure = "ADT_A01" if event in ("A01", "A04", "A08") else "ADT_A05"
    message = Message(structure, version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, event, structure, control_id)
    message.evn.evn_2 = "20260106134418"
    _pid(message.pid, ipp, **traits)  # type: ignore[arg-type]
    message.pv1.pv1_2 = "N"
    return message.to_er7().encode("utf-8")


def adt_merge(control_id: str, survivor: str, prior: str, event: str = "A40", **traits: object) -> bytes:
    """A40 (ADT_A39: PID + MRG in a patient group) or A47 (ADT_A30: PID + MRG)."""
    structure = "ADT_A39" if event == "A40" else "ADT_A30"
    message = Message(structure, version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, event, structure, control_id)
    message.evn.evn_2 = "20260106134418"
    parent = message.add_group("ADT_A39_PATIENT") if event == "A40" else message
    _pid(parent.pid, survivor, **traits)  # type: ignore[arg-type]
    parent.mrg.mrg_1 = f"{prior}^^^CHA&{OID_CHA}&ISO^PI"
    return message.to_er7().encode("utf-8")


def adt_link(event: str, control_id: str, first: str, second: str, second_authority: str) -> bytes:
    """A24 / A37 (ADT_A24, ADT_A37): two PID segments."""
    structure = f"ADT_{event}"
    message = Message(structure, version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, event, structure, control_id)
    message.evn.evn_2 = "20260106134418"
    _pid(message.add_segment("PID"), first, ins=None, status=None)
    _pid(message.add_segment("PID"), second, ins=None, status=None, authority=second_authority)
    return message.to_er7().encode("utf-8")


def _ack(ack: Message) -> tuple[str, str]:
    return ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()


def _err(ack: Message) -> tuple[str, str, str]:
    err = ack.err
    return err.err_2.to_er7(), err.err_3.to_er7().split("^")[0], err.err_8.to_er7()


def test_a28_creates_an_identity_from_a_french_pid(feed: Feed) -> None:
    (ack,) = feed.send(adt_upsert("A28", "C-A28-1", "IPP101"))
    assert _ack(ack) == ("AA", "C-A28-1")
    assert ack.msh.msh_9.to_er7() == "ACK^A28^ACK"
    found = feed.identity("IPP101")
    assert (found.birth_name, found.first_birth_given_name, found.birth_given_names) == (
        "PAT-TROIS",
        "DOMINIQUE",
        "DOMINIQUE",
    )
    assert (found.used_name, found.used_given_name) == ("MARTIN", "DOMI")
    assert (found.birth_date, found.sex, found.birth_place_code) == ("19790328", "F", "63220")
    assert (found.ins_matricule, found.ins_oid, found.status) == (NIR, INS_TEST_OID, "QUAL")
    assert found.status_source == "hl7:GAM_CHA^CHA:C-A28-1"
    (kept,) = feed.message_log("C-A28-1")
    assert (kept.outcome, kept.message_type, kept.sending_application) == ("AA", "ADT^A28", "GAM_CHA")
    assert kept.raw.startswith("MSH|") and "IPP101" in kept.raw and kept.ack.startswith("MSH|")


def test_a31_updates_and_a_conflict_goes_to_vigilance(feed: Feed) -> None:
    who = {"ins": None, "birth_name": "PAT-DEUX", "first_names": "CAMILLE"}
    feed.send(adt_upsert("A28", "C-A31-0", "IPP201", status="PROV", **who))
    (ack,) = feed.send(adt_upsert("A31", "C-A31-1", "IPP201", used_name="DURAND", status="VALI", **who))
    assert _ack(ack) == ("AA", "C-A31-1")
    updated = feed.identity("IPP201")
    assert (updated.used_name, updated.status) == ("DURAND", "VALI")
    # A different birth date for the same IPP: accepted message, nothing changed, a case opened.
    (ack,) = feed.send(adt_upsert("A08", "C-A31-2", "IPP201", birth_date="19790329", status="VALI", **who))
    assert _ack(ack) == ("AA", "C-A31-2")
    assert feed.identity("IPP201").birth_date == "19790328"
    with feed.ctx.db.reading() as session:
        cases = [c for c in patients.list_cases(session) if c.identity_id == updated.id]
    assert [(c.kind, c.detail["conflicts"]) for c in cases] == [
        (CASE_CONFLICTING_TRAITS, {"birth_date": ["19790328", "19790329"]})
    ]


def test_a40_merges_and_an_unknown_prior_is_an_application_error(feed: Feed) -> None:
    feed.send(
        adt_upsert("A28", "C-A40-0", "IPP-OLD", ins=None, status=None),
        adt_upsert("A28", "C-A40-1", "IPP-NEW", ins=None, status=None),
    )
    old, new = feed.identity("IPP-OLD"), feed.identity("IPP-NEW")
    assert old.person_id != new.person_id
    (ack,) = feed.send(adt_merge("C-A40-2", "IPP-NEW", "IPP-OLD", ins=None, status=None))
    assert _ack(ack) == ("AA", "C-A40-2")
    merged = feed.identity("IPP-OLD")
    assert (merged.merged_into_id, merged.active, merged.person_id) == (new.id, False, new.person_id)
    with feed.ctx.db.reading() as session:
        change = patients.last_merge(session, survivor=new, merged=merged)
    assert change is not None and change.source == "hl7:GAM_CHA^CHA:C-A40-2"
    (ack,) = feed.send(adt_merge("C-A40-3", "IPP-NEW", "IPP-NOBODY", ins=None, status=None))
    assert _ack(ack) == ("AE", "C-A40-3")
    assert _err(ack)[1] == "204"
    (kept,) = feed.message_log("C-A40-3")
    assert kept.outcome == "AE" and kept.error.startswith("204")


def test_a47_changes_the_identifier_and_a24_a37_link_and_unlink(feed: Feed) -> None:
    feed.send(adt_upsert("A28", "C-A47-0", "IPP-TYPO", ins=None, status=None))
    before = feed.identity("IPP-TYPO")
    (ack,) = feed.send(adt_merge("C-A47-1", "IPP-RIGHT", "IPP-TYPO", event="A47", ins=None, status=None))
    assert _ack(ack) == ("AA", "C-A47-1")
    assert feed.identity("IPP-RIGHT").id == before.id
    clinic = AuthorityRef(namespace="CLINB", oid="1.2.250.1.999.2.1")
    (ack,) = feed.send(adt_link("A24", "C-A24-1", "IPP-RIGHT", "B-77", "CLINB&1.2.250.1.999.2.1&ISO"))
    assert _ack(ack) == ("AA", "C-A24-1")
    assert feed.identity("B-77", clinic).person_id == feed.identity("IPP-RIGHT").person_id
    (ack,) = feed.send(adt_link("A37", "C-A37-1", "IPP-RIGHT", "B-77", "CLINB&1.2.250.1.999.2.1&ISO"))
    assert _ack(ack) == ("AA", "C-A37-1")
    assert feed.identity("B-77", clinic).person_id != feed.identity("IPP-RIGHT").person_id


def test_a_duplicate_control_id_is_answered_once_and_not_applied_again(feed: Feed) -> None:
    first = adt_upsert("A28", "C-DUP-1", "IPP301", ins=None, used_name="UN", status=None)
    (ack1,) = feed.send(first)
    feed.send(adt_upsert("A31", "C-DUP-2", "IPP301", ins=None, used_name="DEUX", status=None))
    # The first message again, split in small TCP pieces: the same acknowledgement, nothing re-applied.
    (ack2,) = feed.send(first, chunk=7)
    assert ack2.to_er7() == ack1.to_er7()
    assert feed.identity("IPP301").used_name == "DEUX"
    assert len(feed.message_log("C-DUP-1")) == 1


def test_bad_messages_are_answered_with_a_clear_error_and_kept(feed: Feed) -> None:
    no_msh = b"PID|||123^^^CHA&1.2.250.1.999.1.1&ISO^PI"
    no_authority = adt_upsert("A28", "C-BAD-2", "IPP401", ins=None, authority="")
    oru = adt_upsert("A28", "C-BAD-3", "IPP402").replace(b"ADT^A28^ADT_A05", b"ORU^R01^ORU_R01")
    a99 = adt_upsert("A28", "C-BAD-4", "IPP403").replace(b"ADT^A28^ADT_A05", b"ADT^A99^ADT_A05")
    v29 = adt_upsert("A28", "C-BAD-5", "IPP404").replace(b"|2.5|", b"|2.9|")
    bad_status = adt_upsert("A28", "C-BAD-6", "IPP405", status="XYZ")
    acks = feed.send(no_msh, no_authority, oru, a99, v29, bad_status)
    got = [(_ack(a)[0], _err(a)[1]) for a in acks]
    assert got == [("AR", "100"), ("AE", "101"), ("AR", "200"), ("AR", "201"), ("AR", "203"), ("AE", "103")]
    assert _err(acks[1])[0] == "PID^1^3" and "assigning authority" in _err(acks[1])[2]
    assert _err(acks[5])[0] == "PID^1^32"
    for control_id, outcome in (("C-BAD-2", "AE"), ("C-BAD-3", "AR"), ("C-BAD-5", "AR"), ("C-BAD-6", "AE")):
        (kept,) = feed.message_log(control_id)
        assert kept.outcome == outcome and kept.raw and kept.ack
    with feed.ctx.db.reading() as session:
        rejected = patients.list_messages(session, outcome="AR")
        assert any(m.raw.startswith("PID|") and m.dedup_key is None for m in rejected)
        assert patients.get_identity(session, local_id="IPP405", authority=CHA) is None  # nothing applied


def test_the_listener_is_only_in_the_first_worker(tmp_path: Path) -> None:
    """With two workers, the MLLP port is bound once (no SO_REUSEPORT) and still answers."""
    simral = SimralProcess(tmp_path / "data", hl7=True, extra_env={"SIMRAL_WORKERS": "2"})
    with simral:
        probe = socket.socket()
        try:
            with pytest.raises(OSError):
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(("127.0.0.1", simral.hl7_port))
        finally:
            probe.close()
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            (ack,) = Feed(simral, ctx).send(adt_upsert("A28", "C-W-1", "IPP501", ins=None, status=None))
            assert _ack(ack) == ("AA", "C-W-1")
        finally:
            ctx.db.dispose()


def test_mllp_over_tls(tmp_path: Path) -> None:
    """``hl7_tls``: the listener speaks TLS with the platform's certificate (and nothing else)."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    made = subprocess.run(
        ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    env = {"SIMRAL_HL7_TLS": "true", "SIMRAL_TLS_CERT_FILE": str(cert), "SIMRAL_TLS_KEY_FILE": str(key)}
    simral = SimralProcess(tmp_path / "data", hl7=True, extra_env=env)
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            client = ssl.create_default_context(cafile=str(cert))
            (ack,) = Feed(simral, ctx, client).send(
                adt_upsert("A28", "C-TLS-1", "IPP601", ins=None, status=None)
            )
            assert _ack(ack) == ("AA", "C-TLS-1")
            with pytest.raises(AssertionError, match="closed before"):
                Feed(simral, ctx).send(adt_upsert("A28", "C-TLS-2", "IPP602", ins=None, status=None))
            assert Feed(simral, ctx).message_log("C-TLS-2") == []
        finally:
            ctx.db.dispose()


# ------------------------------------------------------------------ who may send (issue 10)


def _from(message: bytes, application: str, facility: str) -> bytes:
    """``message`` with MSH-3/MSH-4 naming another sender."""
    return message.replace(b"|GAM_CHA|CHA|", f"|{application}|{facility}|".encode(), 1)


def _refused_trail(feed: Feed) -> str:
    return feed.simral.cli("audit", "search", "--action", "hl7.refused", "--limit", "50").stdout


def test_an_unregistered_sender_is_refused_until_it_is_registered(feed: Feed) -> None:
    """``allow_unknown_hl7_senders`` is false by default: an ADT message (or a PDQ query) whose
    MSH-3/MSH-4 is neither a registered HL7 source nor a registered RIS is answered AR, ERR 204 on
    MSH-3, changes nothing, is kept without its duplicate key and audited as ``hl7.refused``; the
    same message is applied once ``simral hl7-sources add`` has registered the sender."""
    message = _from(adt_upsert("A28", "C-SRC-1", "IPP701", ins=None, status=None), "GAM_CHB", "CHB")
    query = (
        b"MSH|^~\\&|GAM_CHB|CHB|SIMRAL_PDS|GRADES|20260106134418||QBP^Q22^QBP_Q21|Q-SRC-1|P|2.5\r"
        b"QPD|IHE PDQ Query|Q-SRC-1|@PID.5.1.1^PAT*\rRCP|I||R\r"
    )
    ack, response = feed.send(message, query)
    assert _ack(ack) == ("AR", "C-SRC-1")
    assert _err(ack) == ("MSH^1^3", "204", "sender not accepted from this connection")
    assert ack.err.err_3.to_er7() == "204^Unknown key identifier^HL70357"
    assert response.msh.msh_9.to_er7() == "RSP^K22^RSP_K21"
    assert _ack(response) == ("AR", "Q-SRC-1") and _err(response)[:2] == ("MSH^1^3", "204")
    assert not response.to_er7().count("\rPID|")  # no record answered
    with feed.ctx.db.reading() as session:
        assert patients.get_identity(session, local_id="IPP701", authority=CHA) is None
    (kept,) = feed.message_log("C-SRC-1")
    assert (kept.outcome, kept.dedup_key) == ("AR", None)
    trail = _refused_trail(feed)
    assert trail.count("not a registered HL7 source") >= 2 and "GAM_CHB^CHB" in trail, trail

    feed.simral.cli("hl7-sources", "add", "gam-chb", "--application", "GAM_CHB", "--facility", "CHB")
    (ack,) = feed.send(message)
    assert _ack(ack) == ("AA", "C-SRC-1")
    assert feed.identity("IPP701").birth_name == "PAT-TROIS"
    # Registered for facility CHB only: the same application from another facility is still refused.
    (ack,) = feed.send(_from(adt_upsert("A28", "C-SRC-2", "IPP702", ins=None, status=None), "GAM_CHB", "CHZ"))
    assert _ack(ack) == ("AR", "C-SRC-2")


def test_a_source_bound_to_its_host_or_certificate_is_not_believed_from_elsewhere(feed: Feed) -> None:
    """A source registered with --check-host (or --tls-subject) is believed only from its host (or
    over MLLP TLS with its client certificate), as a RIS is: from another connection its ADT
    messages are refused (AR, ERR 204), apply nothing, and are security events."""
    feed.simral.cli(
        "hl7-sources",
        "add",
        "gam-bound",
        "--application",
        "GAM_BOUND",
        "--host",
        "192.0.2.10",
        "--check-host",
    )
    feed.simral.cli(
        "hl7-sources", "add", "gam-cert", "--application", "GAM_CERT", "--tls-subject", "gam.example"
    )
    for n, application in enumerate(("GAM_BOUND", "GAM_CERT"), start=1):
        forged = _from(
            adt_upsert("A40", f"C-FORGED-{n}", f"IPP71{n}", ins=None, status=None), application, "CHA"
        )
        (ack,) = feed.send(forged)
        assert _ack(ack) == ("AR", f"C-FORGED-{n}")
        assert _err(ack)[:2] == ("MSH^1^3", "204")
        with feed.ctx.db.reading() as session:
            assert patients.get_identity(session, local_id=f"IPP71{n}", authority=CHA) is None
    trail = _refused_trail(feed)
    assert "gam-bound sends from its registered host only" in trail, trail
    assert "gam-cert sends over TLS with its client certificate only" in trail, trail
    # The rule itself: the host, and the certificate's three cases (any facility matches).
    with feed.ctx.db.reading() as session:

        def refusal(application: str, address: str, subject: str | None) -> str:
            return patients.hl7_sender_refusal(
                session,
                application=application,
                facility="ANY",
                address=address,
                tls_subject=subject,
                admit_unregistered=False,
            )

        assert refusal("GAM_BOUND", "192.0.2.10", None) == ""
        assert "registered host only" in refusal("GAM_BOUND", "127.0.0.1", None)
        assert "client certificate only" in refusal("GAM_CERT", "127.0.0.1", None)
        assert "another subject" in refusal("GAM_CERT", "127.0.0.1", "intruder.example")
        assert refusal("GAM_CERT", "127.0.0.1", "gam.example") == ""


def test_allow_unknown_hl7_senders_admits_any_sender(tmp_path: Path) -> None:
    """The lab setting ``allow_unknown_hl7_senders`` (SIMRAL_ALLOW_UNKNOWN_HL7_SENDERS) admits a
    sender nobody registered, as ``allow_unknown_ae`` admits unknown calling AE titles."""
    env = {"SIMRAL_ALLOW_UNKNOWN_HL7_SENDERS": "true"}
    simral = SimralProcess(tmp_path / "data", hl7=True, hl7_sources={}, extra_env=env)
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            assert "GAM_CHA" not in simral.cli("hl7-sources", "list").stdout
            message = _from(adt_upsert("A28", "C-LAB-1", "IPP801", ins=None, status=None), "LAB_GAM", "LAB")
            (ack,) = Feed(simral, ctx).send(message)
            assert _ack(ack) == ("AA", "C-LAB-1")
            assert Feed(simral, ctx).identity("IPP801").birth_name == "PAT-TROIS"
        finally:
            ctx.db.dispose()


def test_hl7_sources_add_list_remove(feed: Feed) -> None:
    """``simral hl7-sources add|list|remove``: registered, shown, audited, then forgotten (and its
    messages refused again)."""
    cli = feed.simral.cli
    added = cli(
        "hl7-sources", "add", "gam-chc", "--application", "GAM_CHC", "--facility", "CHC",
        "--host", "127.0.0.1", "--check-host", "--tls-subject", "gam-chc.example",
    )  # fmt: skip
    assert "HL7 source gam-chc added (GAM_CHC^CHC)" in added.stdout
    row = next(line for line in cli("hl7-sources", "list").stdout.splitlines() if "gam-chc" in line)
    cells = [cell.strip() for cell in row.strip().strip("│").split("│")]
    assert cells == ["gam-chc", "GAM_CHC", "CHC", "127.0.0.1", "yes", "gam-chc.example"]
    # A second source for the same sender, a bad name, --check-host without a host: refused.
    for args, error in (
        (("gam-chc2", "--application", "GAM_CHC", "--facility", "CHC"), "already sends as GAM_CHC^CHC"),
        (("gam chc", "--application", "GAM_CHX"), "invalid HL7 source name"),
        (("gam-chd", "--application", "GAM_CHD", "--check-host"), "--check-host needs"),
        (("gam-chc", "--application", "GAM_CHE"), "already exists"),
    ):
        failed = cli("hl7-sources", "add", *args, check=False)
        assert failed.returncode == 1 and error in failed.stderr, failed.stderr
    assert "gam-chc2" not in cli("hl7-sources", "list").stdout
    # Registered with its host (loopback here) and no certificate over plain MLLP: refused for now.
    (ack,) = feed.send(_from(adt_upsert("A28", "C-CLI-1", "IPP901", ins=None, status=None), "GAM_CHC", "CHC"))
    assert _ack(ack) == ("AR", "C-CLI-1")
    assert cli("hl7-sources", "remove", "gam-chc").stdout.strip() == "HL7 source gam-chc removed"
    assert "gam-chc" not in cli("hl7-sources", "list").stdout
    failed = cli("hl7-sources", "remove", "gam-chc", check=False)
    assert failed.returncode == 1 and "no HL7 source named 'gam-chc'" in failed.stderr
    created = cli("audit", "search", "--action", "hl7-source.create", "--limit", "50").stdout
    deleted = cli("audit", "search", "--action", "hl7-source.delete", "--limit", "50").stdout
    assert "gam-chc" in created and "gam-chc" in deleted, (created, deleted)
    # Forgotten: its messages are refused as any unknown sender's.
    (ack,) = feed.send(_from(adt_upsert("A28", "C-CLI-2", "IPP902", ins=None, status=None), "GAM_CHC", "CHC"))
    assert _ack(ack) == ("AR", "C-CLI-2")
    assert "not a registered HL7 source" in _refused_trail(feed)


def test_segments_are_read_from_their_er7_text_and_refused_as_hl7apy_refuses_them() -> None:
    """``adt.segments`` splits the message itself (no hl7apy object tree: a large message costs
    one split per segment); a formatted-text line break stays one (hl7apy's round trip escaped
    it), and the refusals are those of hl7apy's tolerant parse."""
    from simral.hl7 import adt

    text = adt.decode(
        b"MSH|^~\\&|RIS|CHX|SIMRAL|GRADES|20260106134418||ORM^O01^ORM_O01|C-1|P|2.5.1\r"
        b"PID|||IPP-1^^^CHX&1.2.250.1.999.21.1&ISO^PI||NOM^PRENOM^^^^^L\r"
        b"OBX|3|FT|11322-5^History^LN||HTA\\.br\\diabete|\r"
        b"ZDS|1.2.3^^Application^DICOM\r"
    )
    found = adt.segments(text, adt.read_header(text))
    assert [(s.name, s.index) for s in found] == [("MSH", 1), ("PID", 1), ("OBX", 1), ("ZDS", 1)]
    assert found[0].field(11) == "2.5.1"  # MSH-12 (fields[1] is MSH-2)
    assert found[1].repetitions(3) == ["IPP-1^^^CHX&1.2.250.1.999.21.1&ISO^PI"]
    assert found[2].text(found[2].field(5)) == "HTA\ndiabete"
    refused = {
        "unknown segment": text.replace("ZDS|", "AOR|"),
        "segment ID of four characters": text.replace("ZDS|", "ZDSX|"),
        "five delimiters before v2.7": text.replace("^~\\&", "^~\\&#", 1),
        "version 2.9": text.replace("|2.5.1\r", "|2.9\r"),
    }
    for case, bad in refused.items():
        with pytest.raises(adt.Rejected) as caught:
            adt.segments(bad, adt.read_header(bad))
        assert caught.value.ack == "AR", case
        assert caught.value.code == ("203" if "version" in case else "102"), case


def test_an_acknowledgement_quotes_msh_in_its_own_delimiters() -> None:
    """The ACK uses ``|^~\\&``; MSH-3/4 and MSH-10 of a message with other delimiters are carried
    over to them (HL7 v2.5 §2.7), so the ACK parses with the sender's values in their fields."""
    from simral.hl7 import adt

    text = adt.decode(
        b"MSH#$%*!#APP$1.2.3$ISO#FAC|X#SIMRAL#GRADES#20260106134418##ADT$A28$ADT_A05#ID^7#P#2.5\r"
    )
    header = adt.read_header(text)
    rejected = adt.Rejected("AE", "101", "missing | field", "PID^1^3")
    ack = adt.build_ack(header, "AE", application="SIMRAL", facility="GRADES", error=rejected)
    parsed = parse_message(ack, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    assert parsed.msh.msh_5.to_er7() == "APP^1.2.3^ISO"
    assert parsed.msh.msh_6.to_er7() == "FAC\\F\\X"
    assert parsed.msh.msh_9.to_er7() == "ACK^A28^ACK"
    assert parsed.msa.msa_1.to_er7() == "AE" and parsed.msa.msa_2.to_er7() == "ID\\S\\7"
    assert parsed.err.err_2.to_er7() == "PID^1^3"
    assert parsed.err.err_8.to_er7() == "missing \\F\\ field"
