"""What every adapter needs to call the services: settings, the database and the blob store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simral.config import Settings
from simral.db.engine import Database
from simral.storage.base import BlobStore


@dataclass
class AppContext:
    """The process-wide resources, built once by :func:`simral.app.open_app`."""

    settings: Settings
    db: Database
    store: BlobStore
    #: Per-process caches of the services (e.g. the archive's hierarchy cache), by name.
    caches: dict[str, Any] = field(default_factory=dict)
