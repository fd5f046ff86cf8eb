#!/usr/bin/env python3
"""Index scale benchmark: QIDO-RS and C-FIND latency on a synthetic 1 M-instance index on PostgreSQL.

Not a test: there are no thresholds. A throw-away PostgreSQL 15 gets simral's schema (its own Alembic
migrations), then a synthetic index loaded with COPY (patients, studies over ten years, series,
instances with their DICOM JSON headers, blobs, and the organisation and patient-identity rows the
query path joins on), ``VACUUM ANALYZE``; ``simral serve`` runs on that database and the benchmark
times study-level QIDO-RS queries by PatientID and by StudyDate range over HTTP, and C-FIND by
PatientID over DIMSE (PS3.18 §10.6, PS3.4 C.6.2). The issue's target: p95 < 50 ms.
Results go to ``bench/results/index-scale-<timestamp>.json``, the PostgreSQL plans of one query of
each kind (auto_explain, EXPLAIN ANALYZE of exactly what simral ran) next to it. See bench/README.md.

Run with the project's virtualenv: ``.venv/bin/python bench/index_scale_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import cProfile
import datetime as dt
import io
import json
import logging
import math
import os
import pstats
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
import pydicom  # noqa: E402
import pynetdicom  # noqa: E402
from bench.common import busy_jiffies, cpu_seconds, log, machine_info, own_cpu_seconds, write_results  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from tests.corpus import ct_series, small_instances  # noqa: E402
from tests.peers import HOST, PostgresServer  # noqa: E402
from tests.simral_proc import SIMRAL, TEST_ORGANISATION, TEST_USER, SimralProcess  # noqa: E402

from simral.app import open_app  # noqa: E402
from simral.archive.service import _patient_module  # noqa: E402
from simral.config import load_settings  # noqa: E402
from simral.db.migrate import upgrade  # noqa: E402
from simral.dicom.header import read_header  # noqa: E402
from simral.dicomweb import qido as qido_service  # noqa: E402
from simral.identity import service as identity_service  # noqa: E402
from simral.patients.service import Traits, authority_for_organisation, normalise_traits  # noqa: E402

SITE_AE = "SITEWS"  # a workstation node of the organisation that holds the synthetic archive
REGIONAL_AE = "REGIONPACS"  # an archive-wide node (simral nodes add --archive-wide)
MAX_PDU = 131072
SLOW_MS = 50  # log_min_duration_statement during the timed queries: statements slower than the target
FIRST_DAY = dt.date(2016, 1, 1)
DAYS = (dt.date(2026, 1, 1) - FIRST_DAY).days  # ten years of study dates
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Sizes:
    instances: int
    patient_queries: int
    date_queries: int
    warmups: int = 20


FULL = Sizes(instances=1_000_000, patient_queries=500, date_queries=500)
QUICK = Sizes(instances=50_000, patient_queries=100, date_queries=100)


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Modality:
    """How studies of one modality look: SOP class, header template, series and instance counts."""

    code: str
    share: float  # of the studies
    sop_class: str
    template: str  # which generated header the instances are made from
    series: tuple[int, int]  # inclusive range of series per study
    instance_weight: float  # log-mean weight of instances per series (CT high, radiographs ~1)
    descriptions: tuple[str, ...]


MODALITIES: tuple[Modality, ...] = (
    Modality("CT", 0.22, "1.2.840.10008.5.1.4.1.1.2", "CT", (2, 6), 4.0,
             ("SCANNER THORACO-ABDOMINO-PELVIEN", "SCANNER CEREBRAL", "ANGIOSCANNER THORACIQUE")),
    Modality("MR", 0.12, "1.2.840.10008.5.1.4.1.1.4", "MR", (3, 6), 3.0,
             ("IRM CEREBRALE", "IRM GENOU DROIT", "IRM RACHIS LOMBAIRE", "IRM PELVIENNE")),
    Modality("CR", 0.22, "1.2.840.10008.5.1.4.1.1.1", "CR", (1, 3), 0.0,
             ("RADIOGRAPHIE THORAX", "RADIOGRAPHIE BASSIN", "RADIOGRAPHIE GENOU")),
    Modality("DX", 0.12, "1.2.840.10008.5.1.4.1.1.1.1", "CR", (1, 3), 0.0,
             ("RADIOGRAPHIE THORAX", "RADIOGRAPHIE RACHIS", "RADIOGRAPHIE MAIN")),
    Modality("US", 0.14, "1.2.840.10008.5.1.4.1.1.6.1", "OT", (1, 2), 1.5,
             ("ECHOGRAPHIE ABDOMINALE", "ECHOGRAPHIE THYROIDIENNE", "ECHO-DOPPLER VEINEUX")),
    Modality("MG", 0.08, "1.2.840.10008.5.1.4.1.1.1.2", "CR", (1, 4), 0.0,
             ("MAMMOGRAPHIE BILATERALE", "MAMMOGRAPHIE DE DEPISTAGE")),
    Modality("OT", 0.10, "1.2.840.10008.5.1.4.1.1.7", "OT", (1, 1), 0.0,
             ("CAPTURE SECONDAIRE", "DOCUMENT NUMERISE")),
)  # fmt: skip
#: A tenth of the studies also carry a secondary-capture series (a dose report, a screenshot).
EXTRA_SC_SHARE = 0.10
SC = len(MODALITIES) - 1

FAMILY_NAMES = (
    "MARTIN", "BERNARD", "THOMAS", "PETIT", "ROBERT", "RICHARD", "DURAND", "DUBOIS", "MOREAU", "LAURENT",
    "SIMON", "MICHEL", "LEFEBVRE", "LEROY", "ROUX", "DAVID", "BERTRAND", "MOREL", "FOURNIER", "GIRARD",
    "BONNET", "DUPONT", "LAMBERT", "FONTAINE", "ROUSSEAU", "VINCENT", "MULLER", "LEFEVRE", "FAURE", "ANDRE",
    "MERCIER", "BLANC", "GUERIN", "BOYER", "GARNIER", "CHEVALIER", "FRANCOIS", "LEGRAND", "GAUTHIER",
    "GARCIA",
)  # fmt: skip
GIVEN_NAMES = (
    "MARIE", "JEAN", "PIERRE", "MICHEL", "ANNE", "PHILIPPE", "NATHALIE", "ALAIN", "ISABELLE", "NICOLAS",
    "CATHERINE", "PATRICK", "SYLVIE", "CHRISTOPHE", "MONIQUE", "FRANCOIS", "SOPHIE", "LAURENT", "CHANTAL",
    "JULIEN", "CAMILLE", "LEA", "LUCAS", "EMMA", "HUGO", "CHLOE", "LOUIS", "MANON", "GABRIEL", "INES",
)  # fmt: skip
REFERRERS = tuple(f"DR {name}^{given}" for name, given in zip(FAMILY_NAMES[::2], GIVEN_NAMES, strict=False))


@dataclass
class SyntheticIndex:
    """The synthetic archive as arrays: studies in date order (as they were ingested), their series
    and the number of instances of each series."""

    patient_ids: list[str]
    patient_family: np.ndarray
    patient_given: np.ndarray
    patient_birth: list[str]
    patient_sex: list[str]
    study_patient: np.ndarray
    study_day: np.ndarray  # days since FIRST_DAY
    study_seconds: np.ndarray  # time of day
    study_modality: np.ndarray
    study_first_series: np.ndarray
    study_series: np.ndarray
    series_study: np.ndarray
    series_modality: np.ndarray
    series_instances: np.ndarray
    series_first_instance: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def counts(self) -> dict[str, int]:
        return {
            "patients": len(self.patient_ids),
            "studies": len(self.study_patient),
            "series": len(self.series_study),
            "instances": int(self.series_instances.sum()),
        }

    def date(self, study: int) -> str:
        return (FIRST_DAY + dt.timedelta(days=int(self.study_day[study]))).strftime("%Y%m%d")


def synthesise(instances: int, seed: int) -> SyntheticIndex:
    """Draw the archive: ~instances/50 patients, ~instances/10 studies over ten years (weekdays four
    times as busy), 1–6 series per study by modality, instances per series skewed (log-normal
    weights: CT and MR series long, radiographs one or two images)."""
    rng = np.random.default_rng(seed)
    n_patients, n_studies = max(1, instances // 50), max(1, instances // 10)
    # Patients: a few have many studies (follow-up), most one to three.
    weights = rng.lognormal(0.0, 1.2, n_patients)
    study_patient = np.concatenate(
        [np.arange(n_patients), rng.choice(n_patients, n_studies - n_patients, p=weights / weights.sum())]
    )
    days = rng.integers(0, DAYS, n_studies * 2)
    weekday = np.array([(FIRST_DAY + dt.timedelta(days=int(d))).weekday() < 5 for d in range(DAYS)])
    keep = weekday[days] | (rng.random(len(days)) < 0.25)
    study_day = days[keep][:n_studies]
    study_seconds = rng.integers(7 * 3600, 20 * 3600, n_studies)
    shares = np.array([m.share for m in MODALITIES])
    study_modality = rng.choice(len(MODALITIES), n_studies, p=shares / shares.sum())
    order = np.lexsort((study_seconds, study_day))  # ingest order: chronological
    study_patient, study_day = study_patient[order], study_day[order]
    study_seconds, study_modality = study_seconds[order], study_modality[order]
    # Series per study, plus the occasional secondary capture (never more than 6).
    low = np.array([m.series[0] for m in MODALITIES])[study_modality]
    high = np.array([m.series[1] for m in MODALITIES])[study_modality]
    study_series = rng.integers(low, high + 1)
    extra = (rng.random(n_studies) < EXTRA_SC_SHARE) & (study_series < 6) & (study_modality != SC)
    study_series = study_series + extra
    series_study = np.repeat(np.arange(n_studies), study_series)
    study_first_series = np.concatenate([[0], np.cumsum(study_series)[:-1]])
    series_modality = study_modality[series_study].copy()
    last_of_study = study_first_series + study_series - 1
    series_modality[last_of_study[extra]] = SC
    n_series = len(series_study)
    if n_series > instances:
        raise ValueError(f"{instances} instances are too few for {n_series} series")
    mu = np.array([m.instance_weight for m in MODALITIES])[series_modality]
    weights = rng.lognormal(mu, 1.0)
    series_instances = 1 + rng.multinomial(instances - n_series, weights / weights.sum())
    return SyntheticIndex(
        patient_ids=[f"{(i * 7919 + 1000003) % 900_000_000 + 100_000_000}" for i in range(n_patients)],
        patient_family=rng.integers(0, len(FAMILY_NAMES), n_patients),
        patient_given=rng.integers(0, len(GIVEN_NAMES), n_patients),
        patient_birth=[
            (dt.date(1930, 1, 1) + dt.timedelta(days=int(d))).strftime("%Y%m%d")
            for d in rng.integers(0, 33000, n_patients)
        ],
        patient_sex=["MF"[int(s)] for s in rng.integers(0, 2, n_patients)],
        study_patient=study_patient,
        study_day=study_day,
        study_seconds=study_seconds,
        study_modality=study_modality,
        study_first_series=study_first_series,
        study_series=study_series,
        series_study=series_study,
        series_modality=series_modality,
        series_instances=series_instances,
        series_first_instance=np.concatenate([[0], np.cumsum(series_instances)[:-1]]),
    )


# --------------------------------------------------------------------------------------------- headers

#: Header attributes that vary per patient, study, series or instance, with their placeholder.
_VARYING: dict[str, str] = {
    "00080018": "sop",
    "0020000D": "study",
    "0020000E": "series",
    "00200052": "frame",
    "00080012": "date",
    "00080020": "date",
    "00080021": "date",
    "00080022": "date",
    "00080023": "date",
    "00080013": "stime",
    "00080030": "time",
    "00080031": "stime",
    "00080032": "stime",
    "00080033": "stime",
    "00080050": "accession",
    "00080060": "modality",
    "00080016": "sop_class",
    "00081030": "description",
    "0008103E": "series_description",
    "00100020": "pid",
    "00100030": "birth",
    "00100040": "sex",
    "00200010": "study_id",
}
_NUMBERS = {"00200011": "series_number", "00200013": "number"}
_NAMES = {"00100010": "name", "00080090": "referrer"}


def _placeholder_json(model: dict[str, Any]) -> str:
    """``model`` as a ``str.format`` template in PostgreSQL COPY text format."""
    model = json.loads(json.dumps(model))
    for tag, key in _VARYING.items():
        if tag in model:
            model[tag]["Value"] = [f"@{key}@"]
    for tag, key in _NUMBERS.items():
        if tag in model:
            model[tag]["Value"] = [f"@{key}@"]
    for tag, key in _NAMES.items():
        if tag in model:
            model[tag]["Value"] = [{"Alphabetic": f"@{key}@"}]
    text = json.dumps(model, separators=(", ", ": ")).replace("\\", "\\\\")  # COPY text escaping
    text = text.replace("{", "{{").replace("}", "}}")
    for key in _NUMBERS.values():
        text = text.replace(f'"@{key}@"', "{" + key + "}")
    for key in (*_VARYING.values(), *_NAMES.values()):
        text = text.replace(f"@{key}@", "{" + key + "}")
    return text


@dataclass(frozen=True)
class Templates:
    """Per template kind: the instance header (DICOM JSON, COPY-escaped format string), and the
    patient module of it (what ``patient.meta`` holds), exactly as ingest builds them."""

    instance: dict[str, str]
    patient: str
    rows: dict[str, int]
    columns: dict[str, int]


def build_templates(work: Path) -> Templates:
    """Headers generated by tests/corpus.py, converted by simral's own ingest code."""
    ct = ct_series(work / "ct", slices=1, rows=512, cols=512)[0]
    ot, mr, cr = small_instances(work / "small", count=3, per_series=1, studies=3, rows=256, cols=256)
    instance, rows, columns = {}, {}, {}
    patient = ""
    for kind, path in (("CT", ct), ("OT", ot), ("MR", mr), ("CR", cr)):
        header = read_header(path)
        model = header.json_model()
        instance[kind] = _placeholder_json(model)
        rows[kind], columns[kind] = int(header.dataset.Rows), int(header.dataset.Columns)
        patient = _placeholder_json(_patient_module(model))
    shutil.rmtree(work / "ct", ignore_errors=True)
    shutil.rmtree(work / "small", ignore_errors=True)
    return Templates(instance, patient, rows, columns)


# --------------------------------------------------------------------------------------------- loading

INDEX_TABLES = (
    "person",
    "patient_identity",
    "patient",
    "study",
    "series",
    "instance",
    "blob",
    "study_organisation",
    "study_identity",
)


def _uid(rng: random.Random) -> str:
    """A UUID-derived UID (PS3.5 B.2), 2.25 followed by up to 39 digits."""
    return f"2.25.{rng.getrandbits(128)}"


def _tm(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _timestamp(day: int, seconds: int) -> str:
    date = FIRST_DAY + dt.timedelta(days=day)
    return f"{date.isoformat()} {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}+00"


class _Writer:
    """Buffers COPY text rows and hands them to psycopg in ~1 MB chunks."""

    def __init__(self, copy: Any) -> None:
        self.copy = copy
        self.parts: list[str] = []
        self.size = 0

    def row(self, *values: object) -> None:
        line = "\t".join("\\N" if v is None else str(v) for v in values) + "\n"
        self.parts.append(line)
        self.size += len(line)
        if self.size > 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.copy.write("".join(self.parts))
            self.parts, self.size = [], 0


@contextlib.contextmanager
def _copy(conn: psycopg.Connection[Any], table: str, columns: Sequence[str]) -> Iterator[_Writer]:
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        writer = _Writer(copy)
        yield writer
        writer.flush()


def _secondary_schema(conn: psycopg.Connection[Any]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The unique and foreign-key constraints and the plain indexes of the index tables (not their
    primary keys), as the migrations made them: dropped before the load, recreated after."""
    tables = list(INDEX_TABLES)
    # A unique constraint another table's foreign key depends on (none today) stays in place.
    constraints = [
        (str(table), str(name), str(definition))
        for table, name, definition in conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "WHERE c.conrelid::regclass::text = ANY(%s) AND c.contype IN ('u', 'f') AND NOT EXISTS ("
            "  SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND c.contype = 'u' "
            "  AND f.conindid = c.conindid AND NOT f.conrelid::regclass::text = ANY(%s)) "
            "ORDER BY c.contype DESC, c.conname",  # unique ones first when recreating
            (tables, tables),
        )
    ]
    indexes = [
        str(definition)
        for (definition,) in conn.execute(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indrelid::regclass::text = ANY(%s) AND NOT i.indisprimary "
            "AND i.indexrelid NOT IN (SELECT conindid FROM pg_constraint WHERE contype IN ('u', 'p', 'x')) "
            "ORDER BY 1",
            (tables,),
        )
    ]
    return constraints, indexes


def _index_definitions(conn: psycopg.Connection[Any]) -> list[str]:
    return sorted(
        str(row[0])
        for row in conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid::regclass::text = ANY(%s)",
            (list(INDEX_TABLES),),
        )
    )


def load_index(
    dsn: str, index: SyntheticIndex, templates: Templates, *, organisation: str, authority_id: int, seed: int
) -> dict[str, float]:
    """COPY the synthetic index into the migrated database; recreate the constraints; VACUUM ANALYZE.

    Rows are what ingest writes (simral.archive.service._index, simral.patients.service.link_study):
    study and series ``meta`` are the header of their first instance, ``patient.meta`` its patient
    module, one identity per patient in the organisation's authority, one ``study_identity`` and
    one ``study_organisation`` (produced) per study. The audit trail and the change feed are not
    filled (nothing on the query path reads them).
    """
    rng = random.Random(seed)
    timings: dict[str, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in INDEX_TABLES:
            if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone() != (False,):
                raise RuntimeError(f"table {table} is not empty before the load")
        before = _index_definitions(conn)
        constraints, indexes = _secondary_schema(conn)
        for table, name, _ in reversed(constraints):
            conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        for definition in indexes:
            conn.execute(f"DROP INDEX {definition.split(' ON ')[0].split()[-1]}")

        t0 = time.perf_counter()
        with conn.transaction():
            _copy_rows(conn, index, templates, organisation=organisation, authority_id=authority_id, rng=rng)
        timings["copy_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for definition in indexes:
            conn.execute(definition)
        for table, name, definition in constraints:
            conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        for table in INDEX_TABLES:
            if table != "study_identity":  # the others' ids come from sequences: continue after ours
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}")
        timings["indexes_s"] = time.perf_counter() - t0
        if _index_definitions(conn) != before:
            raise RuntimeError("the recreated indexes differ from the migrated schema")

        t0 = time.perf_counter()
        conn.execute(f"VACUUM (ANALYZE) {', '.join(INDEX_TABLES)}")
        timings["vacuum_analyze_s"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in timings.items()}


def _copy_rows(
    conn: psycopg.Connection[Any],
    index: SyntheticIndex,
    templates: Templates,
    *,
    organisation: str,
    authority_id: int,
    rng: random.Random,
) -> None:
    n_patients = len(index.patient_ids)
    n_studies = len(index.study_patient)
    names = [
        f"{FAMILY_NAMES[int(f)]}^{GIVEN_NAMES[int(g)]}"
        for f, g in zip(index.patient_family, index.patient_given, strict=True)
    ]
    # A patient's row is created with their first study.
    first_study = np.full(n_patients, -1, dtype=np.int64)
    seen = np.zeros(n_patients, dtype=bool)
    for s, p in enumerate(index.study_patient):
        if not seen[p]:
            seen[p], first_study[p] = True, s
    patient_pk = np.empty(n_patients, dtype=np.int64)  # patient index -> row id (creation order)
    patient_pk[np.argsort(first_study, kind="stable")] = np.arange(1, n_patients + 1)

    def stamp(study: int) -> str:
        return _timestamp(int(index.study_day[study]), int(index.study_seconds[study]))

    study_instances = np.add.reduceat(index.series_instances, index.study_first_series)
    patient_studies = np.bincount(index.study_patient, minlength=n_patients)
    patient_series = np.bincount(index.study_patient, weights=index.study_series, minlength=n_patients)
    patient_instances = np.bincount(index.study_patient, weights=study_instances, minlength=n_patients)

    log(f"COPY {n_patients} persons, identities and patients")
    by_creation = np.argsort(first_study, kind="stable")
    with _copy(conn, "person", ("id", "created_at", "updated_at")) as w:
        for p in by_creation:
            created = stamp(int(first_study[p]))
            w.row(patient_pk[p], created, created)
    identity_columns = (
        "id", "authority_id", "local_id", "person_id", "birth_name", "birth_given_names",
        "first_birth_given_name", "sex", "birth_date", "birth_place_code", "used_name", "used_given_name",
        "ins_matricule", "ins_oid", "status", "status_at", "status_source", "attributes", "merged_into_id",
        "active", "created_at", "updated_at",
    )  # fmt: skip
    with _copy(conn, "patient_identity", identity_columns) as w:
        for p in by_creation:
            family, given = names[p].split("^")
            traits = normalise_traits(
                Traits(
                    sex=index.patient_sex[p],
                    birth_date=index.patient_birth[p],
                    used_name=family,
                    used_given_name=given,
                )
            )
            created = stamp(int(first_study[p]))
            w.row(
                patient_pk[p], authority_id, index.patient_ids[p], patient_pk[p], traits.birth_name,
                traits.birth_given_names, traits.first_birth_given_name, traits.sex, traits.birth_date,
                traits.birth_place_code, traits.used_name, traits.used_given_name, "", "", "PROV", created,
                f"dicom:{organisation}", "", None, "t", created, created,
            )  # fmt: skip
    patient_columns = (
        "id", "patient_id", "issuer", "name", "name_upper", "birth_date", "sex", "meta", "num_studies",
        "num_series", "num_instances", "created_at", "updated_at",
    )  # fmt: skip
    with _copy(conn, "patient", patient_columns) as w:
        for p in by_creation:
            meta = templates.patient.format(
                name=names[p],
                pid=index.patient_ids[p],
                birth=index.patient_birth[p],
                sex=index.patient_sex[p],
            )
            created = stamp(int(first_study[p]))
            w.row(
                patient_pk[p], index.patient_ids[p], "", names[p], names[p].upper(), index.patient_birth[p],
                index.patient_sex[p], meta, patient_studies[p], int(patient_series[p]),
                int(patient_instances[p]), created, created,
            )  # fmt: skip

    log(f"COPY {n_studies} studies with their organisation and identity links")
    study_uids = [_uid(rng) for _ in range(n_studies)]
    series_uids = [_uid(rng) for _ in range(len(index.series_study))]
    study_descriptions = [
        MODALITIES[int(m)].descriptions[s % len(MODALITIES[int(m)].descriptions)]
        for s, m in enumerate(index.study_modality)
    ]

    def header_values(study: int, series: int) -> dict[str, Any]:
        p = int(index.study_patient[study])
        modality = MODALITIES[int(index.series_modality[series])]
        number = series - int(index.study_first_series[study]) + 1
        stime = _tm(min(86399, int(index.study_seconds[study]) + 90 * number))
        return {
            "study": study_uids[study],
            "series": series_uids[series],
            "frame": series_uids[series] + ".1",
            "date": index.date(study),
            "time": _tm(int(index.study_seconds[study])),
            "stime": stime,
            "accession": f"A{(study * 104729 + 7) % 10**9:09d}",
            "modality": modality.code,
            "sop_class": modality.sop_class,
            "description": study_descriptions[study],
            "series_description": f"{modality.code} SERIE {number}",
            "series_number": number,
            "pid": index.patient_ids[p],
            "name": names[p],
            "birth": index.patient_birth[p],
            "sex": index.patient_sex[p],
            "referrer": REFERRERS[study % len(REFERRERS)],
            "study_id": str(1 + study % 99999),
        }

    # The first instance's header of each series (series.meta; the study's first one: study.meta).
    first_sops = [_uid(rng) for _ in range(len(index.series_study))]

    def first_header(series: int) -> str:
        study = int(index.series_study[series])
        template = templates.instance[MODALITIES[int(index.series_modality[series])].template]
        return template.format(**header_values(study, series), sop=first_sops[series], number=1)

    study_columns = (
        "id", "patient_pk", "study_uid", "study_date", "study_time", "accession_number", "study_id",
        "description", "referring_physician", "referring_physician_upper", "modalities", "sop_classes",
        "num_series", "num_instances", "meta", "created_at", "updated_at",
    )  # fmt: skip
    with _copy(conn, "study", study_columns) as w:
        for s in range(n_studies):
            first = int(index.study_first_series[s])
            members = {int(m) for m in index.series_modality[first : first + int(index.study_series[s])]}
            values = header_values(s, first)
            created = stamp(s)
            w.row(
                s + 1, patient_pk[index.study_patient[s]], study_uids[s], values["date"], values["time"],
                values["accession"], values["study_id"], values["description"], values["referrer"],
                values["referrer"].upper(),
                "\\\\".join(sorted(MODALITIES[m].code for m in members)),  # backslash, COPY-escaped
                "\\\\".join(sorted(MODALITIES[m].sop_class for m in members)),
                index.study_series[s], study_instances[s], first_header(first), created, created,
            )  # fmt: skip
    with _copy(
        conn, "study_organisation", ("id", "study_pk", "organisation_code", "relation", "created_at")
    ) as w:
        for s in range(n_studies):
            w.row(s + 1, s + 1, organisation, "produced", stamp(s))
    with _copy(conn, "study_identity", ("study_pk", "identity_id", "created_at")) as w:
        for s in range(n_studies):
            w.row(s + 1, patient_pk[index.study_patient[s]], stamp(s))

    log(f"COPY {len(index.series_study)} series")
    series_columns = (
        "id", "study_pk", "series_uid", "modality", "series_number", "description", "body_part",
        "series_date", "series_time", "num_instances", "meta", "created_at",
    )  # fmt: skip
    with _copy(conn, "series", series_columns) as w:
        for r in range(len(index.series_study)):
            s = int(index.series_study[r])
            values = header_values(s, r)
            body_part = "CHEST" if MODALITIES[int(index.series_modality[r])].template in ("CT", "CR") else ""
            w.row(
                r + 1, s + 1, series_uids[r], values["modality"], values["series_number"],
                values["series_description"], body_part, values["date"], values["stime"],
                index.series_instances[r], first_header(r), stamp(s),
            )  # fmt: skip

    total = int(index.series_instances.sum())
    log(f"COPY {total} instances (DICOM JSON headers) and their blobs")
    blobs: list[tuple[str, int]] = []  # (key, size) per instance, for the blob table
    instance_columns = (
        "id", "series_pk", "sop_uid", "sop_class_uid", "instance_number", "transfer_syntax_uid", "num_frames",
        "rows", "columns", "meta", "source", "created_at",
    )  # fmt: skip
    started = time.perf_counter()
    with _copy(conn, "instance", instance_columns) as w:
        pk = 0
        for r in range(len(index.series_study)):
            s = int(index.series_study[r])
            kind = MODALITIES[int(index.series_modality[r])].template
            template = templates.instance[kind]
            values = header_values(s, r)
            rows, columns = templates.rows[kind], templates.columns[kind]
            size = rows * columns * 2 + 1500
            created = stamp(s)
            prefix = f"{values['study']}/{values['series']}/"
            for k in range(int(index.series_instances[r])):
                pk += 1
                sop = first_sops[r] if k == 0 else _uid(rng)
                w.row(
                    pk, r + 1, sop, values["sop_class"], k + 1, EXPLICIT_VR_LE, None, rows, columns,
                    template.format(**values, sop=sop, number=k + 1), SITE_AE, created,
                )  # fmt: skip
                blobs.append((f"{prefix}{sop}.{rng.getrandbits(64):016x}.dcm", size))
            if r % 20000 == 0 and r:
                log(f"  {pk} instances ({pk / (time.perf_counter() - started):.0f}/s)")
    blob_columns = (
        "id", "instance_pk", "store", "key", "size", "sha256", "transfer_syntax_uid", "tier", "created_at",
        "verified_at",
    )  # fmt: skip
    with _copy(conn, "blob", blob_columns) as w:
        pk = 0
        for r in range(len(index.series_study)):
            created = stamp(int(index.series_study[r]))
            for _ in range(int(index.series_instances[r])):
                key, size = blobs[pk]
                pk += 1
                digest = key.rsplit(".", 2)[1] + f"{rng.getrandbits(192):048x}"
                w.row(pk, pk, "filesystem", key, size, digest, EXPLICIT_VR_LE, "hot", created, None)


# --------------------------------------------------------------------------------------------- queries


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


def summary(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "queries": len(ordered),
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(_percentile(ordered, 0.95), 2),
        "p99_ms": round(_percentile(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2),
    }


@dataclass(frozen=True)
class Query:
    """One study-level query and the number of matches the synthetic index says it must return."""

    kind: str  # patient, date-1day, date-1month
    params: tuple[tuple[str, str], ...]
    expected: int


def make_queries(
    index: SyntheticIndex, n_patients: int, n_dates: int, seed: int
) -> tuple[list[Query], list[Query]]:
    """Patient queries (random existing patients) and date-range queries (one day, one calendar
    month; ``limit=100``); the expected counts come from the synthetic index."""
    rng = random.Random(seed)
    per_patient = np.bincount(index.study_patient, minlength=len(index.patient_ids))
    patients = [
        Query("patient", (("PatientID", index.patient_ids[p]),), int(per_patient[p]))
        for p in rng.sample(range(len(index.patient_ids)), min(len(index.patient_ids), n_patients))
    ]
    per_day = np.bincount(index.study_day, minlength=DAYS)
    dates: list[Query] = []
    for i in range(n_dates):
        day = rng.randrange(DAYS)
        first = FIRST_DAY + dt.timedelta(days=day)
        if i % 2 == 0:
            low = high = first
            kind = "date-1day"
        else:
            low = first.replace(day=1)
            high = first.replace(day=calendar.monthrange(first.year, first.month)[1])
            kind = "date-1month"
        count = int(per_day[(low - FIRST_DAY).days : (high - FIRST_DAY).days + 1].sum())
        value = f"{low:%Y%m%d}-{high:%Y%m%d}"
        dates.append(Query(kind, (("StudyDate", value), ("limit", "100")), min(count, 100)))
    return patients, dates


class CpuMeter:
    """CPU seconds of simral's and PostgreSQL's process trees (``/proc``, 10 ms ticks), and of
    everything else on the machine, accumulated per label around the calls measured."""

    def __init__(self, simral_pid: int, postgres_pid: int) -> None:
        self.pids = {"simral": simral_pid, "postgres": postgres_pid}
        self.totals: dict[str, dict[str, float]] = {}

    def _now(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        out["busy"] = busy_jiffies() / os.sysconf("SC_CLK_TCK")
        out["own"] = own_cpu_seconds()
        out["wall"] = time.perf_counter()
        return out

    @contextlib.contextmanager
    def measure(self, label: str) -> Iterator[None]:
        before = self._now()
        yield
        after = self._now()
        delta = {k: after[k] - before[k] for k in after}
        delta["other"] = max(0.0, delta["busy"] - delta["own"] - delta["simral"] - delta["postgres"])
        total = self.totals.setdefault(
            label, {"simral": 0.0, "postgres": 0.0, "other": 0.0, "wall": 0.0, "count": 0.0}
        )
        for key in ("simral", "postgres", "other", "wall"):
            total[key] += delta[key]
        total["count"] += 1

    def per_call_ms(self, label: str) -> dict[str, float]:
        """Mean CPU ms per call of simral and PostgreSQL; mean CPUs busy with other work meanwhile."""
        total = self.totals[label]
        n = total["count"]
        return {
            "simral_cpu_ms": round(1000 * total["simral"] / n, 2),
            "postgres_cpu_ms": round(1000 * total["postgres"] / n, 2),
            "other_cpus_busy": round(total["other"] / total["wall"], 2) if total["wall"] else 0.0,
        }


def qido_latencies(client: httpx.Client, queries: Sequence[Query], cpu: CpuMeter) -> dict[str, list[float]]:
    """GET /studies for each query over one keep-alive connection, the JSON parsed inside the
    timing; every answer must be 200 with the expected number of matches."""
    out: dict[str, list[float]] = {}
    for query in queries:
        with cpu.measure(f"qido-{query.kind}"):
            t0 = time.perf_counter()
            response = client.get("/studies", params=query.params)
            matches = response.json() if response.status_code == 200 else None
            elapsed = (time.perf_counter() - t0) * 1000
        if matches is None or len(matches) != query.expected:
            got = len(matches) if matches is not None else f"HTTP {response.status_code}"
            raise RuntimeError(f"QIDO {query.params}: {got} matches, {query.expected} expected")
        out.setdefault(query.kind, []).append(elapsed)
    return out


def _study_identifier(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    for keyword in (
        "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
        "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ):  # fmt: skip
        setattr(ds, keyword, "")
    return ds


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cfind_latencies(
    port: int,
    calling_ae: str,
    called_ae: str,
    queries: Sequence[Query],
    warmups: Sequence[Query],
    cpu: CpuMeter | None = None,
) -> list[float]:
    """Study Root STUDY-level C-FIND by PatientID over one pynetdicom association (PS3.4 C.6.2)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(
        HOST, port, ae_title=called_ae, max_pdu=MAX_PDU, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association from {calling_ae} refused")
    latencies: list[float] = []
    try:
        for i, query in enumerate([*warmups, *queries]):
            identifier = _study_identifier(dict(query.params)["PatientID"])
            timed = i >= len(warmups)
            with cpu.measure(f"cfind-{calling_ae}") if cpu and timed else contextlib.nullcontext():
                t0 = time.perf_counter()
                responses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
                elapsed = (time.perf_counter() - t0) * 1000
            final = responses[-1][0] if responses else None
            if final is None or final.Status != 0x0000 or len(responses) - 1 != query.expected:
                raise RuntimeError(
                    f"C-FIND from {calling_ae}: status {final and final.Status}, "
                    f"{len(responses) - 1} matches, {query.expected} expected"
                )
            if timed:
                latencies.append(elapsed)
    finally:
        assoc.release()
    return latencies


def profile_query_service(database_url: str, data_dir: Path, queries: Sequence[Query], top: int = 25) -> str:
    """The same QIDO-RS searches through simral's query service in this process under cProfile (no
    HTTP, no audit record): the functions with the most cumulative time. Profiling slows Python
    down several times: where the time goes, not how long it takes."""
    ctx = open_app(
        load_settings(environ={"SIMRAL_DATABASE_URL": database_url, "SIMRAL_DATA_DIR": str(data_dir)}),
        migrate=False,
    )
    try:
        with ctx.db.reading() as session:
            professional = identity_service.get_professional(session, TEST_USER)
            assert professional is not None
            principal = identity_service.principal_for(session, professional, organisation=TEST_ORGANISATION)

        def search(query: Query) -> None:
            parsed = qido_service.parse("STUDY", list(query.params), {})
            with ctx.db.reading() as session:
                matches, _ = qido_service.search(
                    session, parsed, principal=principal, dicomweb_root="http://127.0.0.1/dicom-web"
                )
            if len(matches) != query.expected:
                raise RuntimeError(f"in-process {query.params}: {len(matches)} of {query.expected} matches")

        for query in queries[:5]:  # the connection pool and the caches
            search(query)
        profiler = cProfile.Profile()
        for query in queries:
            profiler.runcall(search, query)
    finally:
        ctx.db.engine.dispose()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# --------------------------------------------------------------------------------------------- plans


class PlanLog:
    """The PostgreSQL server log: statements over SLOW_MS, and auto_explain plans on demand."""

    def __init__(self, pg: PostgresServer) -> None:
        self.pg = pg
        self.path = pg.dir / "postgres.log"
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            return f.read()

    def explain_all(self, on: bool) -> None:
        """Log every statement with its EXPLAIN (ANALYZE, BUFFERS) plan (auto_explain), or stop."""
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET auto_explain.log_min_duration = {0 if on else -1}")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)  # backends re-read the configuration between statements


def slow_statements(text: str) -> list[str]:
    """The ``duration: N ms`` lines of the log (statements above log_min_duration_statement)."""
    return [line.strip() for line in text.splitlines() if "duration:" in line and "plan:" not in line]


# --------------------------------------------------------------------------------------------- driver


def database_sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        total = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        tables = {
            table: int(
                conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()[0]  # type: ignore[index]
            )
            for table in INDEX_TABLES
        }
    assert total is not None
    return {
        "database_mb": round(int(total[0]) / 2**20, 1),
        "tables_mb": {k: round(v / 2**20, 1) for k, v in tables.items()},
    }


def print_table(rows: Sequence[tuple[str, dict[str, float], dict[str, float] | None]]) -> None:
    header = (
        f"{'study-level query':<50} {'n':>4} {'median':>7} {'p95':>7} {'p99':>7} {'max':>7} {'<50':>4}"
        f" {'simral CPU':>10} {'PG CPU':>7} {'others':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, s, cpu in rows:
        line = (
            f"{name:<50} {s['queries']:>4} {s['median_ms']:>7.1f} {s['p95_ms']:>7.1f} {s['p99_ms']:>7.1f}"
            f" {s['max_ms']:>7.1f} {'yes' if s['p95_ms'] < 50 else 'NO':>4}"
        )
        if cpu:
            line += f" {cpu['simral_cpu_ms']:>10.1f} {cpu['postgres_cpu_ms']:>7.1f}"
            line += f" {cpu['other_cpus_busy']:>6.2f}"
        print(line)
    print(
        "latencies in ms, client side (request sent to answer parsed); target: p95 < 50 ms. "
        "CPU: ms per query of the simral and PostgreSQL process trees; others: CPUs busy with other "
        "work meanwhile (of "
        f"{os.cpu_count()})."
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.instances:
        sizes = Sizes(args.instances, sizes.patient_queries, sizes.date_queries)
    if args.queries:
        sizes = Sizes(sizes.instances, args.queries, args.queries)
    work = Path(tempfile.mkdtemp(prefix="simral-index-bench-"))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(os.getloadavg()),
        "versions": {"pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__},
        "sizes": sizes.__dict__,
        "seed": args.seed,
    }
    pg_settings = {
        "shared_buffers": "'1GB'",
        "effective_cache_size": "'8GB'",
        "maintenance_work_mem": "'1GB'",
        "max_wal_size": "'8GB'",
        "session_preload_libraries": "'auto_explain'",
        "auto_explain.log_min_duration": "-1",
        "auto_explain.log_analyze": "on",
        "auto_explain.log_buffers": "on",
        "auto_explain.log_format": "text",
        "log_min_duration_statement": str(SLOW_MS),
    }
    try:
        with PostgresServer(settings=pg_settings, keep_dir=args.keep) as pg:
            with psycopg.connect(pg.dsn()) as conn:
                report["versions"]["postgresql"] = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            engine = create_engine(pg.url)
            t0 = time.perf_counter()
            upgrade(engine)  # simral's own migrations
            report["migrate_s"] = round(time.perf_counter() - t0, 1)
            simral = SimralProcess(
                work / "simral", env={"SIMRAL_DATABASE_URL": pg.url, "SIMRAL_LOG_LEVEL": "WARNING"}
            )
            simral.ensure_directory()  # the organisation holding the archive and a technologist of it
            simral.add_node("site", SITE_AE, 104)
            simral.add_node("regional", REGIONAL_AE, 104, organisation="")
            token_headers = simral.auth_headers
            with Session(engine) as session, session.begin():
                authority = authority_for_organisation(session, TEST_ORGANISATION)
                assert authority is not None
                authority_id = authority.id
            engine.dispose()

            t0 = time.perf_counter()
            index = synthesise(sizes.instances, args.seed)
            templates = build_templates(work)
            report["synthesise_s"] = round(time.perf_counter() - t0, 1)
            report["index"] = index.counts
            log(f"synthetic index: {index.counts}")
            t0 = time.perf_counter()
            report["load"] = load_index(
                pg.dsn(),
                index,
                templates,
                organisation=TEST_ORGANISATION,
                authority_id=authority_id,
                seed=args.seed,
            )
            report["load"]["total_s"] = round(time.perf_counter() - t0, 1)
            report["size"] = database_sizes(pg.dsn())
            log(f"loaded in {report['load']}; {report['size']}")

            patients, dates = make_queries(index, sizes.patient_queries, sizes.date_queries, args.seed + 1)
            timed = [*patients, *dates]
            random.Random(args.seed + 2).shuffle(timed)  # interleaved: no kind gets a warmer cache
            # Untimed first: 20 QIDO queries (10 of each kind), 20 C-FINDs; keys not among the timed ones.
            warm_patients, warm_dates = make_queries(index, sizes.warmups, sizes.warmups // 2, args.seed + 3)
            qido_warmups = [*warm_patients[: sizes.warmups // 2], *warm_dates]
            plans = PlanLog(pg)
            simral.start(timeout=120)
            try:
                with httpx.Client(
                    base_url=simral.dicomweb_url, headers=token_headers, timeout=120, trust_env=False
                ) as client:
                    assert simral.proc is not None
                    postmaster = pg._postmaster_pid()
                    assert postmaster is not None
                    cpu = CpuMeter(simral.proc.pid, postmaster)
                    log(f"QIDO-RS: {len(timed)} study queries ({len(qido_warmups)} untimed first)")
                    for query in qido_warmups:
                        client.get("/studies", params=query.params).raise_for_status()
                    plans.mark()
                    qido = qido_latencies(client, timed, cpu)
                    qido_slow = slow_statements(plans.since_mark())
                    log("C-FIND by PatientID from the site's node and from an archive-wide node")
                    plans.mark()
                    cfind = {
                        name: cfind_latencies(
                            simral.dicom_port, ae, simral.ae_title, patients, warm_patients, cpu
                        )
                        for name, ae in (("site", SITE_AE), ("archive-wide", REGIONAL_AE))
                    }
                    cfind_slow = slow_statements(plans.since_mark())
                    # One query of each kind again, every statement logged with its plan.
                    explained: dict[str, str] = {}
                    plans.explain_all(True)
                    try:
                        for kind, query in (
                            ("qido-patient", patients[0]),
                            ("qido-date-1day", next(q for q in dates if q.kind == "date-1day")),
                            ("qido-date-1month", next(q for q in dates if q.kind == "date-1month")),
                        ):
                            plans.mark()
                            client.get("/studies", params=query.params).raise_for_status()
                            explained[kind] = plans.since_mark()
                        plans.mark()
                        cfind_latencies(simral.dicom_port, SITE_AE, simral.ae_title, patients[:1], [])
                        explained["cfind-site-patient"] = plans.since_mark()
                    finally:
                        plans.explain_all(False)
            except BaseException:
                log(f"simral log tail:\n{simral.log_tail()}")
                raise
            finally:
                simral.stop()
            log("60 of the QIDO-RS searches in-process, under cProfile")
            profile = profile_query_service(pg.url, work / "profile", timed[:60])  # shuffled: every kind
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    patients_label = f"PatientID=X ({report['index']['patients']} patients)"
    rows = [
        (f"QIDO-RS {patients_label}", summary(qido["patient"]), cpu.per_call_ms("qido-patient")),
        ("QIDO-RS StudyDate 1 day, limit=100", summary(qido["date-1day"]), cpu.per_call_ms("qido-date-1day")),
        (
            "QIDO-RS StudyDate 1 month, limit=100",
            summary(qido["date-1month"]),
            cpu.per_call_ms("qido-date-1month"),
        ),
        ("QIDO-RS StudyDate, both", summary(qido["date-1day"] + qido["date-1month"]), None),
        ("C-FIND PatientID, site node", summary(cfind["site"]), cpu.per_call_ms(f"cfind-{SITE_AE}")),
        (
            "C-FIND PatientID, archive-wide node",
            summary(cfind["archive-wide"]),
            cpu.per_call_ms(f"cfind-{REGIONAL_AE}"),
        ),
    ]
    report["latency"] = {name: {**s, **(c or {})} for name, s, c in rows}
    report["profile"] = profile
    report["slow_statements"] = {"qido": qido_slow[:50], "cfind": cfind_slow[:50]}
    report["plans"] = explained
    elapsed = time.perf_counter() - started
    report["elapsed_s"] = round(elapsed, 1)
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    counts = report["index"]
    print(
        f"\nsynthetic index: {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances; PostgreSQL "
        f"{report['versions']['postgresql']}, database {report['size']['database_mb'] / 1024:.2f} GiB"
    )
    load = report["load"]
    print(
        f"load: COPY {load['copy_s']} s, indexes and constraints {load['indexes_s']} s, "
        f"VACUUM ANALYZE {load['vacuum_analyze_s']} s (total {load['total_s']} s)"
    )
    print_table(rows)
    print(
        f"statements over {SLOW_MS} ms in the server log: {len(qido_slow)} during QIDO, "
        f"{len(cfind_slow)} during C-FIND"
    )
    print(f"run time {elapsed:.0f} s")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="50 000 instances, 100 queries of each kind")
    parser.add_argument("--instances", type=int, help="instances in the synthetic index (default 1 000 000)")
    parser.add_argument("--queries", type=int, help="patient and date queries each (default 500)")
    parser.add_argument("--seed", type=int, default=9, help="random seed of the synthetic index")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (database, simral logs)")
    parser.add_argument("--output", type=Path, help="JSON result file (default: bench/results/...)")
    args = parser.parse_args(argv)
    if not Path(SIMRAL).exists():
        parser.error(f"{SIMRAL} not found: run with the project's virtualenv (.venv/bin/python)")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    report = run(args)
    plans, profile = report.pop("plans"), report.pop("profile")
    out = write_results(report, args.output, "index-scale")
    plan_file = out.with_suffix(".plans.txt")
    plan_file.write_text("".join(f"===== {kind} =====\n{text}\n" for kind, text in plans.items()))
    print(f"PostgreSQL plans (auto_explain: every statement of one query of each kind) in {plan_file}")
    profile_file = out.with_suffix(".profile.txt")
    profile_file.write_text(profile)
    print(f"cProfile of the in-process query service in {profile_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
