"""What every adapter needs to call the services: settings, the database and the blob stores."""

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
    #: The default store: ingest writes there (named ``hot``).
    store: BlobStore
    #: Per-process caches of the services (e.g. the archive's hierarchy cache), by name.
    caches: dict[str, Any] = field(default_factory=dict)
    #: Every configured store by name, the default one included (storage tiers, the replica).
    stores: dict[str, BlobStore] = field(default_factory=dict)

    def store_named(self, name: str) -> BlobStore:
        """The store called ``name`` (``blob.store``); KeyError when it is not configured."""
        found = self.stores.get(name)
        if found is not None:
            return found
        if name == self.store.name:
            return self.store
        raise KeyError(f"blob store {name!r} is not configured")

    @property
    def replica(self) -> BlobStore | None:
        """The store every blob is copied to (``replica_store``), if any."""
        name = self.settings.replica_store
        return self.store_named(name) if name else None

    @property
    def single_store(self) -> bool:
        """Whether every blob is in the default store (no tier store besides it and the replica)."""
        return all(name in (self.store.name, self.settings.replica_store) for name in self.stores)
