"""What the atheris harnesses share: a real in-process simral site, the bug oracle, the runner.

Each harness module (``fuzz/fuzz_*.py``) defines ``setup() -> None`` and ``test_one_input(data)``.
``test_one_input`` returns normally when simral answered the input the way its protocol says
(stored, or refused with a protocol status) and raises :class:`Bug` (or lets an unexpected
exception through) otherwise. The same functions replay the corpora and the regression inputs in
``tests/test_fuzz_regressions.py``; ``python -m fuzz.fuzz_NAME [libFuzzer flags]`` fuzzes.

The oracle, besides exceptions escaping the entry point: no record at ERROR level or above from a
``simral`` logger (the safety nets that turn an unexpected exception into an "internal error"
answer log there), no exception in another thread (:func:`threading.excepthook`), no file
descriptor left open, no scratch file left behind. Hangs and memory are libFuzzer's ``-timeout``
and ``-rss_limit_mb``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simral.context import AppContext

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
REGRESSIONS_DIR = FUZZ_DIR / "regressions"
WORK_DIR = FUZZ_DIR / ".work"

#: Modules whose code atheris instruments for coverage (what parses or acts on the input).
INSTRUMENTED = [
    "simral",
    "pydicom",
    "pynetdicom",
    "hl7apy",
    "python_multipart",
    "zipfile",
    "email",
    "starlette.formparsers",
]

#: The site every harness runs against (ANS test identities only).
SITE = "CHX"
SITE_IPP_OID = "1.2.250.1.999.21.1"
GROUP = "TLRG"
RIS_APP, RIS_FACILITY = "StructureApp", "StructureFacility"
#: MSH-3/MSH-4 of the ADT and PDQ seeds (fuzz/make_seeds.py), registered HL7 sources of the site.
HL7_SOURCES = (("GAM_CHA", "CHA"), ("PDQ_CONS", "CHA"))
SCU_AE = "FUZZSCU"
STORER_LOGIN = "tech_x"


class Bug(AssertionError):
    """simral answered an input in a way its protocol does not allow (or not at all)."""


def fuzzing(module_name: str) -> bool:
    """Whether the harness module runs as the fuzzer (``python -m fuzz.fuzz_NAME``)."""
    return module_name == "__main__"


def instrumented(
    module_name: str, include: list[str] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Instrument the imports made in this block for coverage (``include``: module prefixes,
    :data:`INSTRUMENTED` by default), when fuzzing (``FUZZ_NO_COVERAGE`` set: not at all)."""
    if fuzzing(module_name):
        import atheris

        if os.environ.get("FUZZ_NO_COVERAGE"):
            return contextlib.nullcontext()
        _balance_trace_cmp(atheris)
        return atheris.instrument_imports(include=include or INSTRUMENTED)  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def _balance_trace_cmp(atheris: Any) -> None:
    """Work around a reference leak of atheris 3.0.0: its ``_trace_cmp``, which instrumented code
    calls for every comparison, returns the comparison's result with one reference too many.
    For a bool that is harmless; for anything else (SQLAlchemy's ``column == value`` is an SQL
    expression with its bind parameters) every comparison kept its result alive for ever: the
    HL7 harness grew ~3.5 KB an input (2 GB, libFuzzer's limit, before 600 000 inputs).
    The extra reference of a non-bool result is given back here; ``atheris.Fuzz`` puts the
    native function back, so :func:`main` checks again before each input."""
    if getattr(atheris._trace_cmp, "_simral_balanced", False):
        return
    import ctypes

    native = atheris._trace_cmp
    decref = ctypes.pythonapi.Py_DecRef
    decref.argtypes = [ctypes.py_object]
    decref.restype = None

    def trace_cmp(left: Any, right: Any, op: int, index: int, is_const: bool) -> Any:
        result = native(left, right, op, index, is_const)
        if result.__class__ is not bool:
            decref(result)
        return result

    trace_cmp._simral_balanced = True  # type: ignore[attr-defined]
    atheris._trace_cmp = trace_cmp


# --------------------------------------------------------------------------------- the oracle


_QUIET = ("pydicom", "pynetdicom", "hl7apy", "multipart", "python_multipart", "alembic")


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Oracle:
    """Collects what the entry point reported besides its answer."""

    errors: _ErrorRecords = field(default_factory=_ErrorRecords)
    thread_failures: list[str] = field(default_factory=list)
    #: Thread failures that are a library's own, known and harmless to simral (each says why):
    #: patterns of ``"thread name: ExceptionType: message"``, or predicates on the hook's arguments.
    tolerated: tuple[re.Pattern[str] | Callable[[threading.ExceptHookArgs], bool], ...] = ()
    _saved: Any = None

    def install(self) -> None:
        """Collect simral's errors and thread failures (and quieten the parsers' warnings)."""
        simral_log = logging.getLogger("simral")
        self._saved = (
            threading.excepthook,
            simral_log.level,
            simral_log.propagate,
            {name: logging.getLogger(name).level for name in _QUIET},
            list(warnings.filters),
        )
        simral_log.addHandler(self.errors)
        simral_log.setLevel(logging.WARNING)
        simral_log.propagate = False
        # Parsers log and warn about odd values while parsing: only simral's errors matter here.
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.simplefilter("ignore")

        def hook(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread is not None else "?"
            failure = f"{name}: {args.exc_type.__name__}: {args.exc_value}"
            for known in self.tolerated:
                if known(args) if callable(known) else known.search(failure):
                    return
            self.thread_failures.append(failure)

        threading.excepthook = hook

    def uninstall(self) -> None:
        """Put logging, warnings and the thread hook back as :meth:`install` found them."""
        if self._saved is None:
            return
        excepthook, level, propagate, levels, filters = self._saved
        simral_log = logging.getLogger("simral")
        simral_log.removeHandler(self.errors)
        simral_log.setLevel(level)
        simral_log.propagate = propagate
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)
        warnings.filters[:] = filters
        threading.excepthook = excepthook
        self._saved = None

    @contextlib.contextmanager
    def watching(self, *, scratch: Path | None = None) -> Iterator[None]:
        """Raise :class:`Bug` for errors logged, threads failed, descriptors or files leaked."""
        self.errors.records.clear()
        self.thread_failures.clear()
        fds = _open_fds()
        before = set(os.listdir(scratch)) if scratch is not None else set()
        yield
        if self.errors.records:
            record = self.errors.records[0]
            detail = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                detail += f" ({type(exc).__name__}: {exc})"
                raise Bug(f"error logged: {detail}") from exc
            raise Bug(f"error logged: {detail}")
        if self.thread_failures:
            raise Bug(f"exception in a thread: {self.thread_failures[0]}")
        leaked = _open_fds() - fds
        if leaked:
            raise Bug(f"file descriptors left open: {sorted(_fd_targets(leaked))}")
        if scratch is not None:
            left = set(os.listdir(scratch)) - before
            if left:
                raise Bug(f"scratch files left behind: {sorted(left)[:5]}")


#: Descriptors the database connection pool keeps open between inputs (SQLite and its WAL).
_POOLED = re.compile(r"\.sqlite(-wal|-shm|-journal)?$")


def _open_fds() -> set[int]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not _POOLED.search(os.readlink(f"/proc/self/fd/{fd}")):
                fds.add(int(fd))
    return fds


def _fd_targets(fds: set[int]) -> list[str]:
    targets = []
    for fd in fds:
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


# ---------------------------------------------------------------------------------- the site


def _base_folder() -> Path:
    """Where the site's data goes: tmpfs when there is one (fsync and SQLite commits are cheap)."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="simral-fuzz-", dir=parent))


@dataclass
class Site:
    """A simral site in this process: SQLite database, filesystem store, the test organisations,
    a registered RIS and DICOM node, and a technologist's bearer token."""

    ctx: AppContext
    base: Path
    token: str

    @property
    def scratch(self) -> Path:
        return Path(self.ctx.store.scratch_dir())

    def close(self) -> None:
        self.ctx.db.dispose()
        shutil.rmtree(self.base, ignore_errors=True)


def open_site(base: Path | None = None, *, scu_port: int = 104) -> Site:
    """Create and populate a fresh site (a second or so: migrations and a password hash);
    ``scu_port`` is where the registered DICOM node listens (Storage Commitment reports)."""
    from datetime import timedelta

    from simral.access.policy import SYSTEM
    from simral.app import open_app
    from simral.config import load_settings
    from simral.identity import service as identity
    from simral.nodes import service as nodes
    from simral.patients import service as patients
    from simral.reading import service as reading

    base = base or _base_folder()
    settings = load_settings(
        environ={
            "SIMRAL_DATA_DIR": str(base / "data"),
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_AE_TITLE": "SIMRAL",
        }
    )
    ctx = open_app(settings)
    with ctx.db.unit_of_work() as session:
        identity.create_organisation(
            session, code=SITE, name="CH X", finess="990000021", patient_id_oid=SITE_IPP_OID, principal=SYSTEM
        )
        identity.create_organisation(
            session, code=GROUP, name="Téléradiologie", kind="teleradiology-group", principal=SYSTEM
        )
        reading.add_ris_endpoint(
            session,
            name="RIS_CHX",
            site_code=SITE,
            host="127.0.0.1",
            port=9,
            application=RIS_APP,
            facility=RIS_FACILITY,
            principal=SYSTEM,
        )
        reading.add_contract(session, site_code=SITE, group_code=GROUP, modalities="CT\\MR", principal=SYSTEM)
        # The senders of the HL7 seeds' ADT feed and PDQ queries (unregistered senders are refused).
        for application, facility in HL7_SOURCES:
            patients.add_hl7_source(
                session, name=application, application=application, facility=facility, principal=SYSTEM
            )
        nodes.create(
            session,
            name="fuzz-scu",
            ae_title=SCU_AE,
            host="127.0.0.1",
            port=scu_port,
            organisation=SITE,
            principal=SYSTEM,
        )
        professional = identity.create_professional(
            session,
            login=STORER_LOGIN,
            organisation=SITE,
            role="technologist",
            national_id="810006000002",
            principal=SYSTEM,
        )
        token = identity.issue_token(
            session,
            professional=professional,
            organisation=SITE,
            lifetime=timedelta(days=30),
            principal=SYSTEM,
        )
    return Site(ctx, base, token)


class SiteHolder:
    """The harness's site, renewed every ``renew_every`` inputs so the database stays small."""

    def __init__(self, renew_every: int = 20000, *, scu_port: int = 104) -> None:
        self.renew_every = renew_every
        self.scu_port = scu_port
        self.site: Site | None = None
        self.count = 0
        self.on_open: list[Callable[[Site], None]] = []

    def get(self) -> Site:
        self.count += 1
        if self.site is not None and self.count % self.renew_every == 0:
            self.site.close()
            self.site = None
        if self.site is None:
            if self.count == 1:
                atexit.register(self.close)  # the replay tool and libFuzzer runs end by exiting
            self.site = open_site(scu_port=self.scu_port)
            for hook in self.on_open:
                hook(self.site)
        return self.site

    def close(self) -> None:
        if self.site is not None:
            self.site.close()
            self.site = None


# -------------------------------------------------------------------------------- the runner


def corpus_files(name: str) -> list[Path]:
    """The seed corpus of harness ``name`` (``fuzz/corpus/NAME``)."""
    folder = CORPUS_DIR / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def regression_files(name: str) -> list[Path]:
    """Inputs that once made harness ``name`` fail (``fuzz/regressions/NAME``)."""
    folder = REGRESSIONS_DIR / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def main(
    name: str, setup: Callable[[], None], test_one_input: Callable[[bytes], None], *, max_len: int
) -> None:
    """Run libFuzzer on ``test_one_input``: new inputs go to ``fuzz/.work/NAME/corpus`` (not kept
    in the repository), crashes to ``fuzz/.work/NAME/``; the seed and regression folders are read.

    Extra arguments are libFuzzer's (``-runs=N``, ``-max_total_time=S``...); folders given there
    are added as further seed corpora.
    """
    import atheris

    work = WORK_DIR / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    extra_dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    defaults = {
        "-max_len": str(max_len),
        "-timeout": "10",
        "-rss_limit_mb": "2048",
        "-artifact_prefix": f"{work}/",
        "-print_final_stats": "1",
    }
    given = {f.split("=", 1)[0] for f in flags}
    flags += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    seeds = [str(CORPUS_DIR / name), str(REGRESSIONS_DIR / name), *extra_dirs]
    seeds = [s for s in seeds if Path(s).is_dir()]
    setup()
    balance = not os.environ.get("FUZZ_NO_COVERAGE")

    def one_input(data: bytes) -> None:
        if balance:
            _balance_trace_cmp(atheris)  # once wrapped, a look at an attribute
        test_one_input(data)

    atheris.Setup([sys.argv[0], *flags, str(work / "corpus"), *seeds], one_input)
    atheris.Fuzz()
