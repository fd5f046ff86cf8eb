"""IHE RAD IOCM rejection notes (Rejection Note Stored, RAD-66): what they reject, and hiding it.

A rejection note is a Key Object Selection Document (PS3.3 A.35.4) whose Concept Name Code
Sequence — the document title — is one of PS3.16 CID 7011 "Rejected for" codes. The instances it
lists in its Current Requested Procedure Evidence Sequence (0040,A375) become *rejected*: a row in
``rejected_instance``, and every read path (C-FIND / QIDO-RS results and counts, C-MOVE, C-GET,
WADO-RS, WADO-URI, study metadata, the DMP manifest) leaves them out through
:func:`simral.archive.counts.not_rejected`. The note itself stays visible, as IOCM requires
(Image Manager behaviour: the rejection note is stored and may be queried and retrieved).

What each title does here (IOCM lets the Image Manager choose between hiding and deleting):

- 113001 "Rejected for Quality Reasons", 113037 "Rejected for Patient Safety Reasons" and
  113038 "Incorrect Modality Worklist Entry": hidden, kept. A wrong worklist entry is usually
  followed by the corrected images; the rejected ones stay for the identity-vigilance team to
  check, and for the medical record (CSP R.1112-7 forbids destroying it before its term).
- 113039 "Data Retention Policy Expired": hidden at once, and proposed for deletion at the next
  retention review (:func:`simral.lifecycle.service.review`): destroying part of a medical record is
  the establishment's reviewed decision (CSP R.1112-7 paragraph 2), never a remote system's.

A note rejects only instances already stored, in studies its sender may see (a node cannot hide
another organisation's images); references to anything else are counted in the audit record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal, visible_studies
from simral.archive.counts import recount_study
from simral.archive.models import Instance, Series, Study
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.lifecycle.models import RejectedInstance

#: Key Object Selection Document Storage (PS3.4 B.5).
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
#: PS3.16 CID 7011 "Rejected for" (IHE IOCM rejection note titles), coding scheme DCM.
REJECTION_TITLES: Mapping[str, str] = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
#: The title whose rejected instances are proposed for deletion at the next retention review.
RETENTION_EXPIRED = "113039"

# DICOM JSON tags (PS3.18 F.2).
_CONCEPT_NAME = "0040A043"
_CODE_VALUE = "00080100"
_CODING_SCHEME = "00080102"
_EVIDENCE = "0040A375"
_STUDY_UID = "0020000D"
_REFERENCED_SERIES = "00081115"
_SERIES_UID = "0020000E"
_REFERENCED_SOP = "00081199"
_REFERENCED_SOP_INSTANCE = "00081155"


def _values(element: Any) -> list[Any]:
    return list((element or {}).get("Value") or [])


def document_title(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(code value, coding scheme) of a KOS's document title (Concept Name Code Sequence)."""
    items = _values(meta.get(_CONCEPT_NAME))
    if not items:
        return "", ""
    first = items[0]
    value = _values(first.get(_CODE_VALUE)) or [""]
    scheme = _values(first.get(_CODING_SCHEME)) or [""]
    return str(value[0]), str(scheme[0])


def rejection_code(meta: Mapping[str, Any]) -> str | None:
    """The CID 7011 code when ``meta`` (DICOM JSON of a KOS) is an IOCM rejection note."""
    value, scheme = document_title(meta)
    return value if scheme == "DCM" and value in REJECTION_TITLES else None


def referenced_instances(meta: Mapping[str, Any]) -> set[str]:
    """SOP Instance UIDs listed in a KOS's Current Requested Procedure Evidence Sequence."""
    found: set[str] = set()
    for study in _values(meta.get(_EVIDENCE)):
        for series in _values(study.get(_REFERENCED_SERIES)):
            for sop in _values(series.get(_REFERENCED_SOP)):
                found.update(str(uid) for uid in _values(sop.get(_REFERENCED_SOP_INSTANCE)))
    return found


def apply_rejection_note(
    session: Session, *, meta: Mapping[str, Any], note_sop_uid: str, principal: Principal
) -> int:
    """Reject what the note ``meta`` references (in the ingest transaction); the number rejected.

    Does nothing for a KOS that is not a rejection note. Idempotent: an instance already rejected
    keeps its first rejection.
    """
    code = rejection_code(meta)
    if code is None:
        return 0
    wanted = referenced_instances(meta) - {note_sop_uid}
    if not wanted:
        return 0
    found = session.execute(
        visible_studies(
            principal,
            select(Instance.id, Instance.sop_uid, Study.id, Study.study_uid)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk),
        ).where(Instance.sop_uid.in_(sorted(wanted)))
    ).all()
    already = set(
        session.scalars(
            select(RejectedInstance.instance_pk).where(
                RejectedInstance.instance_pk.in_([r[0] for r in found])
            )
        )
    )
    now = utcnow()
    by_study: dict[tuple[int, str], int] = {}
    for instance_pk, sop_uid, study_pk, study_uid in found:
        if instance_pk in already:
            continue
        session.add(
            RejectedInstance(
                instance_pk=instance_pk,
                study_uid=study_uid,
                sop_uid=sop_uid,
                reason_code=code,
                note_sop_uid=note_sop_uid,
                rejected_by=principal.audit_name[:128],
                rejected_at=now,
            )
        )
        by_study[(study_pk, study_uid)] = by_study.get((study_pk, study_uid), 0) + 1
    session.flush()
    for (study_pk, study_uid), count in by_study.items():
        recount_study(session, study_pk)
        audit.record(
            session,
            action="instance.reject",
            principal=principal,
            study_uid=study_uid,
            detail={"note": note_sop_uid, "code": code, "meaning": REJECTION_TITLES[code], "rejected": count},
        )
    ignored = len(wanted) - len(found)
    if ignored:
        audit.record(
            session,
            action="instance.reject",
            principal=principal,
            outcome="warning",
            detail={"note": note_sop_uid, "code": code, "not_stored_or_not_visible": ignored},
        )
    return sum(by_study.values())


def rejected_in_study(session: Session, study_uid: str, *, code: str | None = None) -> list[str]:
    """SOP Instance UIDs of a study's rejected instances (of one title's ``code`` if given)."""
    query = select(RejectedInstance.sop_uid).where(RejectedInstance.study_uid == study_uid)
    if code is not None:
        query = query.where(RejectedInstance.reason_code == code)
    return sorted(session.scalars(query))
