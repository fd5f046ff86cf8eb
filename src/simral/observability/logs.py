"""Application logs: plain text or JSON lines, and the rule that keeps patient data out of them.

The rule (DESIGN.md §9, "never log PHI"): patient data — names, identifiers (IPP, INS, NIR),
birth dates, addresses, free-text clinical content — is never passed to a log call, neither in the
message nor in its arguments nor as ``extra`` fields; what happened to a patient's data goes to
the audit trail (:mod:`simral.audit`), which is access-controlled. Logs name technical things:
AE titles, addresses, job ids, protocol statuses, exception types.

:class:`PhiGuard`, installed on the root handler, backs the rule up:

- a record's ``extra`` attributes are dropped unless allow-listed (:data:`ALLOWED_EXTRA`), so a
  dataset, a patient row or a demographics dict passed as ``extra`` never reaches the output;
- in the formatted message and traceback, values of DICOM and HL7 patient attributes written as
  ``Keyword=value`` / ``Keyword: value`` (PatientName, PatientID, PatientBirthDate, OtherPatientIDs…),
  DICOM person names (``FAMILY^GIVEN``) and 13/15-digit NIR-like numbers are replaced by ``[…]``.

``log_format = "json"`` writes one JSON object per line with ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, ``worker`` (index of the ``simral serve`` worker process: 0 for the
parent, which serves too), ``pid`` and,
for an exception, ``exception`` (type and traceback, guarded the same way).
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime

#: ``extra`` attributes a record may carry to the output (none today: add technical ones only).
ALLOWED_EXTRA: frozenset[str] = frozenset()
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_PHI_KEYWORDS = (
    "PatientName|PatientID|PatientBirthDate|PatientBirthName|PatientMotherBirthName|PatientAddress"
    "|PatientTelephoneNumbers|OtherPatientIDs|OtherPatientNames|PatientBirthTime|IssuerOfPatientID"
    "|patient_name|patient_id|birth_date|birth_name|given_names?|family_name|nir|ins|ipp"
)
_KEYED = re.compile(rf"\b({_PHI_KEYWORDS})(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^\s,;)]+)", re.IGNORECASE)
#: DICOM PN (PS3.5 6.2): letters, then ``^`` and more letters (``DUPONT^JEAN``); HL7 message types
#: (``ADT^A28``: three capitals, a capital and digits) are not names.
_PERSON_NAME = re.compile(
    r"(?<![\w^])(?![A-Z]{3}\^[A-Z]\d{2}\b)[^\W\d_][^\s^=,;:()\[\]'\"]*\^[^\W\d_][^\s,;:()\[\]'\"]*"
)
_NIR = re.compile(r"(?<!\d)[12]\d{12}(?:\d{2})?(?!\d)")
REDACTED = "[…]"

#: The worker index of this process (``simral serve`` sets it in each worker: 0 in the parent).
_worker: int | None = 0


def set_worker(index: int | None) -> None:
    """Name the worker process in every later log line (``None``: no worker)."""
    global _worker
    _worker = index


def redact(text: str) -> str:
    """``text`` with patient-looking values replaced (see the module docstring)."""
    text = _KEYED.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _PERSON_NAME.sub(REDACTED, text)
    return _NIR.sub(REDACTED, text)


class PhiGuard(logging.Filter):
    """Drops non-allow-listed ``extra`` attributes and redacts the message (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in [n for n in vars(record) if n not in _STANDARD and n not in ALLOWED_EXTRA]:
            delattr(record, name)
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.worker = _worker
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "worker": getattr(record, "worker", _worker),
            "pid": record.process or os.getpid(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str, log_format: str = "text") -> None:
    """Set up the root logger: ``text`` or ``json`` lines on standard error, guarded."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(PhiGuard())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
