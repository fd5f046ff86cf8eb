"""Engine and session factory: SQLite in WAL mode (embedded) or PostgreSQL through psycopg 3."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; synchronous=FULL makes every commit durable (fsync).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str, *, for_writes: bool = True) -> Engine:
    """Create the engine for ``url`` with the settings simral relies on.

    On SQLite a writing engine opens its transactions with ``BEGIN IMMEDIATE`` (the write lock is
    taken up front, so two writers never deadlock upgrading a shared lock); a reading engine uses
    plain deferred transactions, which WAL lets run beside a writer.
    """
    # The stored DICOM JSON headers are decoded on every query answer: orjson is several times faster.
    codecs = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **codecs)
        event.listen(engine, "connect", _sqlite_pragmas)

        @event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite's own implicit BEGIN must be off for the explicit BEGIN below.
            dbapi_connection.isolation_level = None

        begin = "BEGIN IMMEDIATE" if for_writes else "BEGIN"

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, **codecs)


def _sqlite_path(url: str) -> Path | None:
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


class WriterLock:
    """Queue SQLite writers of every thread and process on a lock that wakes them at once.

    SQLite admits one writer; a waiting connection otherwise polls through its busy handler, which
    sleeps with back-off up to 100 ms per retry. Threads queue on a lock, processes (``simral
    serve`` beside ``simral import``) on ``flock`` of ``<database>.writer``.
    """

    def __init__(self, database: Path | None) -> None:
        self._thread_lock = threading.RLock()
        self._path = database.with_name(database.name + ".writer") if database else None
        self._fd = -1
        self._depth = 0

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        self._depth += 1
        if self._depth == 1 and self._path is not None:
            try:
                if self._fd < 0:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._depth -= 1
                self._thread_lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


class Database:
    """An engine plus its session factory; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.read_engine = make_engine(url, for_writes=False) if url.startswith("sqlite") else self.engine
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            WriterLock(_sqlite_path(url)) if url.startswith("sqlite") else contextlib.nullcontext()
        )
        self.read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error (DESIGN.md §2)."""
        with self._write_lock, self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for queries only (takes no write lock on SQLite)."""
        with self.read_sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()
