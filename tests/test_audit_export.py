"""The audit trail reaches a real syslog collector (rsyslog, TLS): IHE ATNA, PS3.15 A.5, RFC 5425.

Every message rsyslog receives is an RFC 5424 message (facility authpriv, MSGID IHE+RFC-3881)
whose body is a DICOM audit message valid against the PS3.15 A.5.1 schema, one per audit record,
in the trail's order. With the collector stopped, records are kept (the trail is the buffer) and
the backlog goes out, in order and once, when it returns; a collector whose certificate simral
does not trust receives nothing and the cursor stays. Runs ``simral serve`` with the exporter
thread and the ``simral audit export`` command.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
from lxml import etree
from tests.corpus import ct_series
from tests.simral_proc import SimralProcess
from tests.syslog_collector import Pki, RsyslogCollector, make_pki

from simral.access.policy import Principal
from simral.app import open_app
from simral.audit import atna
from simral.audit import service as audit
from simral.audit.models import AuditEvent
from simral.config import load_settings

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parent / "schemas" / "audit-message.rng")))
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("audit-pki"))


def _env(pki: Pki, port: int) -> dict[str, str]:
    return {
        "SIMRAL_AUDIT_SYSLOG_HOST": "localhost",
        "SIMRAL_AUDIT_SYSLOG_PORT": str(port),
        "SIMRAL_AUDIT_SYSLOG_CA_FILE": str(pki.ca),
        "SIMRAL_AUDIT_SYSLOG_CERT_FILE": str(pki.client_cert),
        "SIMRAL_AUDIT_SYSLOG_KEY_FILE": str(pki.client_key),
        "SIMRAL_AUDIT_SYSLOG_INTERVAL": "0.3",
    }


def _xml(line: bytes) -> etree._Element:
    """The audit message of one received syslog line (rsyslog keeps the BOM, escapes nothing here)."""
    header = re.match(rb"<(\d+)>1 \S+ \S+ simral \d+ IHE\+RFC-3881 - ", line)
    assert header is not None, line[:120]
    assert int(header.group(1)) in (85, 84)  # authpriv (10) * 8 + notice (5) or warning (4)
    body = line[header.end() :]
    assert body.startswith(BOM)
    return etree.fromstring(body[len(BOM) :])


def _record_ids(lines: list[bytes]) -> list[int]:
    ids = []
    for line in lines:
        detail = _xml(line).xpath("//ParticipantObjectDetail[@type='simral-record']/@value")
        ids.append(int(base64.b64decode(detail[0])) if detail else -1)
    return ids


def test_every_action_gives_a_valid_message(tmp_path: Path) -> None:
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(tmp_path / "data")}))
    alice = Principal(
        kind="user", name="alice", organisation="CHA", national_id="810001234567", address="10.0.0.7"
    )
    node = Principal(kind="dicom-node", name="CT1", organisation="CHA", address="10.0.0.9")
    actions = [
        "login",
        "logout",
        "study.read",
        "study.retrieve",
        "instance.store",
        "break-glass.open",
        "audit.search",
        "node.create",
        "token.create",
        "user.create",
        "study.export",
        "share.create",
        "association.refused",
        "something.new",
    ]
    try:
        with ctx.db.unit_of_work() as session:
            for n, action in enumerate(actions):
                audit.record(
                    session,
                    action=action,
                    principal=node if action == "instance.store" else alice,
                    outcome="failure" if n % 5 == 4 else "success",
                    study_uid=f"1.2.3.{n}" if n % 2 else "",
                    patient_id="PAT1" if n % 3 else "",
                    patient_issuer="1.2.250.1.999" if n % 3 else "",
                    detail={"n": n, "reason": "refused"},
                )
            audit.record(
                session, action="query", principal=alice, detail={"keys": {"PatientID": "PAT*"}, "matches": 2}
            )
        with ctx.db.reading() as session:
            records = list(session.query(AuditEvent).order_by(AuditEvent.id))
            for record in records:
                message = etree.fromstring(atna.audit_message(record, source_id="SIMRAL"))
                assert SCHEMA.validate(message), (record.action, SCHEMA.error_log)
                event = message.find("EventIdentification")
                assert event is not None
                assert event.get("EventOutcomeIndicator") == ("0" if record.outcome == "success" else "4")
                assert message.find("ActiveParticipant").get("UserID") == record.actor.split(":", 1)[1]
        login = etree.fromstring(atna.audit_message(records[0], source_id="SIMRAL"))
        assert login.find("EventIdentification/EventID").get("csd-code") == "110114"
        query = etree.fromstring(atna.audit_message(records[-1], source_id="SIMRAL"))
        encoded = query.findtext("ParticipantObjectIdentification/ParticipantObjectQuery")
        assert encoded is not None and b"PAT*" in base64.b64decode(encoded)
    finally:
        ctx.db.dispose()


def test_collector_receives_the_trail_and_the_backlog(pki: Pki, tmp_path: Path) -> None:
    collector = RsyslogCollector(pki)
    collector.start()
    simral = SimralProcess(tmp_path / "data", env=_env(pki, collector.port))
    files = ct_series(tmp_path / "ct", slices=2, rows=32, cols=32, patient_id="AUDIT01", seed=71)
    simral.cli("import", str(tmp_path / "ct"))
    study = simral.cli("audit", "search", "--action", "instance.store", "--limit", "1").stdout
    assert "instance.store" in study
    try:
        with simral:
            token = simral.token
            received = collector.wait_for(5, timeout=30)
            ids = _record_ids(received)
            assert ids == sorted(ids) and ids[0] == 1, ids
            for line in received:
                assert SCHEMA.validate(_xml(line)), SCHEMA.error_log

            # The collector goes down: reads and queries keep being recorded, nothing is lost.
            collector.stop()
            before = len(received)
            for _ in range(3):
                response = httpx.get(
                    f"{simral.http_url}/dicom-web/studies",
                    params={"PatientID": "AUDIT01"},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                )
                assert response.status_code == 200
            collector.start()  # same port, same output file
            after = collector.wait_for(before + 3, timeout=60)
            ids = _record_ids(after)
            assert ids == list(range(1, len(ids) + 1)), ids  # every record, in order, once
            queries = [etree.tostring(_xml(line)) for line in after[before:]]
            assert sum(b'csd-code="110112"' in q for q in queries) >= 3
    finally:
        collector.close()
    assert files


def test_untrusted_collector_gets_nothing(pki: Pki, tmp_path: Path) -> None:
    rogue = RsyslogCollector(pki, rogue=True)
    rogue.start()
    try:
        simral = SimralProcess(tmp_path / "data", env=_env(pki, rogue.port))
        simral.cli("organisations", "add", "CHX", "--name", "CH X")
        refused = simral.cli("audit", "export", check=False)
        assert refused.returncode != 0 and "certificate" in (refused.stdout + refused.stderr).lower()
        assert rogue.messages() == []
        verify = simral.cli("audit", "verify").stdout
        assert "intact" in verify.lower() or "ok" in verify.lower()
    finally:
        rogue.close()
    trusted = RsyslogCollector(pki)
    trusted.start()
    try:
        simral = SimralProcess(tmp_path / "data", env=_env(pki, trusted.port))
        sent = simral.cli("audit", "export").stdout
        assert re.search(r"^(\d+) audit records sent", sent)
        count = int(re.search(r"^(\d+)", sent).group(1))  # type: ignore[union-attr]
        assert len(trusted.wait_for(count)) == count
        assert simral.cli("audit", "export").stdout.startswith("0 audit records sent")
    finally:
        trusted.close()
