"""IHE PDQ Patient Demographics Query over HL7 v2.5 (IHE ITI TF-2a 3.21, ITI-21; HL7 v2.5 chapter 5
query by parameter, chapter 3 §3.3.56 QBP^Q22 Find Candidates) translated into
:func:`simral.patients.search.search_identities`.

Query ``QBP^Q22^QBP_Q21`` (MSH, QPD, RCP):

- QPD-1 message query name ``IHE PDQ Query``; QPD-2 the query tag, echoed in QAK-1;
- QPD-3 query parameters as QIP ``@<field>^<value>`` repetitions (ITI TF-2a 3.21.4.1.2.2):
  ``@PID.5.1.1`` family name (birth or used name, a trailing ``*`` asks for a prefix), ``@PID.5.2``
  given name, ``@PID.7.1`` birth date (YYYY[MM[DD]]), ``@PID.8`` sex, ``@PID.3.1`` an identifier
  with ``@PID.3.4.1`` / ``@PID.3.4.2`` / ``@PID.3.4`` its authority and ``@PID.3.5`` its type
  (``INS`` for the INS);
- QPD-8 What Domains Returned (ITI TF-2a 3.21.4.1.2.2.2): PID-3 then lists the identifiers the
  patient has in those domains only, patients with none are left out; an unknown domain is an
  error;
- RCP-2 quantity limited request (``n^RD``) caps the records returned (no continuation).

Response ``RSP^K22^RSP_K21`` (ITI TF-2a 3.21.4.2): MSH (MSH-3 the query's MSH-5), MSA, ERR on
error, QAK (query tag, status OK / NF / AE / AR, query name, hit counts), QPD echoed, one PID per
matching identity shaped as PAM France shapes it (PID-3 INS then IPP, PID-5 birth name type L and
used name type D, PID-7, PID-8, PID-11 birth place BDL, PID-32 identity status).

Queries change nothing, so they are not kept in the ADT message log (whose duplicate key would
answer a repeated query with a stale result): each is audited (``patient.query``, ITI-21, with the
QPD) and logged without patient data.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simral.access.policy import AccessDenied, Principal
from simral.context import AppContext
from simral.hl7.adt import (
    ERROR_TEXT,
    Encoding,
    Handled,
    Header,
    Rejected,
    Segment,
    cut_escaped,
    decode,
    first_segment,
    joined_fields,
    read_header,
    refuse_sender,
    requoting,
    segments,
)
from simral.patients import search
from simral.patients.search import Criteria, Domain, Found, IdentifierKey, PatientIdentifier, TextMatch
from simral.patients.service import AuthorityRef

log = logging.getLogger(__name__)

QUERY_MESSAGE_TYPE = "QBP"
FIND_CANDIDATES_EVENT = "Q22"
QUERY_NAMES = frozenset({"IHE PDQ QUERY", "Q22"})
SUPPORTED_VERSIONS = ("2.5", "2.5.1")
TRANSACTION = "ITI-21"
#: HL7 table 0001 administrative sex → the index's sex ("" unknown).
SEX_CODES = {"M": "M", "F": "F", "O": "O", "U": "", "A": "", "N": ""}
#: Standard delimiters of the response (MSH-1, MSH-2).
RESPONSE_ENCODING = Encoding()


def is_query(raw: bytes) -> bool:
    """Whether a framed message is an HL7 query (MSH-9.1 ``QBP``) for this module."""
    try:
        return read_header(decode(raw)).message_type == QUERY_MESSAGE_TYPE
    except Rejected:
        return False


# ------------------------------------------------------------------------------ reading QPD


@dataclass
class PdqQuery:
    """What a QPD asks (ITI TF-2a 3.21.4.1.2.2) and where each part came from (for ERR-2)."""

    name: str
    tag: str
    criteria: Criteria
    domains: list[tuple[int, AuthorityRef]] = field(default_factory=list)
    identifier_location: str = "QPD^1^3"
    limit: int = search.MAX_RESULTS
    parameters: list[str] = field(default_factory=list)


def _at(values: list[str], index: int) -> str:
    return values[index] if index < len(values) else ""


def _text(value: str, location: str) -> TextMatch:
    text = value.strip()
    prefix = text.endswith("*")
    text = text.rstrip("*")
    if "*" in text or not text:
        raise Rejected("AE", "102", "only a trailing * wildcard after some characters is supported", location)
    return TextMatch(text, prefix=prefix)


def _authority_of(hd: str, enc: Encoding) -> AuthorityRef:
    namespace, oid, kind = (enc.unescape(_at(enc.subcomponents(hd), i)).strip() for i in range(3))
    return AuthorityRef(namespace=namespace, oid=oid if kind.upper() in ("ISO", "") else "")


def read_query(qpd: str, rcp: str, enc: Encoding) -> PdqQuery:
    """The query of a QPD segment (and RCP-2), read with the message's delimiters; raises
    :class:`Rejected` (AE) for an unknown query name, a missing tag or an unsupported parameter."""
    fields = qpd.split(enc.field)
    name = _at(fields, 1)
    if enc.unescape(enc.components(name)[0]).strip().upper() not in QUERY_NAMES:
        raise Rejected("AE", "103", "QPD-1 is not the IHE PDQ Query", "QPD^1^1")
    tag = _at(fields, 2)
    if not tag.strip():
        raise Rejected("AE", "101", "QPD-2 query tag is missing", "QPD^1^2")
    values: dict[str, tuple[str, str]] = {}
    parameters = [rep for rep in _at(fields, 3).split(enc.repetition) if rep]
    for index, rep in enumerate(parameters, start=1):
        location = f"QPD^1^3^{index}"
        components = enc.components(rep)
        key = _at(components, 0).strip().lstrip("@").upper()
        value = enc.component.join(components[1:])
        if not value.strip():
            continue
        if key in ("PID.5", "PID.5.1"):
            key = "PID.5.1.1"
        elif key in ("PID.7",):
            key = "PID.7.1"
        elif key == "PID.3":
            key = "PID.3.1"
        if key in values:
            raise Rejected("AE", "102", f"query parameter {key} is repeated", location)
        values[key] = (value, location)
    supported = {"PID.3.1", "PID.3.4", "PID.3.4.1", "PID.3.4.2", "PID.3.4.3", "PID.3.5"}
    supported |= {"PID.5.1.1", "PID.5.2", "PID.7.1", "PID.8"}
    for key, (_value, location) in values.items():
        if key not in supported:
            raise Rejected("AE", "103", f"query parameter {key} is not supported", f"{location}^1")
    if not values:
        raise Rejected("AE", "101", "QPD-3 has no query parameter", "QPD^1^3")

    def plain(key: str) -> str:
        return enc.unescape(values[key][0]).strip() if key in values else ""

    family = _text(plain("PID.5.1.1"), values["PID.5.1.1"][1]) if "PID.5.1.1" in values else None
    given = _text(plain("PID.5.2"), values["PID.5.2"][1]) if "PID.5.2" in values else None
    birth_date = "".join(c for c in plain("PID.7.1") if c in "0123456789")[:8]
    if "PID.7.1" in values and len(birth_date) not in (4, 6, 8):
        raise Rejected("AE", "102", "PID.7.1 is not a date YYYY[MM[DD]]", values["PID.7.1"][1])
    sex: str | None = None
    if "PID.8" in values:
        code = plain("PID.8").upper()
        if code not in SEX_CODES:
            raise Rejected("AE", "103", "PID.8 is not an HL7 table 0001 sex", values["PID.8"][1])
        sex = SEX_CODES[code]
    identifier: IdentifierKey | None = None
    identifier_location = "QPD^1^3"
    authority = _authority_of(values["PID.3.4"][0], enc) if "PID.3.4" in values else AuthorityRef()
    authority = AuthorityRef(
        namespace=plain("PID.3.4.1") or authority.namespace, oid=plain("PID.3.4.2") or authority.oid
    )
    if plain("PID.3.4.3") and plain("PID.3.4.3").upper() != "ISO":
        authority = AuthorityRef(namespace=authority.namespace)
    if not authority.label and plain("PID.3.5").upper().startswith("INS"):
        authority = AuthorityRef(namespace=search.INS_NIR_NAMESPACE)
    if authority.label or "PID.3.1" in values:
        identifier = IdentifierKey(value=plain("PID.3.1"), domain=authority if authority.label else None)
        for key in ("PID.3.4.2", "PID.3.4.1", "PID.3.4", "PID.3.1"):
            if key in values:
                identifier_location = values[key][1]
                break
    domains: list[tuple[int, AuthorityRef]] = []
    for index, rep in enumerate(_at(fields, 8).split(enc.repetition), start=1):
        if rep.strip():
            domains.append((index, _authority_of(_at(enc.components(rep), 3), enc)))
    limit = search.MAX_RESULTS
    quantity = enc.components(_at(rcp.split(enc.field), 2))
    count = _at(quantity, 0).strip()
    # NM digits are ASCII (str.isdigit also takes "³", which int() refuses).
    if count.isascii() and count.isdigit() and _at(quantity, 1).strip().upper() in ("RD", ""):
        limit = max(1, min(limit, int(count)))
    criteria = Criteria(family=family, given=given, birth_date=birth_date, sex=sex, identifier=identifier)
    return PdqQuery(
        name=name,
        tag=tag,
        criteria=criteria,
        domains=domains,
        identifier_location=identifier_location,
        limit=limit,
        parameters=parameters,
    )


# ------------------------------------------------------------------------------- responding


def _cx(identifier: PatientIdentifier) -> str:
    enc = RESPONSE_ENCODING
    authority = enc.escape_text(identifier.namespace)
    if identifier.oid:
        authority += f"&{enc.escape_text(identifier.oid)}&ISO"
    kind = "INS" if identifier.is_ins else "PI"
    return f"{enc.escape_text(identifier.value)}^^^{authority}^{kind}"


def _pid(set_id: int, found: Found, identifiers: list[PatientIdentifier]) -> str:
    """One PID the PAM France way (module docstring)."""
    enc = RESPONSE_ENCODING
    esc = enc.escape_text
    identity = found.identity
    names = []
    if identity.birth_name:
        first = identity.first_birth_given_name or identity.birth_given_names.split(" ")[0]
        names.append(f"{esc(identity.birth_name)}^{esc(first)}^{esc(identity.birth_given_names)}^^^^L")
    if identity.used_name or identity.used_given_name:
        names.append(f"{esc(identity.used_name)}^{esc(identity.used_given_name)}^^^^^D")
    codes = [esc(code) for code in [identity.status, *identity.attributes.split()] if code]
    fields = {
        1: str(set_id),
        3: enc.repetition.join(_cx(identifier) for identifier in identifiers),
        5: enc.repetition.join(names),
        7: esc(identity.birth_date or ""),
        8: esc(identity.sex or "U"),
        11: f"^^^^^^BDL^^{esc(identity.birth_place_code)}" if identity.birth_place_code else "",
        32: enc.repetition.join(codes),
    }
    return "PID|" + joined_fields(fields)


def _response(
    ctx: AppContext,
    header: Header,
    *,
    ack: str,
    status: str,
    qpd: str | None,
    error: Rejected | None = None,
    counts: tuple[int, int, int] | None = None,
) -> list[str]:
    """RSP^K22^RSP_K21 without its PID segments (ITI TF-2a 3.21.4.2.2), in the standard
    delimiters; ``qpd`` is the query's QPD in them too."""
    enc = RESPONSE_ENCODING
    quoted = requoting(header.encoding)
    fields = header.fields
    receiving_application = quoted(fields[4]) if len(fields) > 4 else ""
    receiving_facility = quoted(fields[5]) if len(fields) > 5 else ""
    msh = {
        3: receiving_application or "SIMRAL",
        4: receiving_facility or enc.escape_text(ctx.settings.ae_title),
        5: quoted(header.sending_application),
        6: quoted(header.sending_facility),
        7: datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        9: "RSP^K22^RSP_K21",
        10: uuid.uuid4().hex[:20],
        11: quoted(header.processing_id) or "P",
        12: header.version if header.version in SUPPORTED_VERSIONS else "2.5",
        18: quoted(header.charset),
    }
    out = ["MSH|^~\\&|" + joined_fields(msh, first=3)]
    out.append("MSA|" + joined_fields({1: ack, 2: quoted(header.control_id)}))
    if error is not None:
        err = {
            2: error.location,
            3: f"{error.code}^{enc.escape_text(ERROR_TEXT.get(error.code, 'Error'))}^HL70357",
            4: "E",
            8: cut_escaped(enc.escape_text(error.text), 250, enc.escape),
        }
        out.append("ERR|" + joined_fields(err))
    qpd_fields = qpd.split(enc.field) if qpd is not None else []
    qak = {1: _at(qpd_fields, 2), 2: status, 3: _at(qpd_fields, 1)}
    if counts is not None:
        qak.update({4: str(counts[0]), 5: str(counts[1]), 6: str(counts[2])})
    out.append("QAK|" + joined_fields(qak))
    if qpd is not None:
        out.append(qpd)
    return out


def _encoded(segments: list[str], header: Header) -> bytes:
    text = "\r".join(segments) + "\r"
    return text.encode("latin-1", errors="replace") if "8859" in header.charset else text.encode("utf-8")


def _in_response_delimiters(segment: Segment, header: Header) -> str:
    """A segment of the query in the response's delimiters (QPD echoed, QPD and RCP read)."""
    quoted = requoting(header.encoding)
    return RESPONSE_ENCODING.field.join([segment.name, *(quoted(value) for value in segment.fields[1:])])


def _principal(header: Header, peer: str) -> Principal:
    return Principal(
        kind="system",
        name=f"hl7:{header.sending_application}^{header.sending_facility}"[:100],
        via="mllp",
        address=peer[:64],
    )


def handle(ctx: AppContext, raw: bytes, *, peer: str = "", tls_subject: str | None = None) -> Handled:
    """Answer one QBP^Q22 message with its RSP^K22 (or an AR for another query).

    A query whose sender is not accepted from this connection (not a registered HL7 source, or one
    bound to another host or certificate: :func:`simral.hl7.adt.refuse_sender`) is answered AR with
    ERR 204 on MSH-3, searches nothing and is audited as ``hl7.refused``."""
    header = read_header(decode(raw))
    principal = _principal(header, peer)
    qpd: str | None = None
    query: PdqQuery | None = None
    not_accepted = refuse_sender(ctx, header, principal, peer=peer, tls_subject=tls_subject)
    if not_accepted is not None:
        return _refuse(ctx, header, principal, qpd, query, not_accepted)
    try:
        if header.event != FIND_CANDIDATES_EVENT:
            raise Rejected("AR", "201", f"unsupported query {header.event!r} (QBP^Q22 only)", "MSH^1^9")
        if header.version not in SUPPORTED_VERSIONS:
            raise Rejected("AR", "203", f"unsupported HL7 version {header.version!r}", "MSH^1^12")
        if not header.control_id:
            raise Rejected("AR", "101", "MSH-10 message control id is missing", "MSH^1^10")
        found = segments(decode(raw), header)
        qpd_segment = first_segment(found, "QPD")
        if qpd_segment is None:
            raise Rejected("AR", "100", "the message has no QPD segment", "QPD")
        qpd = _in_response_delimiters(qpd_segment, header)
        rcp = first_segment(found, "RCP")
        query = read_query(
            qpd, _in_response_delimiters(rcp, header) if rcp is not None else "", RESPONSE_ENCODING
        )
        return _answer(ctx, header, principal, qpd, query)
    except Rejected as rejected:
        return _refuse(ctx, header, principal, qpd, query, rejected)
    except search.UnknownDomain as exc:
        location = query.identifier_location + "^1" if query is not None else "QPD^1^3"
        return _refuse(ctx, header, principal, qpd, query, Rejected("AE", "204", str(exc), location))
    except search.SearchError as exc:
        return _refuse(ctx, header, principal, qpd, query, Rejected("AE", exc.code, str(exc), "QPD^1^3"))
    except AccessDenied as exc:
        return _refuse(ctx, header, principal, qpd, query, Rejected("AE", "207", str(exc)))
    except Exception as exc:
        log.exception("PDQ query %s could not be answered", header.control_id)
        refused = Rejected("AE", "207", f"application internal error: {type(exc).__name__}")
        return _refuse(ctx, header, principal, qpd, query, refused)


def _audit_keys(header: Header, query: PdqQuery | None) -> dict[str, Any]:
    keys: dict[str, Any] = {"MSH-10": header.control_id}
    if query is not None:
        keys["QPD-3"] = query.parameters
        keys["QPD-8"] = [ref.label for _index, ref in query.domains]
    return keys


def _answer(ctx: AppContext, header: Header, principal: Principal, qpd: str, query: PdqQuery) -> Handled:
    with ctx.db.unit_of_work() as session:
        domains: list[Domain] = []
        for index, ref in query.domains:
            try:
                domains.append(search.resolve_domain(session, ref))
            except search.UnknownDomain as exc:
                raise Rejected("AE", "204", str(exc), f"QPD^1^8^{index}^4") from None
        result = search.search_identities(
            session,
            query.criteria,
            principal=principal,
            transaction=TRANSACTION,
            query=_audit_keys(header, query),
            limit=search.MAX_RESULTS if domains else query.limit,
        )
        persons = search.same_person(session, result.found)
        records = search.records_for(result.found, persons, domains)
        total = len(records) if domains else result.total
        shown = records[: query.limit]
        counts = (total, len(shown), max(0, total - len(shown)))
        response = _response(ctx, header, ack="AA", status="OK" if shown else "NF", qpd=qpd, counts=counts)
        for set_id, (found, identifiers) in enumerate(shown, start=1):
            response.append(_pid(set_id, found, identifiers))
    log.info(
        "PDQ query %s answered %s with %d record(s)", header.control_id, "OK" if shown else "NF", len(shown)
    )
    return Handled(_encoded(response, header), "AA")


def _refuse(
    ctx: AppContext,
    header: Header,
    principal: Principal,
    qpd: str | None,
    query: PdqQuery | None,
    rejected: Rejected,
) -> Handled:
    """An AE/AR response (QAK-2 as MSA-1), audited as a failed query."""
    with ctx.db.unit_of_work() as session:
        search.audit_refused(
            session,
            principal=principal,
            transaction=TRANSACTION,
            query=_audit_keys(header, query),
            reason=f"{rejected.code} {rejected.text}",
        )
    response = _response(ctx, header, ack=rejected.ack, status=rejected.ack, qpd=qpd, error=rejected)
    # The reason stays in the audit trail and the response (it may quote patient data).
    log.warning("PDQ query %s answered %s %s", header.control_id, rejected.ack, rejected.code)
    return Handled(_encoded(response, header), rejected.ack)
