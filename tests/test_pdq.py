"""IHE PDQ Patient Demographics Query over HL7 v2.5 MLLP (IHE ITI TF-2a 3.21, ITI-21; HL7 v2.5
chapter 5 QBP^Q22 / RSP^K22) against a real ``simral serve --hl7-port``.

Identities are fed with ADT A28/A31 built with hl7apy, PID shaped like the ANS samples (ANS test INS
only, OID 1.2.250.1.213.1.4.10); queries are built with hl7apy and the responses parsed with it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import orjson
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from lxml import etree
from sqlalchemy import select
from tests.simral_proc import SimralProcess
from tests.test_hl7_adt import INS_TEST_OID, NIR, OID_CHA, Feed, adt_merge, adt_upsert

from simral.app import open_app
from simral.audit import atna
from simral.audit.models import AuditEvent
from simral.config import load_settings

OID_CLINB = "1.2.250.1.999.2.1"
CLINB = f"CLINB&{OID_CLINB}&ISO"
NIR_DUPONT = "179037512345644"  # valid test NIR (key 97 − n mod 97): man born 1979-03
NIR_DUPONTEL = "285016912312366"  # woman born 1985-01


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feed]:
    base = tmp_path_factory.mktemp("pdq")
    simral = SimralProcess(base / "data", hl7=True, extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    with simral:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
        try:
            feed = Feed(simral, ctx)
            acks = feed.send(
                # One person known by two organisations (same INS and traits: linked by INS).
                adt_upsert("A28", "P-1", "PDQ-1"),
                adt_upsert("A28", "P-2", "B-1", authority=CLINB),
                adt_upsert(
                    "A28", "P-3", "PDQ-2", ins=NIR_DUPONT, birth_name="DUPONT", first_names="JEAN PIERRE",
                    used_name="DUPONT", used_first_name="JEAN", birth_date="19790315", sex="M",
                    birth_place="75056",
                ),
                adt_upsert(
                    "A28", "P-4", "PDQ-3", ins=NIR_DUPONTEL, birth_name="DUPONTEL", first_names="MARIE",
                    used_name="LEROY", used_first_name="MARIE", birth_date="19850101", sex="F",
                    birth_place="69123", status="PROV",
                ),
                # A31 changes the used name: the query finds the new one.
                adt_upsert(
                    "A31", "P-5", "PDQ-3", ins=NIR_DUPONTEL, birth_name="DUPONTEL", first_names="MARIE",
                    used_name="ROUSSEL", used_first_name="MARIE", birth_date="19850101", sex="F",
                    birth_place="69123", status="PROV",
                ),
                adt_upsert("A28", "P-6", "PDQ-OLD", ins=None, birth_name="ANCIEN", first_names="PAUL",
                           used_name="ANCIEN", used_first_name="PAUL", birth_date="19500101", sex="M",
                           status=None),
                adt_upsert("A28", "P-7", "PDQ-NEW", ins=None, birth_name="ANCIEN", first_names="PAUL",
                           used_name="ANCIEN", used_first_name="PAUL", birth_date="19500101", sex="M",
                           status=None),
                adt_merge("P-8", "PDQ-NEW", "PDQ-OLD", ins=None, birth_name="ANCIEN", first_names="PAUL",
                          used_name="ANCIEN", used_first_name="PAUL", birth_date="19500101", sex="M",
                          status=None),
            )  # fmt: skip
            assert [a.msa.msa_1.to_er7() for a in acks] == ["AA"] * 8
            yield feed
        finally:
            ctx.db.dispose()


def qbp(
    control_id: str,
    parameters: list[str],
    *,
    tag: str | None = None,
    domains: tuple[str, ...] = (),
    event: str = "Q22",
    limit: int | None = None,
) -> bytes:
    """A QBP^Q22^QBP_Q21 (ITI TF-2a 3.21.4.1.2) built with hl7apy."""
    message = Message("QBP_Q21", version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    message.msh.msh_3 = "PDC_RIS"
    message.msh.msh_4 = "CLINB"
    message.msh.msh_5 = "SIMRAL_PDS"
    message.msh.msh_6 = "GRADES"
    message.msh.msh_7 = "20260106134418"
    message.msh.msh_9 = f"QBP^{event}^QBP_Q21"
    message.msh.msh_10 = control_id
    message.msh.msh_11 = "P"
    message.msh.msh_12 = "2.5"
    message.msh.msh_18 = "UNICODE UTF-8"
    message.qpd.qpd_1 = "IHE PDQ Query"
    message.qpd.qpd_2 = tag or f"TAG-{control_id}"
    for parameter in parameters:
        message.qpd.add_field("QPD_3").value = parameter
    for domain in domains:
        message.qpd.add_field("QPD_8").value = f"^^^{domain}"
    message.rcp.rcp_1 = "I"
    if limit is not None:
        message.rcp.rcp_2 = f"{limit}^RD"
    return message.to_er7().encode("utf-8")


def _segments(message: Message, name: str) -> list[Message]:
    return [child for child in message.children if child.name == name]


def _reps(field: object) -> list[str]:
    return [str(rep.to_er7()) for rep in field] if field else []  # type: ignore[attr-defined]


def _ipps(response: Message) -> list[str]:
    """The PI identifiers (CX.1) of each PID, in order."""
    return [
        ",".join(cx.split("^")[0] for cx in _reps(pid.pid_3) if cx.endswith("^PI"))  # type: ignore[attr-defined]
        for pid in _segments(response, "PID")
    ]


def _qak(response: Message) -> tuple[str, str, str, str]:
    qak = response.qak
    return qak.qak_1.to_er7(), qak.qak_2.to_er7(), qak.qak_4.to_er7(), qak.qak_5.to_er7()


def _err(response: Message) -> tuple[str, str]:
    return response.err.err_2.to_er7(), response.err.err_3.to_er7().split("^")[0]


def test_a_query_by_name_and_birth_date_returns_pam_france_pid_segments(feed: Feed) -> None:
    query = qbp("Q-1", ["@PID.5.1.1^PAT-TROIS", "@PID.7.1^19790328"], tag="TAG-ONE")
    (response,) = feed.send(query)
    assert response.msh.msh_9.to_er7() == "RSP^K22^RSP_K21"
    assert response.msh.msh_3.to_er7() == "SIMRAL_PDS"  # ITI TF-2a 3.21.4.2.2: MSH-3 = the query's MSH-5
    assert (response.msh.msh_5.to_er7(), response.msh.msh_6.to_er7()) == ("PDC_RIS", "CLINB")
    assert (response.msa.msa_1.to_er7(), response.msa.msa_2.to_er7()) == ("AA", "Q-1")
    assert _qak(response) == ("TAG-ONE", "OK", "2", "2")
    assert response.qak.qak_3.to_er7() == "IHE PDQ Query"
    sent_qpd = next(s for s in query.decode().split("\r") if s.startswith("QPD|"))
    assert _segments(response, "QPD")[0].to_er7() == sent_qpd
    first, second = _segments(response, "PID")
    assert _reps(first.pid_3) == [
        f"{NIR}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS",
        f"PDQ-1^^^CHA&{OID_CHA}&ISO^PI",
    ]
    assert _reps(second.pid_3) == [
        f"{NIR}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS",
        f"B-1^^^CLINB&{OID_CLINB}&ISO^PI",
    ]
    assert first.pid_1.to_er7() == "1" and second.pid_1.to_er7() == "2"
    assert _reps(first.pid_5) == ["PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L", "MARTIN^DOMI^^^^^D"]
    assert (first.pid_7.to_er7(), first.pid_8.to_er7()) == ("19790328", "F")
    assert _reps(first.pid_11) == ["^^^^^^BDL^^63220"]
    assert _reps(first.pid_32) == ["QUAL"]
    # Queries change nothing: not kept in the ADT message log.
    assert feed.message_log("Q-1") == []


def test_names_match_birth_or_used_name_exactly_or_with_a_trailing_wildcard(feed: Feed) -> None:
    wildcard, exact, used, given, sex = feed.send(
        qbp("Q-2a", ["@PID.5.1.1^DUPONT*"]),
        qbp("Q-2b", ["@PID.5.1.1^DUPONT"]),
        qbp("Q-2c", ["@PID.5.1.1^roussel", "@PID.5.2^Marie"]),  # the A31's used name, any case
        qbp("Q-2d", ["@PID.5.1.1^PAT-TROIS", "@PID.5.2^DOM*"]),
        qbp("Q-2e", ["@PID.5.1.1^DUPONT*", "@PID.8^F"]),
    )
    assert _ipps(wildcard) == ["PDQ-2", "PDQ-3"]
    assert _ipps(exact) == ["PDQ-2"]
    assert _ipps(used) == ["PDQ-3"]
    assert _reps(_segments(used, "PID")[0].pid_5) == ["DUPONTEL^MARIE^MARIE^^^^L", "ROUSSEL^MARIE^^^^^D"]
    assert _reps(_segments(used, "PID")[0].pid_32) == ["PROV"]
    assert _ipps(given) == ["PDQ-1", "B-1"]
    assert _ipps(sex) == ["PDQ-3"]


def test_a_query_by_identifier_with_its_authority_or_by_ins(feed: Feed) -> None:
    by_ipp, by_ins, by_old, other_authority = feed.send(
        qbp("Q-3a", ["@PID.3.1^PDQ-2", f"@PID.3.4.2^{OID_CHA}", "@PID.3.4.3^ISO"]),
        qbp("Q-3b", [f"@PID.3.1^{NIR}", f"@PID.3.4.2^{INS_TEST_OID}", "@PID.3.5^INS"]),
        qbp("Q-3c", ["@PID.3.1^PDQ-OLD", "@PID.3.4.1^CHA"]),  # merged (A40): the surviving identity
        qbp("Q-3d", ["@PID.3.1^PDQ-2", f"@PID.3.4.2^{OID_CLINB}"]),
    )
    assert _ipps(by_ipp) == ["PDQ-2"]
    assert _segments(by_ipp, "PID")[0].pid_7.to_er7() == "19790315"
    assert _ipps(by_ins) == ["PDQ-1", "B-1"]
    assert _ipps(by_old) == ["PDQ-NEW"]
    assert _qak(other_authority)[1:] == ("NF", "0", "0")


def test_what_domains_returned_restricts_pid3_to_those_authorities(feed: Feed) -> None:
    clinb, ins_only, none_there = feed.send(
        qbp("Q-4a", ["@PID.5.1.1^PAT-TROIS"], domains=(CLINB,)),
        qbp("Q-4b", ["@PID.5.1.1^DUP*"], domains=(f"ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO",)),
        qbp("Q-4c", ["@PID.5.1.1^DUPONT"], domains=(CLINB,)),
    )
    # One record per person: its CLINB identity (cross-referenced through the INS link).
    assert [_reps(pid.pid_3) for pid in _segments(clinb, "PID")] == [[f"B-1^^^CLINB&{OID_CLINB}&ISO^PI"]]
    assert _qak(clinb)[1:] == ("OK", "1", "1")
    assert [_reps(pid.pid_3) for pid in _segments(ins_only, "PID")] == [
        [f"{NIR_DUPONT}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS"],
        [f"{NIR_DUPONTEL}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS"],
    ]
    # DUPONT has no CLINB identifier: not returned.
    assert (none_there.msa.msa_1.to_er7(), _qak(none_there)[1]) == ("AA", "NF")
    assert _segments(none_there, "PID") == []


def test_no_match_is_nf_and_rcp_limits_the_records(feed: Feed) -> None:
    nothing, limited = feed.send(
        qbp("Q-5a", ["@PID.5.1.1^PERSONNE", "@PID.7.1^20000101"]),
        qbp("Q-5b", ["@PID.5.1.1^DUP*"], limit=1),
    )
    assert (nothing.msa.msa_1.to_er7(), *_qak(nothing)[1:]) == ("AA", "NF", "0", "0")
    assert _segments(nothing, "PID") == [] and _segments(nothing, "QPD")
    assert _qak(limited)[1:] == ("OK", "2", "1") and limited.qak.qak_6.to_er7() == "1"
    assert _ipps(limited) == ["PDQ-2"]


def test_errors_are_answered_with_err_and_the_query_status(feed: Feed) -> None:
    unknown_domain, bad_date, unsupported, wildcard, no_qpd, pix_query = feed.send(
        qbp("Q-6a", ["@PID.5.1.1^DUPONT"], domains=("NOWHERE&1.2.250.1.999.9.9&ISO",)),
        qbp("Q-6b", ["@PID.5.1.1^DUPONT", "@PID.7.1^1979-3"]),
        qbp("Q-6c", ["@PID.11.3^PARIS"]),
        qbp("Q-6d", ["@PID.5.1.1^D*P"]),
        qbp("Q-6e", ["@PID.5.1.1^DUPONT"]).replace(b"\rQPD|", b"\rZQP|"),
        qbp("Q-6f", ["@PID.3.1^PDQ-2"], event="Q23"),
    )
    # ITI TF-2a 3.21.4.2.2.8 case 3: an unrecognised domain in QPD-8.
    assert (unknown_domain.msa.msa_1.to_er7(), _qak(unknown_domain)[:2]) == ("AE", ("TAG-Q-6a", "AE"))
    assert _err(unknown_domain) == ("QPD^1^8^1^4", "204")
    assert _segments(unknown_domain, "PID") == []
    assert (bad_date.msa.msa_1.to_er7(), _err(bad_date)) == ("AE", ("QPD^1^3^2", "102"))
    assert (unsupported.msa.msa_1.to_er7(), _err(unsupported)) == ("AE", ("QPD^1^3^1^1", "103"))
    assert (wildcard.msa.msa_1.to_er7(), _err(wildcard)[1]) == ("AE", "102")
    assert (no_qpd.msa.msa_1.to_er7(), _err(no_qpd)) == ("AR", ("QPD", "100"))
    assert (pix_query.msa.msa_1.to_er7(), _err(pix_query)[1]) == ("AR", "201")
    assert pix_query.msa.msa_2.to_er7() == "Q-6f"


def test_queries_are_audited_as_atna_queries_and_not_logged_with_patient_data(feed: Feed) -> None:
    feed.send(qbp("Q-7a", ["@PID.5.1.1^DUPONT", "@PID.7.1^19790315"]), qbp("Q-7b", ["@PID.11.3^PARIS"]))
    with feed.ctx.db.reading() as session:
        records = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "patient.query")))
    by_control_id = {r.detail["keys"]["MSH-10"]: r for r in records}
    found, refused = by_control_id["Q-7a"], by_control_id["Q-7b"]
    assert (found.outcome, found.actor, found.patient_id) == ("success", "system:hl7:PDC_RIS^CLINB", "PDQ-2")
    assert found.detail["transaction"] == "ITI-21" and found.detail["matches"] == 1
    assert found.detail["keys"]["QPD-3"] == ["@PID.5.1.1^DUPONT", "@PID.7.1^19790315"]
    assert refused.outcome == "failure" and refused.detail["reason"].startswith("103")
    message = etree.fromstring(atna.audit_message(found, source_id="SIMRAL"))
    assert message.find("EventIdentification/EventID").get("csd-code") == "110112"
    assert "ITI-21" in [c.get("csd-code") for c in message.findall("EventIdentification/EventTypeCode")]
    query_object = next(
        o
        for o in message.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "24"
    )
    assert query_object.find("ParticipantObjectIDTypeCode").get("csd-code") == "ITI-21"
    keys = orjson.loads(base64.b64decode(query_object.findtext("ParticipantObjectQuery")))
    assert keys["QPD-3"] == ["@PID.5.1.1^DUPONT", "@PID.7.1^19790315"]
    log_text = feed.simral.log_path.read_text(errors="replace")
    assert "PDQ query Q-7a answered OK with 1 record(s)" in log_text
    assert "DUPONT" not in log_text and "PARIS" not in log_text and "19790315" not in log_text
