"""Filesystem blob store with atomic, durable writes (DESIGN.md §3 step 3).

A write goes to a temporary file in the target folder (or a scratch folder on the same
filesystem), is fsync'ed, renamed into place, and the folder is fsync'ed, so after a crash a key
is either absent or complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from simral.storage.base import CHUNK, StoredBlob, sha256_of_file

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore:
    """Blobs as files under ``root``; keys are relative paths with ``/`` separators."""

    def __init__(self, root: Path, *, name: str = "fs") -> None:
        self.name = name
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._scratch = self.root / ".scratch"
        self._scratch.mkdir(exist_ok=True)
        self._known_dirs: set[Path] = set()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or not key:
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        # Make the new directory entries themselves durable.
        for created in reversed(missing):
            _fsync_dir(created.parent)
        self._known_dirs.add(folder)

    def scratch_dir(self) -> Path:
        return self._scratch

    def put_file(self, key: str, source: Path, *, move: bool = False) -> StoredBlob:
        target = self._path(key)
        self._ensure_dir(target.parent)
        if move:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sha, size = sha256_of_file(source)
            os.replace(source, target)
            _fsync_dir(target.parent)
            return StoredBlob(key=key, size=size, sha256=sha)
        with open(source, "rb") as fh:
            return self.put_stream(key, fh)

    def adopt(self, key: str, staged: Path) -> None:
        """Rename an already durable, hashed staged file into place.

        No fsync of the target folder: the rename is atomic, and until it is durable the staged
        name survives a power loss, where start-up recovery publishes it again
        (:mod:`simral.storage.staging`).
        """
        target = self._path(key)
        self._ensure_dir(target.parent)
        os.replace(staged, target)

    def put_stream(self, key: str, stream: BinaryIO) -> StoredBlob:
        target = self._path(key)
        self._ensure_dir(target.parent)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(target.parent)
        return StoredBlob(key=key, size=size, sha256=digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def iter_keys(self) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if filename.startswith(TMP_PREFIX):
                    continue
                yield Path(dirpath, filename).relative_to(self.root).as_posix()

    def leftover_temporaries(self) -> Iterator[Path]:
        """Temporary files a crash left behind (never visible as blobs)."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for filename in filenames:
                if filename.startswith(TMP_PREFIX) or Path(dirpath) == self._scratch:
                    yield Path(dirpath, filename)
