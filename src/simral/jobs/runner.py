"""The job runner: a thread that claims due jobs and hands them to their kind's handler.

Handlers are registered by the process that runs them (adapters provide them: a DICOM C-STORE
sender, a STOW-RS client), so the jobs service does not depend on any protocol. A handler gets a
batch of claimed jobs of one kind and group and returns, for each job it did not finish, the error
(``None`` for success); raising fails the whole batch. :class:`PermanentFailure` dead-letters at
once (a destination that no longer exists, an instance that was deleted).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta

from simral.context import AppContext
from simral.jobs import service as jobs
from simral.jobs.service import ClaimedJob

log = logging.getLogger(__name__)

#: A handler's answer: per job id, ``None`` when done, else the error (a :class:`PermanentFailure`
#: dead-letters that job at once, any other text is retried).
Outcomes = Mapping[int, "str | PermanentFailure | None"]
Handler = Callable[[AppContext, list[ClaimedJob]], Outcomes]


class PermanentFailure(RuntimeError):
    """Retrying cannot help: the job is dead-lettered at once."""


class JobRunner:
    """Claims and runs jobs of the registered kinds until stopped."""

    def __init__(
        self,
        ctx: AppContext,
        handlers: Mapping[str, Handler],
        *,
        batch: int = 16,
        idle_wait: float = 0.5,
        lease: timedelta = jobs.DEFAULT_LEASE,
    ) -> None:
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.batch = batch
        self.idle_wait = idle_wait
        self.lease = lease
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current batch."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Look for due jobs now rather than after the idle wait."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:
                log.error("job runner: %s: %s", type(exc).__name__, exc)
                worked = False
            if not worked:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run one batch; whether there was one."""
        kinds = tuple(self.handlers)
        with self.ctx.db.reading() as session:
            if not jobs.due(session, kinds=kinds):
                return False
        with self.ctx.db.unit_of_work() as session:
            claimed = jobs.claim(session, worker=self.worker, kinds=kinds, batch=self.batch, lease=self.lease)
        if not claimed:
            return False
        handler = self.handlers[claimed[0].kind]
        permanent = False
        try:
            outcomes: Outcomes = handler(self.ctx, claimed)
        except PermanentFailure as exc:
            outcomes, permanent = {job.id: str(exc) or "permanent failure" for job in claimed}, True
        except Exception as exc:
            outcomes = {job.id: f"{type(exc).__name__}: {exc}" for job in claimed}
        with self.ctx.db.unit_of_work() as session:
            for job in claimed:
                error = outcomes.get(job.id, "handler gave no outcome")
                if error is None:
                    jobs.complete(session, job.id)
                else:
                    final = permanent or isinstance(error, PermanentFailure)
                    state = jobs.fail(session, job.id, str(error), permanent=final)
                    log.warning(
                        "job %d (%s) failed, try %d: %s -> %s", job.id, job.kind, job.attempts, error, state
                    )
        return True
