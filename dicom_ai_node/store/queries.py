"""Read-side queries for the admin CLI (and later the web API).

Rows come back as plain dicts keyed by DICOM keywords where one exists
(`StudyInstanceUID`, `NumberOfStudyRelatedInstances`, ...) so `--json`
output reads like a QIDO-RS answer to anyone who knows DICOM.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, func, select

from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    SeriesState,
    Study,
    utcnow,
)

# The least advanced series decides the state shown for a whole study.
_STATE_ORDER = [state.value for state in SeriesState]


def study_state(series_states: list[str]) -> str:
    known = [state for state in series_states if state in _STATE_ORDER]
    return min(known, key=_STATE_ORDER.index) if known else "empty"


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def list_studies(engine: Engine, limit: int = 200) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        series_rows = connection.execute(
            select(
                Series.study_id,
                Series.modality,
                Series.state,
                Series.last_received_at,
                select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery().label("n"),
            )
        ).all()
        studies = connection.execute(select(Study.__table__).order_by(Study.created_at.desc()).limit(limit)).all()
    by_study: dict[int, list] = {}
    for row in series_rows:
        by_study.setdefault(row.study_id, []).append(row)
    result = []
    for study in studies:
        rows = by_study.get(study.id, [])
        result.append(
            {
                "StudyInstanceUID": study.study_instance_uid,
                "PatientID": study.patient_id,
                "PatientName": study.patient_name,
                "AccessionNumber": study.accession_number,
                "StudyDate": study.study_date,
                "StudyDescription": study.study_description,
                "ModalitiesInStudy": sorted({row.modality for row in rows if row.modality}),
                "NumberOfStudyRelatedSeries": len(rows),
                "NumberOfStudyRelatedInstances": sum(row.n for row in rows),
                "state": study_state([row.state for row in rows]),
                "received_at": _iso(study.created_at),
                "last_received_at": _iso(max((row.last_received_at for row in rows), default=None)),
            }
        )
    return result


def list_series(engine: Engine, study_instance_uid: str) -> list[dict[str, Any]] | None:
    """The series of one study, or None if the study is unknown."""
    with engine.connect() as connection:
        study_id = connection.execute(
            select(Study.id).where(Study.study_instance_uid == study_instance_uid)
        ).scalar()
        if study_id is None:
            return None
        rows = connection.execute(
            select(
                Series.__table__,
                func.count(Instance.id).label("n"),
                func.coalesce(func.sum(Instance.file_size), 0).label("size"),
                func.min(Instance.calling_ae_title).label("calling_ae"),
            )
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .group_by(Series.id)
            .order_by(Series.series_number, Series.first_received_at)
        ).all()
    return [
        {
            "SeriesInstanceUID": row.series_instance_uid,
            "SeriesNumber": row.series_number,
            "Modality": row.modality,
            "BodyPartExamined": row.body_part_examined,
            "SeriesDescription": row.series_description,
            "NumberOfSeriesRelatedInstances": row.n,
            "state": row.state,
            "state_reason": row.state_reason,
            "reprocess_requested": row.reprocess_requested,
            "late_instances": row.late_instances,
            "duplicates_received": row.duplicates_received,
            "bytes": int(row.size),
            "calling_ae_title": row.calling_ae,
            "first_received_at": _iso(row.first_received_at),
            "last_received_at": _iso(row.last_received_at),
            "completed_at": _iso(row.completed_at),
        }
        for row in rows
    ]


def list_events(engine: Engine, study_instance_uid: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query = select(Event.__table__).order_by(Event.id.desc()).limit(limit)
    if study_instance_uid:
        query = query.where(Event.study_instance_uid == study_instance_uid)
    with engine.connect() as connection:
        events = connection.execute(query).all()
    return [
        {
            "at": _iso(event.at),
            "level": event.level,
            "kind": event.kind,
            "StudyInstanceUID": event.study_instance_uid,
            "SeriesInstanceUID": event.series_instance_uid,
            "SOPInstanceUID": event.sop_instance_uid,
            "calling_ae_title": event.calling_ae_title,
            "message": event.message,
        }
        for event in reversed(events)
    ]


def node_status(engine: Engine) -> dict[str, Any]:
    now = utcnow()
    with engine.connect() as connection:
        by_state = dict(connection.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        studies = connection.execute(select(func.count(Study.id))).scalar_one()
        instances, stored_bytes = connection.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.file_size), 0))
        ).one()
        oldest = connection.execute(
            select(Series.series_instance_uid, Series.first_received_at, Series.last_received_at)
            .where(Series.state == SeriesState.RECEIVING.value)
            .order_by(Series.first_received_at)
            .limit(1)
        ).first()
        failures = connection.execute(
            select(func.count(Event.id)).where(Event.level == "error", Event.at >= now - dt.timedelta(hours=24))
        ).scalar_one()
    return {
        "series_by_state": {state.value: by_state.get(state.value, 0) for state in SeriesState},
        "studies": studies,
        "instances": instances,
        "stored_bytes": int(stored_bytes),
        "oldest_waiting_series": (
            {
                "SeriesInstanceUID": oldest.series_instance_uid,
                "first_received_at": _iso(oldest.first_received_at),
                "waiting_seconds": round((now - oldest.first_received_at).total_seconds()),
            }
            if oldest
            else None
        ),
        "failures_last_24h": failures,
        "jobs": job_counts(engine),
        "deliveries": delivery_counts(engine),
    }


def _job_row(row) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "model": row.model,
        "route": row.route,
        "StudyInstanceUID": row.study_instance_uid,
        "SeriesInstanceUID": row.series_instance_uid,
        "Modality": row.modality,
        "attempts": row.attempts,
        "device": row.device,
        "model_version": row.model_version,
        "error": row.error,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "load_seconds": row.load_seconds,
        "inference_seconds": row.inference_seconds,
        "write_seconds": row.write_seconds,
    }


def _jobs_query():
    return (
        select(Job.__table__, Series.series_instance_uid, Series.modality, Study.study_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
    )


def list_jobs(engine: Engine, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    query = _jobs_query().order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    with engine.connect() as connection:
        return [_job_row(row) for row in connection.execute(query).all()]


def job_detail(engine: Engine, job_id: int) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(_jobs_query().where(Job.id == job_id)).first()
        if row is None:
            return None
        results = connection.execute(
            select(ResultObject.__table__).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
        ).all()
    detail = _job_row(row)
    detail["results"] = [
        {
            "kind": r.kind,
            "SOPClassUID": r.sop_class_uid,
            "SOPInstanceUID": r.sop_instance_uid,
            "SeriesInstanceUID": r.series_instance_uid,
            "file_path": r.file_path,
            "file_size": r.file_size,
        }
        for r in results
    ]
    return detail


def job_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        counts = dict(connection.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        oldest = connection.execute(
            select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value)
        ).scalar()
    report = {state.value: counts.get(state.value, 0) for state in JobState}
    report["oldest_queued_seconds"] = round((utcnow() - oldest).total_seconds()) if oldest else None
    return report


def list_deliveries(engine: Engine, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    query = (
        select(Delivery.__table__, Job.model, Series.series_instance_uid, Study.study_instance_uid)
        .join(Job, Job.id == Delivery.job_id)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        {
            "id": row.id,
            "state": row.state,
            "destination": row.destination,
            "job_id": row.job_id,
            "model": row.model,
            "StudyInstanceUID": row.study_instance_uid,
            "SeriesInstanceUID": row.series_instance_uid,
            "attempts": row.attempts,
            "last_error": row.last_error,
            "remote_status": row.remote_status,
            "created_at": _iso(row.created_at),
            "last_attempt_at": _iso(row.last_attempt_at),
            "next_attempt_at": _iso(row.next_attempt_at) if row.state in ("pending", "failed") else None,
            "delivered_at": _iso(row.delivered_at),
        }
        for row in rows
    ]


def delivery_counts(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        counts = dict(connection.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        oldest = connection.execute(
            select(func.min(Delivery.created_at)).where(
                Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.FAILED.value, DeliveryState.SENDING.value))
            )
        ).scalar()
    report: dict[str, Any] = {state.value: counts.get(state.value, 0) for state in DeliveryState}
    report["oldest_undelivered_seconds"] = round((utcnow() - oldest).total_seconds()) if oldest else None
    return report
