"""HL7 v2.5 ADT messages (IHE ITI TF-2b 3.30 Patient Identity Feed, PAM; IHE PAM France national
extension) translated into :mod:`simral.patients.service` calls, and their acknowledgements.

Events (HL7 v2.5 chapter 3): A01, A04, A05, A08, A28, A31 create or update the identity; A40 merges
the MRG-1 identifier into the PID-3 one; A47 changes the MRG-1 identifier into the PID-3 one; A24
links and A37 unlinks the identities of the message's two PID segments.

French conventions read from PID (PAM France):

- PID-3 repetitions: the IPP ``value^^^AUTH&oid&ISO^PI`` and the INS
  ``value^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS`` (NIA .9; test .10 and demonstration
  .11 only when ``ins_test_oids_allowed``);
- PID-5: the birth name with name type L (XPN.1 birth name, XPN.2 first birth first name, XPN.3
  the birth first names), the used name with type D (XPN.1 used name, XPN.2 used first name);
- PID-7 birth date, PID-8 sex, PID-11 the birth place: the address of type BDL whose XAD.9
  carries the INSEE code;
- PID-32 identity reliability code: the identity status PROV / RECUP / VALI / QUAL (VIDE read as
  PROV) and the attributes DOUTE, FICTI, HOMON.

Senders: ADT messages (and PDQ queries, :mod:`simral.hl7.pdq`) are taken only from a registered
HL7 source (:class:`simral.patients.models.Hl7Source`, ``simral hl7-sources add``) or RIS, believed
only from its host or certificate when bound to them; anyone else gets AR 204 unless the lab setting
``allow_unknown_hl7_senders`` is on (:func:`sender_refusal`).

Each message is kept (raw text, control id, sender, time, outcome) in the transaction that applies
it, before its acknowledgement is sent: AA (applied), AE with an ERR segment (the application
refused it: unknown identifier, conflict...), AR (malformed, unsupported type, event or version).
A message whose sending application, facility and MSH-10 were seen before is answered with the
stored acknowledgement and not applied again. Acknowledgements use the original mode (HL7 v2.5
§2.9.2) with ERR-3 from HL7 table 0357 and ERR-8 a readable message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7apy
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Segment as Hl7apySegment
from hl7apy.exceptions import HL7apyException, InvalidName, UnsupportedVersion
from hl7apy.parser import get_message_info
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.audit import service as audit
from simral.context import AppContext
from simral.patients import service as patients
from simral.patients.models import PatientIdentity
from simral.patients.service import AuthorityRef, Ins, PatientError, Traits
from simral.storage.base import BlobStore

log = logging.getLogger(__name__)

#: Events that create or update an identity from PID (IHE PAM ITI-30 and ITI-31 movements).
UPSERT_EVENTS = frozenset({"A01", "A04", "A05", "A08", "A28", "A31"})
SUPPORTED_EVENTS = UPSERT_EVENTS | {"A40", "A47", "A24", "A37"}
#: Order messages applied by :mod:`simral.hl7.orders` (ANS Téléradiologie, IHE SWF).
ORDER_EVENTS = frozenset({("ORM", "O01"), ("OMI", "O23")})
#: The CI-SIS "Transmission de documents CDA-R2 en HL7 v2" message (MSH-21 ``CISIS_CDA_HL7_V2``).
DOCUMENT_EVENT = ("ORU", "R01")
#: PID-32 codes (HL7 table 0445 as extended by PAM France) that give the identity status.
STATUS_CODES = {"PROV": "PROV", "VIDE": "PROV", "VALI": "VALI", "RECUP": "RECUP", "QUAL": "QUAL"}
#: PID-32 codes that are attributes of the identity (doubtful, fictitious, homonym).
ATTRIBUTE_CODES = frozenset({"DOUTE", "FICTI", "HOMON"})
ACK_VERSION = "2.5"


class Rejected(Exception):
    """A message that is not applied: ``ack`` AE (application error) or AR (rejected)."""

    def __init__(self, ack: str, code: str, text: str, location: str = "") -> None:
        super().__init__(text)
        self.ack, self.code, self.text, self.location = ack, code, text, location


#: HL7 table 0357 message error condition codes.
ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


@dataclass(frozen=True)
class Encoding:
    """The message's delimiters (MSH-1, MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    def unescape(self, text: str) -> str:
        """Resolve HL7 escape sequences (v2.5 §2.7.4) in a primitive value."""
        if self.escape not in text:
            return text
        out, i, e = [], 0, self.escape
        table = {"F": self.field, "S": self.component, "T": self.subcomponent, "R": self.repetition, "E": e}
        while i < len(text):
            end = text.find(e, i + 1) if text[i] == e else -1
            if end > i:
                code = text[i + 1 : end]
                if code in table:
                    out.append(table[code])
                elif code.startswith("X"):
                    with contextlib.suppress(ValueError):
                        out.append(bytes.fromhex(code[1:]).decode("latin-1"))
                i = end + 1
                continue
            out.append(text[i])
            i += 1
        return "".join(out)

    def escape_text(self, text: str) -> str:
        """Escape free text for a field (ERR-8)."""
        e = self.escape
        text = text.replace(e, f"{e}E{e}")
        for char, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
        ):
            text = text.replace(char, f"{e}{code}{e}")
        return " ".join(text.split())

    def components(self, er7: str) -> list[str]:
        return er7.split(self.component)

    def subcomponents(self, er7: str) -> list[str]:
        return er7.split(self.subcomponent)


def _at(values: list[str], index: int) -> str:
    return values[index] if index < len(values) else ""


@dataclass
class Segment:
    """One segment's fields as ER7 text (``fields[n]`` is field n; for MSH, ``fields[n]`` is
    MSH-(n+1), MSH-1 being the separator), with the message's delimiters (HL7 v2.5 §2.5–2.7)."""

    name: str
    fields: list[str]
    enc: Encoding
    index: int

    def field(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def repetitions(self, n: int) -> list[str]:
        return [rep for rep in self.field(n).split(self.enc.repetition) if rep]

    def components(self, n: int, repetition: str | None = None) -> list[str]:
        value = self.field(n).split(self.enc.repetition)[0] if repetition is None else repetition
        return value.split(self.enc.component)

    def component(self, n: int, c: int) -> str:
        """Field n, component c (1-based), first repetition, unescaped."""
        parts = self.components(n)
        return self.text(parts[c - 1]) if c - 1 < len(parts) else ""

    def text(self, value: str) -> str:
        """An unescaped value; ``\\.br\\`` (formatted text line break) becomes a new line."""
        escape = self.enc.escape
        value = value.replace(f"{escape}.br{escape}", "\n")
        return self.enc.unescape(value).strip()

    def where(self, n: int) -> str:
        return f"{self.name}^{self.index}^{n}"


@dataclass(frozen=True)
class Header:
    """What is read from MSH before (and whatever) the full parse."""

    encoding: Encoding
    sending_application: str
    sending_facility: str
    message_type: str
    event: str
    control_id: str
    processing_id: str
    version: str
    charset: str
    fields: tuple[str, ...]

    @property
    def dedup_key(self) -> str | None:
        if not self.control_id:
            return None
        return f"{self.sending_application}|{self.sending_facility}|{self.control_id}"[:300]


def decode(raw: bytes) -> str:
    """The message text: MSH-18 ``8859/1`` (ISO-8859-1) or UTF-8 (PAM France: ``UNICODE UTF-8``),
    segments separated by CR (LF and CR LF tolerated)."""
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    encoding = "latin-1" if b"8859/1" in first or b"8859/15" in first else "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 ") + "\r"


def read_header(text: str) -> Header:
    """MSH fields by plain splitting (HL7 v2.5 §2.14.9), so even an unparseable message gets a
    meaningful acknowledgement. Raises :class:`Rejected` (AR) when there is no MSH segment."""
    if not text.startswith("MSH") or len(text) < 8:
        raise Rejected("AR", "100", "the message does not start with an MSH segment")
    separator = text[3]
    segment = text.split("\r", 1)[0]
    fields = segment.split(separator)
    characters = fields[1] if len(fields) > 1 else ""
    encoding = Encoding(
        field=separator,
        component=_at(list(characters), 0) or "^",
        repetition=_at(list(characters), 1) or "~",
        escape=_at(list(characters), 2) or "\\",
        subcomponent=_at(list(characters), 3) or "&",
    )
    # fields[0] is "MSH" and MSH-1 is the separator itself: MSH-n is fields[n - 1].
    message_type = encoding.components(_at(fields, 8))
    return Header(
        encoding=encoding,
        sending_application=_at(fields, 2),
        sending_facility=_at(fields, 3),
        message_type=_at(message_type, 0),
        event=_at(message_type, 1),
        control_id=_at(fields, 9)[:64],
        processing_id=_at(fields, 10),
        version=encoding.components(_at(fields, 11))[0],
        charset=_at(fields, 17),
        fields=tuple(fields),
    )


def build_ack(
    header: Header | None,
    code: str,
    *,
    application: str,
    facility: str,
    error: Rejected | None = None,
) -> str:
    """An original-mode acknowledgement (HL7 v2.5 §2.9.2; MSA, and ERR for AE/AR) in the standard
    delimiters ``|^~\\&``; values quoted from the message's MSH are carried over to them."""
    version = header.version if header is not None and header.version in ("2.5", "2.5.1") else ACK_VERSION
    ours = Encoding()
    quoted = requoting(header.encoding if header is not None else ours)
    event = header.event if header is not None and header.event.isalnum() else ""
    msh = {
        3: ours.escape_text(application),
        4: ours.escape_text(facility),
        5: quoted(header.sending_application) if header is not None else "",
        6: quoted(header.sending_facility) if header is not None else "",
        7: datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        9: f"ACK^{event}^ACK" if event else "ACK",
        10: uuid.uuid4().hex[:20],
        11: (quoted(header.processing_id) if header is not None else "") or "P",
        12: version,
        18: quoted(header.charset) if header is not None else "",
    }
    segments = ["MSH|^~\\&|" + joined_fields(msh, first=3)]
    msa = {1: code, 2: quoted(header.control_id) if header is not None else ""}
    segments.append("MSA|" + joined_fields(msa))
    if error is not None:
        err = {
            2: error.location,
            3: f"{error.code}^{ours.escape_text(ERROR_TEXT.get(error.code, 'Error'))}^HL70357",
            4: "E",
            8: cut_escaped(ours.escape_text(error.text), 250, ours.escape),
        }
        segments.append("ERR|" + joined_fields(err))
    return "\r".join(segments) + "\r"


def cut_escaped(text: str, size: int, escape: str) -> str:
    """``text`` cut to ``size`` characters, not within an escape sequence."""
    text = text[:size]
    return text[: text.rindex(escape)] if text.count(escape) % 2 else text


def joined_fields(fields: dict[int, str], *, first: int = 1) -> str:
    """Fields ``first``.. of a segment, trailing empty ones left out."""
    last = max((n for n, value in fields.items() if value), default=first)
    return "|".join(fields.get(n, "") for n in range(first, last + 1))


def requoting(enc: Encoding) -> Callable[[str], str]:
    """ER7 text in the delimiters ``enc`` rewritten in the standard ones (the acknowledgement's),
    data characters that are standard delimiters escaped (HL7 v2.5 §2.7.4)."""
    standard = Encoding()
    if enc == standard:
        return lambda value: value
    delimiters = {
        enc.component: standard.component,
        enc.repetition: standard.repetition,
        enc.subcomponent: standard.subcomponent,
        enc.escape: standard.escape,
    }
    codes = {
        standard.field: "F",
        standard.component: "S",
        standard.subcomponent: "T",
        standard.repetition: "R",
        standard.escape: "E",
    }

    def quoted(value: str) -> str:
        out = []
        for char in value:
            if char in delimiters:
                out.append(delimiters[char])
            elif char in codes:
                out.append(f"{standard.escape}{codes[char]}{standard.escape}")
            else:
                out.append(char)
        return "".join(out)

    return quoted


# --------------------------------------------------------------------------------- PID reading


@dataclass(frozen=True)
class PidIdentity:
    """The identity a PID segment describes."""

    identifiers: tuple[tuple[str, AuthorityRef], ...]
    ins: Ins | None
    traits: Traits
    status: str | None
    attributes: str | None


def _authority(cx: list[str], enc: Encoding) -> AuthorityRef:
    hd = enc.subcomponents(_at(cx, 3))
    namespace, oid, kind = (enc.unescape(_at(hd, i)).strip() for i in range(3))
    return AuthorityRef(namespace=namespace, oid=oid if kind.upper() in ("ISO", "") else "")


def read_identifier_list(
    repetitions: list[str], enc: Encoding, location: str
) -> tuple[list[tuple[str, AuthorityRef]], Ins | None]:
    """Local identifiers (type PI, or untyped with an authority) and the INS of a CX list (PID-3,
    MRG-1: the field's repetitions)."""
    identifiers: list[tuple[str, AuthorityRef]] = []
    ins: Ins | None = None
    for rep in repetitions:
        cx = enc.components(rep)
        value = enc.unescape(_at(cx, 0)).strip()
        if not value:
            continue
        authority = _authority(cx, enc)
        kind = _at(cx, 4).strip().upper()
        if kind.startswith("INS") or patients.is_ins_oid(authority.oid):
            if not authority.oid:
                raise Rejected("AE", "101", "INS without its OID in CX.4", location)
            ins = ins or Ins(value, authority.oid)
        elif kind in ("PI", ""):
            if not (authority.oid or authority.namespace):
                raise Rejected(
                    "AE", "101", "patient identifier without its assigning authority (CX.4)", location
                )
            identifiers.append((value, authority))
    return identifiers, ins


def read_pid(pid: Segment, enc: Encoding, *, index: int = 1, require_identifier: bool = True) -> PidIdentity:
    """The identity of a PID segment, French conventions (module docstring); with
    ``require_identifier=False`` a PID-3 carrying only the INS is accepted (ANS Téléradiologie flux).
    Fields the message's version lacks (PID-32 is HL7 v2.4 and later) read as empty."""
    identifiers, ins = read_identifier_list(pid.repetitions(3), enc, f"PID^{index}^3")
    if not identifiers and (require_identifier or ins is None):
        raise Rejected("AE", "101", "PID-3 has no patient identifier of type PI", f"PID^{index}^3")
    names: dict[str, str] = {}
    for rep in pid.repetitions(5):
        xpn = enc.components(rep)
        kind = _at(xpn, 6).strip().upper() or "L"
        family = enc.unescape(enc.subcomponents(_at(xpn, 0))[0]).strip()
        given = enc.unescape(_at(xpn, 1)).strip()
        further = enc.unescape(_at(xpn, 2)).strip()
        if kind == "L" and "birth_name" not in names:
            names.update(birth_name=family, first_birth_given_name=given, birth_given_names=further or given)
        elif kind == "D" and "used_name" not in names:
            names.update(used_name=family, used_given_name=given)
    birth_place = ""
    for rep in pid.repetitions(11):
        xad = enc.components(rep)
        if _at(xad, 6).strip().upper() == "BDL":
            birth_place = enc.unescape(_at(xad, 8)).strip()
    codes = [enc.unescape(rep).strip().upper() for rep in pid.repetitions(32)]
    codes = [code for code in codes if code]
    unknown = [code for code in codes if code not in STATUS_CODES and code not in ATTRIBUTE_CODES]
    if unknown:
        raise Rejected("AE", "103", f"unknown identity reliability code {unknown[0]!r}", f"PID^{index}^32")
    statuses = [STATUS_CODES[code] for code in codes if code in STATUS_CODES]
    attributes = [code for code in codes if code in ATTRIBUTE_CODES]
    status = statuses[0] if statuses else ("PROV" if attributes else None)
    birth_date = pid.components(7)[0][:8]
    sex = pid.field(8).split(enc.repetition)[0]
    traits = Traits(
        birth_name=names.get("birth_name", ""),
        birth_given_names=names.get("birth_given_names", ""),
        first_birth_given_name=names.get("first_birth_given_name", ""),
        sex=sex,
        birth_date=birth_date,
        birth_place_code=birth_place,
        used_name=names.get("used_name", ""),
        used_given_name=names.get("used_given_name", ""),
    )
    return PidIdentity(tuple(identifiers), ins, traits, status, " ".join(attributes) if codes else None)


# ------------------------------------------------------------------------------- application


@dataclass
class Feed:
    """One message being applied: its session, sender principal and settings."""

    session: Session
    principal: Principal
    source: str
    allow_test_ins: bool
    encoding: Encoding
    #: Where documents attached to imaging orders are kept, and their largest accepted size.
    store: BlobStore | None = None
    document_max_bytes: int = 0

    def upsert(self, pid: PidIdentity) -> PatientIdentity:
        """Create or update the identity of each PID-3 identifier; further identifiers of other
        authorities in the same PID are linked to the first one's person."""
        primary: PatientIdentity | None = None
        for local_id, authority in pid.identifiers:
            result = patients.upsert_identity(
                self.session,
                local_id=local_id,
                authority=authority,
                traits=pid.traits,
                ins=pid.ins,
                status=pid.status,
                attributes=pid.attributes,
                principal=self.principal,
                source=self.source,
                allow_test_ins=self.allow_test_ins,
            )
            if primary is None:
                primary = result.identity
            elif result.identity.authority_id != primary.authority_id:
                patients.link_identities(
                    self.session, primary, result.identity, principal=self.principal, source=self.source
                )
        assert primary is not None
        return primary

    def prior(self, mrg: Segment, survivor_authority: AuthorityRef, index: int) -> tuple[str, AuthorityRef]:
        identifiers, _ins = read_identifier_list(mrg.repetitions(1), self.encoding, f"MRG^{index}^1")
        if not identifiers:
            raise Rejected("AE", "101", "MRG-1 has no prior patient identifier", f"MRG^{index}^1")
        local_id, authority = identifiers[0]
        if not (authority.oid or authority.namespace):
            authority = survivor_authority
        return local_id, authority


def named_segments(segments: list[Segment], name: str) -> list[Segment]:
    """The segments called ``name``, in message order."""
    return [segment for segment in segments if segment.name == name]


def first_segment(segments: list[Segment], name: str) -> Segment | None:
    """The first segment called ``name``, if any."""
    return next((segment for segment in segments if segment.name == name), None)


def apply(feed: Feed, segments: list[Segment], event: str) -> None:
    """Apply one parsed ADT message (the caller's transaction)."""
    pids = named_segments(segments, "PID")
    if not pids:
        raise Rejected("AR", "100", "the message has no PID segment", "PID")
    enc = feed.encoding
    session, principal, source = feed.session, feed.principal, feed.source
    if event in UPSERT_EVENTS:
        feed.upsert(read_pid(pids[0], enc))
    elif event in ("A24", "A37"):
        if len(pids) < 2:
            raise Rejected("AR", "100", f"{event} needs two PID segments", "PID^2")
        first = feed.upsert(read_pid(pids[0], enc, index=1))
        second = feed.upsert(read_pid(pids[1], enc, index=2))
        if event == "A24":
            patients.link_identities(session, first, second, principal=principal, source=source, reason="A24")
        else:
            patients.unlink_identities(session, first, second, principal=principal, source=source)
    elif event in ("A40", "A47"):
        mrgs = named_segments(segments, "MRG")
        if len(mrgs) < len(pids):
            raise Rejected("AR", "100", f"{event} needs an MRG segment after each PID", "MRG")
        for index, (pid_segment, mrg) in enumerate(zip(pids, mrgs, strict=False), start=1):
            pid = read_pid(pid_segment, enc, index=index)
            local_id, authority = pid.identifiers[0]
            prior_id, prior_authority = feed.prior(mrg, authority, index)
            prior = patients.get_identity_or_raise(session, local_id=prior_id, authority=prior_authority)
            if event == "A40":
                survivor = feed.upsert(pid)
                patients.merge_identities(
                    session, survivor=survivor, merged=prior, principal=principal, source=source
                )
            else:
                patients.change_identifier(
                    session, prior, new_local_id=local_id, principal=principal, source=source
                )
                feed.upsert(pid)


# ---------------------------------------------------------------------------------- handling


@dataclass(frozen=True)
class Handled:
    """The acknowledgement to send and what happened."""

    ack: bytes
    code: str
    duplicate: bool = False


def _encode(text: str, header: Header | None) -> bytes:
    if header is not None and "8859" in header.charset:
        return text.encode("latin-1", errors="replace")
    return text.encode("utf-8")


def handle(ctx: AppContext, raw: bytes, *, peer: str = "", tls_subject: str | None = None) -> Handled:
    """Process one framed message; return its acknowledgement, which may be sent only now: the
    message (and, for AA, what it changed) is committed.

    ``tls_subject``: the CN of the verified client certificate of an MLLP TLS connection. A
    message whose sender is not accepted from this connection (:func:`refuse_sender`) is refused
    (AR, ERR 204 on MSH-3), changes nothing and is audited as a security event, before anything
    else is looked at."""
    application, facility = "SIMRAL", ctx.settings.ae_title
    text = decode(raw)
    header: Header | None = None
    try:
        header = read_header(text)
    except Rejected as rejected:
        return _keep(ctx, None, text, peer, rejected, application=application, facility=facility)
    principal = Principal(
        kind="system",
        name=f"hl7:{header.sending_application}^{header.sending_facility}"[:100],
        via="mllp",
        address=peer[:64],
    )
    not_accepted = refuse_sender(ctx, header, principal, peer=peer, tls_subject=tls_subject)
    if not_accepted is not None:
        # Kept for review without its duplicate key: a forged copy must not shadow the real one.
        return _keep(
            ctx, header, text, peer, not_accepted, application=application, facility=facility, keyed=False
        )
    key = header.dedup_key
    if key is not None:
        with ctx.db.reading() as session:
            seen = patients.find_message(session, key)
        if seen is not None:
            return Handled(_encode(seen.ack, header), seen.outcome, duplicate=True)
    try:
        segments = _parse(text, header)
        source = f"hl7:{header.sending_application}^{header.sending_facility}:{header.control_id}"[:128]
        with ctx.db.unit_of_work() as session:
            feed = Feed(
                session,
                principal,
                source,
                ctx.settings.ins_test_oids_allowed,
                header.encoding,
                store=ctx.store,
                document_max_bytes=ctx.settings.request_document_max_bytes,
            )
            if header.message_type == "ADT":
                apply(feed, segments, header.event)
            else:  # reports for the DMP; imaging orders (ANS Téléradiologie flux 1, 2, 4; IHE SWF OMI)
                from simral.hl7 import orders, report_flow

                if not report_flow.apply(feed, segments, header):
                    orders.apply(feed, segments, header)
            ack = build_ack(header, "AA", application=application, facility=facility)
            patients.record_message(
                session,
                dedup_key=key,
                control_id=header.control_id,
                sending_application=header.sending_application,
                sending_facility=header.sending_facility,
                message_type=f"{header.message_type}^{header.event}",
                peer=peer,
                raw=_without_encapsulated_data(text, header.encoding),
                outcome="AA",
                error="",
                ack=ack,
                principal=principal,
            )
        return Handled(_encode(ack, header), "AA")
    except Rejected as rejected:
        return _keep(ctx, header, text, peer, rejected, application=application, facility=facility)
    except PatientError as exc:
        refused = Rejected("AE", exc.code, str(exc))
        return _keep(ctx, header, text, peer, refused, application=application, facility=facility)
    except IntegrityError:
        # The same message applied meanwhile by another connection: answer as it was answered.
        if key is not None:
            with ctx.db.reading() as session:
                seen = patients.find_message(session, key)
            if seen is not None:
                return Handled(_encode(seen.ack, header), seen.outcome, duplicate=True)
        log.exception("HL7 message %s could not be applied", header.control_id)
        refused = Rejected("AE", "207", "the message could not be applied (conflicting update)")
        return _keep(ctx, header, text, peer, refused, application=application, facility=facility)
    except Exception as exc:
        log.exception("HL7 message %s could not be applied", header.control_id)
        refused = Rejected("AE", "207", f"application internal error: {type(exc).__name__}")
        return _keep(ctx, header, text, peer, refused, application=application, facility=facility)


#: MSH-21 profile name of the CI-SIS volet "Transmission de documents CDA-R2 en HL7 v2".
CDA_DOCUMENT_PROFILE = "CISIS_CDA_HL7_V2"
#: ED values longer than this are not kept in the message log (attached documents are stored apart).
KEPT_ED_CHARACTERS = 1024


def _without_encapsulated_data(text: str, enc: Encoding) -> str:
    """The message as kept in the log: OBX-5 ED data (ED.5) over :data:`KEPT_ED_CHARACTERS` is
    replaced by a note of its length (documents attached to orders are kept in the blob store)."""
    if "OBX" not in text:
        return text
    segments = text.split("\r")
    for i, segment in enumerate(segments):
        if not segment.startswith("OBX" + enc.field):
            continue
        fields = segment.split(enc.field)
        if len(fields) < 6 or fields[2] != "ED" or len(fields[5]) <= KEPT_ED_CHARACTERS:
            continue
        parts = fields[5].split(enc.component)
        data = 4 if len(parts) >= 5 else 0 if len(parts) == 1 else -1  # ED.5, or bare base64 (DRIMbox)
        if data >= 0:
            parts[data] = f"[{len(parts[data])} characters not kept]"
            fields[5] = enc.component.join(parts)
            segments[i] = enc.field.join(fields)
    return "\r".join(segments)


def _parse(text: str, header: Header) -> list[Segment]:
    """The message's segments (:func:`segments`), once the message type, event and version are
    ones this feed supports."""
    if header.message_type in ("ORM", "OMI"):
        if (header.message_type, header.event) not in ORDER_EVENTS:
            raise Rejected("AR", "201", f"unsupported event {header.event!r} (ORM^O01, OMI^O23)", "MSH^1^9")
    elif header.message_type == "ORU" and CDA_DOCUMENT_PROFILE in _at(list(header.fields), 20):
        # A document for a request (CI-SIS "Transmission de documents CDA-R2 en HL7 v2").
        if header.event != DOCUMENT_EVENT[1]:
            raise Rejected("AR", "201", f"unsupported event {header.event!r} (ORU^R01)", "MSH^1^9")
    elif header.message_type == "MDM":
        # A report for the DMP (CI-SIS CDA-R2 in HL7 v2: T02 original, T10 replacement).
        if header.event not in ("T02", "T10"):
            raise Rejected("AR", "201", f"unsupported event {header.event!r} (MDM^T02, MDM^T10)", "MSH^1^9")
    elif header.message_type != "ADT":
        raise Rejected(
            "AR",
            "200",
            f"unsupported message type {header.message_type!r} (ADT, ORM, OMI, ORU, MDM)",
            "MSH^1^9",
        )
    elif header.event not in SUPPORTED_EVENTS:
        events = ", ".join(sorted(SUPPORTED_EVENTS))
        raise Rejected("AR", "201", f"unsupported event {header.event!r} (supported: {events})", "MSH^1^9")
    if not header.control_id:
        raise Rejected("AR", "101", "MSH-10 message control id is missing", "MSH^1^10")
    return segments(text, header)


def segments(text: str, header: Header) -> list[Segment]:
    """The segments of a message (HL7 v2.5 §2.5–2.7), each field kept as its ER7 text: handlers
    read the few fields they need, a large message costs one split per segment.

    Refused (AR) as hl7apy's tolerant parser refuses them: delimiters in MSH-2 that are not four
    distinct characters (five from v2.7), an HL7 version hl7apy has no definitions for (203), a
    segment ID that is neither one of that version nor a Z-segment (102).
    """
    try:
        _encoding, _structure, version = get_message_info(text)
        version = version or hl7apy.get_default_version()
        hl7apy.check_version(version)
    except UnsupportedVersion:
        raise Rejected("AR", "203", f"unsupported HL7 version {header.version!r}", "MSH^1^12") from None
    except (HL7apyException, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise Rejected("AR", "102", f"malformed message: {exc}"[:200]) from None
    enc = header.encoding
    found: list[Segment] = []
    counts: dict[str, int] = {}
    for text_segment in text.split("\r"):
        text_segment = text_segment.strip()
        if not text_segment:
            continue
        fields = text_segment.split(enc.field)
        name = fields[0]
        if not _known_segment(name, version):
            raise Rejected("AR", "102", f"malformed message: invalid segment name {name[:10]!r}") from None
        counts[name] = counts.get(name, 0) + 1
        found.append(Segment(name, fields, enc, counts[name]))
    return found


@functools.lru_cache(maxsize=2048)
def _known_segment(name: str, version: str) -> bool:
    """Whether ``name`` is a segment ID of HL7 ``version`` (hl7apy's definitions) or a Z-segment."""
    if len(name) != 3:
        return False
    try:
        Hl7apySegment(name, version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
    except (InvalidName, HL7apyException, ValueError, KeyError):
        return False
    return True


#: Message types of the identity feed and of PDQ queries: their senders must be registered HL7
#: sources (or RIS) unless ``allow_unknown_hl7_senders`` is set.
IDENTITY_MESSAGES = frozenset({"ADT", "QBP"})


def sender_refusal(ctx: AppContext, header: Header, *, peer: str, tls_subject: str | None) -> str:
    """Why the message's sender (MSH-3/MSH-4) is not accepted from this connection, or "".

    Every message: a registered RIS bound to its host or certificate is believed only from there
    (:func:`simral.reading.service.ris_endpoint_refusal`). ADT and PDQ messages also: a registered
    HL7 source likewise, and a sender that is neither a registered source nor a registered RIS is
    refused unless ``allow_unknown_hl7_senders`` (:func:`simral.patients.service.hl7_sender_refusal`).
    Orders and reports keep their own rule: the RIS must be registered (:mod:`simral.hl7.orders`)."""
    from simral.reading import service as reading

    application, facility = header.sending_application, header.sending_facility
    with ctx.db.reading() as session:
        ris = reading.find_ris_endpoint(session, application, facility)
        refused = ""
        if ris is not None:
            refused = reading.ris_endpoint_refusal(ris, address=peer, tls_subject=tls_subject)
        if refused or header.message_type not in IDENTITY_MESSAGES:
            return refused
        admit_unregistered = ctx.settings.allow_unknown_hl7_senders or ris is not None
        return patients.hl7_sender_refusal(
            session,
            application=application,
            facility=facility,
            address=peer,
            tls_subject=tls_subject,
            admit_unregistered=admit_unregistered,
        )


def refuse_sender(
    ctx: AppContext, header: Header, principal: Principal, *, peer: str, tls_subject: str | None
) -> Rejected | None:
    """The AR to answer when the sender is not accepted (:func:`sender_refusal`), audited as
    ``hl7.refused``; None when it is.

    ERR-3 is 204 (HL7 table 0357 "Unknown key identifier") on MSH-3: the sender, the key the
    registry knows sources by, is unknown from this connection. Table 0357 has no code for an
    unauthorised sender; 207 ("Application internal error") would blame the receiver, and the
    table's other codes speak of the message's syntax, type, event or version."""
    reason = sender_refusal(ctx, header, peer=peer, tls_subject=tls_subject)
    if not reason:
        return None
    log.warning("HL7 message refused: %s", reason)
    audit.record_now(
        ctx,
        action="hl7.refused",
        principal=principal,
        outcome="failure",
        detail={
            "reason": reason,
            "control_id": header.control_id[:64],
            "message_type": f"{header.message_type}^{header.event}",
            "certificate_cn": tls_subject or "",
        },
    )
    return Rejected("AR", "204", "sender not accepted from this connection", "MSH^1^3")


def _keep(
    ctx: AppContext,
    header: Header | None,
    text: str,
    peer: str,
    rejected: Rejected,
    *,
    application: str,
    facility: str,
    keyed: bool = True,
) -> Handled:
    """Keep a message that was not applied (for review), then give its AE/AR acknowledgement.

    An internal error (207) is kept without its duplicate key: the sender's retry is applied anew;
    so is a message refused for its sender (``keyed=False``).
    """
    ack = build_ack(header, rejected.ack, application=application, facility=facility, error=rejected)
    key = header.dedup_key if header is not None and rejected.code != "207" and keyed else None
    principal = Principal(
        kind="system",
        name=(f"hl7:{header.sending_application}^{header.sending_facility}" if header else "hl7:unknown")[
            :100
        ],
        via="mllp",
        address=peer[:64],
    )
    try:
        with ctx.db.unit_of_work() as session:
            patients.record_message(
                session,
                dedup_key=key,
                control_id=header.control_id if header is not None else "",
                sending_application=header.sending_application if header is not None else "",
                sending_facility=header.sending_facility if header is not None else "",
                message_type=f"{header.message_type}^{header.event}" if header is not None else "",
                peer=peer,
                raw=_without_encapsulated_data(text, header.encoding if header is not None else Encoding()),
                outcome=rejected.ack,
                error=f"{rejected.code} {rejected.text}",
                ack=ack,
                principal=principal,
            )
    except IntegrityError:
        if key is not None:
            with ctx.db.reading() as session:
                seen = patients.find_message(session, key)
            if seen is not None:
                return Handled(_encode(seen.ack, header), seen.outcome, duplicate=True)
        raise
    # The reason stays in the message log and the acknowledgement (it may quote patient data).
    log.warning(
        "HL7 message %s answered %s %s", header.control_id if header else "?", rejected.ack, rejected.code
    )
    return Handled(_encode(ack, header), rejected.ack)
