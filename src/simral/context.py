"""What every adapter needs to call the services: settings, the database and the blob store."""

from __future__ import annotations

from dataclasses import dataclass

from simral.config import Settings
from simral.db.engine import Database
from simral.storage.base import BlobStore


@dataclass
class AppContext:
    """The process-wide resources, built once by :func:`simral.app.open_app`."""

    settings: Settings
    db: Database
    store: BlobStore
