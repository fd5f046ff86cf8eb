"""Two-phase blob writes that make ingest crash-safe without orphans (DESIGN.md §3).

1. ``stage``: the received file is fsync'ed under a name derived from its final key in the
   scratch folder, and the folder is fsync'ed (the intent is durable).
2. The caller commits the index.
3. ``publish``: the staged file is moved to its key in the store (rename + fsync of the folder on
   a filesystem, a verified PUT on S3).

After a crash, :meth:`Staging.recover` publishes the staged files whose key is indexed and deletes
the others, so the store never holds a blob the index does not know and every indexed blob
exists. Reads that race step 3 fall back to the staged copy (:meth:`Staging.open_staged`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from simral.storage.base import BlobStore

log = logging.getLogger(__name__)

PENDING_SUFFIX = ".pending"


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """The staging area of one blob store (its scratch folder)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.folder = store.scratch_dir()

    def staged_path(self, key: str) -> Path:
        """Where the staged copy of ``key`` lives (UIDs have no '+', so the mapping is reversible)."""
        return self.folder / (key.replace("/", "+") + PENDING_SUFFIX)

    @staticmethod
    def key_of(path: Path) -> str:
        return path.name[: -len(PENDING_SUFFIX)].replace("+", "/")

    def stage(self, source: Path, key: str, *, move: bool, sync_folder: bool = True) -> Path:
        """Make ``source`` durable as the staged copy of ``key``.

        ``sync_folder=False`` leaves the folder's fsync to :meth:`sync_folder`, called once for a
        batch before anything staged is indexed.
        """
        target = self.staged_path(key)
        if move and source.parent.resolve() == self.folder.resolve():
            _fsync_path(source)
            os.replace(source, target)
        else:
            tmp = target.with_suffix(".copying")
            with open(source, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        if sync_folder:
            self.sync_folder()
        return target

    def sync_folder(self) -> None:
        """Make the staging folder's entries (renames) durable."""
        _fsync_path(self.folder, directory=True)

    def discard(self, key: str) -> None:
        """Drop a staged copy whose index transaction did not commit."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.staged_path(key))

    def publish(self, key: str) -> None:
        """Move the staged copy of ``key`` into the store (a rename on a filesystem store)."""
        adopt = getattr(self.store, "adopt", None)
        if adopt is not None:
            adopt(key, self.staged_path(key))
        else:
            self.store.put_file(key, self.staged_path(key), move=True)

    def open_staged(self, key: str) -> BinaryIO | None:
        """The staged copy of ``key`` when it has not been published yet."""
        try:
            return open(self.staged_path(key), "rb")
        except FileNotFoundError:
            return None

    def pending(self) -> Iterator[Path]:
        for path in self.folder.iterdir():
            if path.name.endswith(PENDING_SUFFIX):
                yield path

    def recover(
        self,
        is_indexed: Callable[[str], bool],
        *,
        older_than: float = 0.0,
        publish_after: float | None = None,
    ) -> tuple[int, int]:
        """Publish indexed staged files, delete the rest; return (published, deleted).

        With ``older_than`` > 0 only files untouched for that many seconds are deleted (safe while
        ingests are running: a file being indexed is not indexed yet); with 0 every leftover
        temporary file is removed too (start-up). Indexed staged files are published once older than
        ``publish_after`` (default ``older_than``): publishing is always safe, so a store that was
        down gets its backlog soon after it is back. The first failed publication ends the pass (the
        store is still unreachable; the next pass tries again).
        """
        published = deleted = 0
        now = time.time()
        publish_age = older_than if publish_after is None else publish_after
        for path in list(self.folder.iterdir()):
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if path.name.endswith(PENDING_SUFFIX):
                if older_than and age < min(older_than, publish_age):
                    continue
                key = self.key_of(path)
                if is_indexed(key):
                    if older_than and age < publish_age:
                        continue
                    try:
                        self.publish(key)
                    except FileNotFoundError:
                        continue  # published meanwhile by the ingest that staged it
                    except Exception as exc:
                        log.error("could not publish a staged blob (will retry): %s", exc)
                        break
                    published += 1
                    continue
                if older_than and age < older_than:
                    continue
                path.unlink(missing_ok=True)
                deleted += 1
            elif not older_than:
                path.unlink(missing_ok=True)
                deleted += 1
        return published, deleted
