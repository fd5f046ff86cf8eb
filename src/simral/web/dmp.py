"""DMP publication as the sites see it (DESIGN.md §8): the wording of a document entry's state.

Every state a :class:`~simral.dmp.models.DmpDocument` can take (:data:`~simral.dmp.models.DMP_STATES`)
has its French and English wording here, used by the request page (``/requests/{id}``); a state
this module would not know is shown as it is rather than breaking the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from simral.dmp.service import DocumentStatus
from simral.web.layout import Language

try:
    LOCAL_TIME = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - systems without tzdata
    LOCAL_TIME = ZoneInfo("UTC")

#: The state of a document entry; ``{when}``: the publication (published) or the withdrawal date.
STATE_TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "pending": "en attente d'envoi",
        "waiting": "en attente",
        "published": "publié le {when}",
        "failed": "échec",
        "replaced": "remplacé par une version plus récente",
        "deleted": "retiré du DMP le {when} (suppression logique)",
        "masked": "masqué aux professionnels de santé le {when}",
    },
    "en": {
        "pending": "queued",
        "waiting": "waiting",
        "published": "published on {when}",
        "failed": "failed",
        "replaced": "replaced by a newer version",
        "deleted": "withdrawn from the DMP on {when} (logically deleted)",
        "masked": "masked to health professionals on {when}",
    },
}


def when(value: datetime | None, language: Language) -> str:
    """A timestamp in Paris time: DD/MM/YYYY HH:MM in French, YYYY-MM-DD HH:MM in English."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    local = value.astimezone(LOCAL_TIME)
    return local.strftime("%d/%m/%Y %H:%M" if language == "fr" else "%Y-%m-%d %H:%M")


def state_label(row: DocumentStatus, language: Language) -> str:
    """The entry's state in the reader's language (an unknown state as it is)."""
    wording = STATE_TEXT[language].get(row.state)
    if wording is None:
        return row.state
    moment = row.published_at if row.state == "published" else row.updated_at
    return wording.format(when=when(moment, language))
