"""The blob-store interface shared by every backend."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


class StoreUnavailable(OSError):
    """The store cannot be reached or answers with a server error (an outage, not a missing key).

    Callers answer a transient failure: C-STORE 0xA700 / C-GET sub-operation failure (PS3.4 B.2.3,
    C.4.3), HTTP 503 (PS3.18 8.6); nothing is acknowledged that is not durable.
    """


@dataclass(frozen=True)
class StoredBlob:
    """What a write produced: the key and the facts recorded in the index."""

    key: str
    size: int
    sha256: str


class BlobStore(Protocol):
    """A durable key → bytes store. Writes are atomic: a key is either absent or complete."""

    name: str

    def put_file(self, key: str, source: Path, *, move: bool = False) -> StoredBlob:
        """Store the content of ``source`` durably under ``key``; ``move`` lets the store take the file."""
        ...

    def put_stream(self, key: str, stream: BinaryIO) -> StoredBlob:
        """Store everything read from ``stream`` durably under ``key``."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the blob (caller closes it)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the blob when the store has one (for sendfile and zero-copy reads)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; absent keys are ignored."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the key is present."""
        ...

    def iter_keys(self) -> Iterator[str]:
        """Every key in the store (for consistency checks)."""
        ...

    def scratch_dir(self) -> Path:
        """A local directory for temporary files that :meth:`put_file` can take by ``move``."""
        ...


def sha256_of_stream(stream: BinaryIO) -> tuple[str, int]:
    """SHA-256 hex digest and size of everything left in ``stream``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_of_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file."""
    with open(path, "rb") as fh:
        return sha256_of_stream(fh)
