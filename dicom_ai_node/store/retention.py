"""Purge: free disk from studies the node has finished with, and only those.

A study qualifies when it is older than the cut-off, nothing of it is still
receiving, waiting, queued or running, every finished job's results reached at
least one destination, and no delivery of it is still pending, failing or dead.
Rows in the audit tables (studies, series, jobs, deliveries, events) are kept.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, delete, exists, func, select

from dicom_ai_node.events import EventKind
from dicom_ai_node.store.files import path_component
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    SeriesState,
    Study,
    StudyRoute,
    StudyRouteState,
    utcnow,
)


@dataclass(frozen=True)
class Purged:
    study_instance_uid: str
    instances: int
    results: int
    bytes: int


def _eligible(connection, study_id: int) -> bool:
    series_ids = select(Series.id).where(Series.study_id == study_id)
    busy_series = connection.execute(
        select(exists().where(Series.study_id == study_id,
                              Series.state.in_((SeriesState.RECEIVING.value, SeriesState.COMPLETE.value))))
    ).scalar()
    busy_study_routes = connection.execute(  # still collecting its roles, or waiting for one
        select(exists().where(StudyRoute.study_id == study_id, StudyRoute.state.in_(
            (StudyRouteState.COLLECTING.value, StudyRouteState.WAITING.value))))
    ).scalar()
    busy_jobs = connection.execute(
        select(exists().where(Job.series_id.in_(series_ids),
                              Job.state.in_((JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value))))
    ).scalar()
    undelivered = connection.execute(
        select(exists().where(Delivery.job_id == Job.id, Job.series_id.in_(series_ids),
                              Delivery.state != DeliveryState.DELIVERED.value))
    ).scalar()
    never_sent = connection.execute(
        select(exists().where(
            Job.series_id.in_(series_ids),
            Job.state == JobState.DONE.value,
            ~exists().where(Delivery.job_id == Job.id, Delivery.state == DeliveryState.DELIVERED.value),
        ))
    ).scalar()
    return not (busy_series or busy_study_routes or busy_jobs or undelivered or never_sent)


def purge_older_than(engine: Engine, storage_root: Path, days: float, dry_run: bool = False) -> list[Purged]:
    cutoff = utcnow() - dt.timedelta(days=days)
    purged = []
    with engine.begin() as connection:
        studies = connection.execute(
            select(Study.id, Study.study_instance_uid).where(Study.created_at < cutoff)
        ).all()
        for study in studies:
            if not _eligible(connection, study.id):
                continue
            series_ids = select(Series.id).where(Series.study_id == study.id)
            job_ids = select(Job.id).where(Job.series_id.in_(series_ids))
            instances, instance_bytes = connection.execute(
                select(func.count(Instance.id), func.coalesce(func.sum(Instance.file_size), 0))
                .where(Instance.series_id.in_(series_ids))
            ).one()
            results, result_bytes = connection.execute(
                select(func.count(ResultObject.id), func.coalesce(func.sum(ResultObject.file_size), 0))
                .where(ResultObject.job_id.in_(job_ids))
            ).one()
            if not instances and not results:
                continue
            record = Purged(study.study_instance_uid, instances, results, int(instance_bytes + result_bytes))
            purged.append(record)
            if dry_run:
                continue
            connection.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
            connection.execute(delete(ResultObject).where(ResultObject.job_id.in_(job_ids)))
            insert_event(
                connection,
                EventKind.PURGED,
                f"purged {instances} instance(s) and {results} result object(s), {record.bytes / 1e6:.1f} MB: "
                f"older than {days:g} day(s) and fully delivered",
                study_instance_uid=study.study_instance_uid,
            )
    if not dry_run:  # files go only after their rows are gone: a crash leaves files, never dangling rows
        for record in purged:
            shutil.rmtree(storage_root / path_component(record.study_instance_uid), ignore_errors=True)
    return purged
