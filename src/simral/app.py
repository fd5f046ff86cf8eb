"""Opening the platform's resources: data folder, database (migrated), blob stores."""

from __future__ import annotations

import logging

from simral.config import Settings
from simral.context import AppContext
from simral.db.engine import Database
from simral.db.migrate import upgrade
from simral.storage.factory import DEFAULT_STORE, open_stores

log = logging.getLogger(__name__)


def open_app(settings: Settings, *, migrate: bool = True) -> AppContext:
    """Create the data folder, open and migrate the database, open the blob stores."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "tmp").mkdir(exist_ok=True)
    db = Database(settings.effective_database_url)
    if migrate:
        upgrade(db.engine)
    stores = open_stores(settings)
    return AppContext(settings=settings, db=db, store=stores[DEFAULT_STORE], stores=stores)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Application logs as text or JSON lines, never PHI (that goes to the audit trail): see
    :mod:`simral.observability.logs` for the rule and its guard."""
    from simral.observability.logs import configure

    configure(level, log_format)
    # pynetdicom logs identifiers and every PDU at INFO/DEBUG: keep only its warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns about non-conformant values while parsing; the ingest path reports what matters.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
