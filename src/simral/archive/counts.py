"""The denormalised counts of the index, recomputed after instances are rejected or deleted.

NumberOfStudyRelatedInstances, NumberOfSeriesRelatedInstances, ModalitiesInStudy,
SOPClassesInStudy and the patient-level numbers (PS3.4 C.6.1.1.2-5, C.6.2.1.2) count only the
instances a query can return: those not rejected by an IOCM rejection note (IHE RAD-66). Ingest
keeps them by increments (:func:`simral.archive.service._bump_counts`); this recounts one study.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.orm import Session

from simral.archive.models import Instance, Patient, Series, Study
from simral.db.base import utcnow
from simral.lifecycle.models import RejectedInstance


def not_rejected() -> ColumnElement[bool]:
    """The predicate every read path applies to ``instance``: not rejected by an IOCM note."""
    return ~exists().where(RejectedInstance.instance_pk == Instance.id)


def recount_study(session: Session, study_pk: int) -> None:
    """Recompute the counts and lists of a study, of its series and of its patient."""
    visible = (
        select(Instance.series_pk, func.count().label("n"))
        .where(not_rejected())
        .group_by(Instance.series_pk)
        .subquery()
    )
    per_series: dict[int, int] = {
        pk: n
        for pk, n in session.execute(
            select(Series.id, func.coalesce(visible.c.n, 0))
            .outerjoin(visible, visible.c.series_pk == Series.id)
            .where(Series.study_pk == study_pk)
        )
    }
    for series_pk, count in per_series.items():
        session.execute(update(Series).where(Series.id == series_pk).values(num_instances=count))
    modalities = sorted(
        {
            m
            for m in session.scalars(
                select(Series.modality).where(Series.study_pk == study_pk, Series.num_instances > 0)
            )
            if m
        }
    )
    sop_classes = sorted(
        set(
            session.scalars(
                select(Instance.sop_class_uid)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.study_pk == study_pk, not_rejected())
            )
        )
    )
    session.execute(
        update(Study)
        .where(Study.id == study_pk)
        .values(
            num_instances=sum(per_series.values()),
            num_series=len([n for n in per_series.values() if n]),
            modalities="\\".join(modalities)[:256],
            sop_classes="\\".join(sop_classes)[:2048],
            updated_at=utcnow(),
        )
    )
    patient_pk = session.scalar(select(Study.patient_pk).where(Study.id == study_pk))
    if patient_pk is not None:
        recount_patient(session, patient_pk)


def recount_patient(session: Session, patient_pk: int) -> None:
    """Recompute a patient's NumberOfPatientRelated… from its studies' counts."""
    studies, series, instances = session.execute(
        select(
            func.count().filter(Study.num_instances > 0),
            func.coalesce(func.sum(Study.num_series), 0),
            func.coalesce(func.sum(Study.num_instances), 0),
        ).where(Study.patient_pk == patient_pk)
    ).one()
    session.execute(
        update(Patient)
        .where(Patient.id == patient_pk)
        .values(num_studies=studies, num_series=series, num_instances=instances)
    )
