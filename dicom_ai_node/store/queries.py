"""Read-side queries for the admin CLI and the DICOMweb server.

Rows come back as plain dicts keyed by DICOM keywords where one exists
(`StudyInstanceUID`, `NumberOfStudyRelatedInstances`, ...) so `--json`
output reads like a QIDO-RS answer to anyone who knows DICOM.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    Row,
    Select,
    String,
    Subquery,
    cast,
    func,
    literal,
    null,
    select,
    union_all,
)

from dicom_ai_node.events import EventKind
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Event,
    Fetch,
    FetchState,
    Instance,
    Job,
    JobState,
    Notification,
    Priority,
    ResultObject,
    Series,
    SeriesState,
    Study,
    utcnow,
)

# States shown for a series and a study beyond the stored series states: how far the results of
# a routed series got (from its deliveries), and a study whose files were purged (its `purged` event).
PARTLY_DELIVERED = "partly delivered"
DELIVERED = "delivered"
PURGED = "purged"
_ROUTED = SeriesState.ROUTED.value
_UNFINISHED_JOBS = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)
_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_results = ResultObject.__table__


def series_state(stored: str, jobs: dict[str, int], deliveries: dict[str, int], purged: bool = False) -> str:
    """The state shown for a series: its stored state, or how far the results of a routed series got.

    `jobs` and `deliveries` count the series' jobs and their deliveries by state. `delivered` once every
    delivery is and no job is still to finish; `partly delivered` while only some are.
    """
    if purged:
        return PURGED
    delivered = deliveries.get(DeliveryState.DELIVERED.value, 0)
    if stored != _ROUTED or not delivered:
        return stored
    if delivered == sum(deliveries.values()) and not any(jobs.get(state) for state in _UNFINISHED_JOBS):
        return DELIVERED
    return PARTLY_DELIVERED


def study_state(series_states: list[str]) -> str:
    """The least advanced series decides; series not routed to a model count only when none was."""
    for waiting in (SeriesState.RECEIVING.value, SeriesState.COMPLETE.value):
        if waiting in series_states:
            return waiting
    routed = [state for state in series_states if state in (_ROUTED, PARTLY_DELIVERED, DELIVERED)]
    if routed:
        if all(state == DELIVERED for state in routed):
            return DELIVERED
        return _ROUTED if all(state == _ROUTED for state in routed) else PARTLY_DELIVERED
    for other in (SeriesState.NOT_ROUTED.value, PURGED):
        if other in series_states:
            return other
    return "empty"


def all_series(with_results: bool = True) -> Subquery:
    """Every series received and, `with_results`, those only the node produced (its SEG and SR in
    `result_objects`), as one selectable; a produced series has no id, number, description, state, arrival or
    performed procedure step (QIDO-RS reads what it needs of those from its file)."""
    counts = select(func.count()).where(_instances.c.series_id == _series.c.id).scalar_subquery()
    received = select(
        _series.c.id.label("series_id"),
        _series.c.series_instance_uid.label("series_uid"),
        _studies.c.study_instance_uid.label("study_uid"),
        _series.c.modality.label("modality"),
        _series.c.series_number.label("series_number"),
        _series.c.series_description.label("series_description"),
        _series.c.state.label("state"),
        _series.c.last_received_at.label("last_received_at"),
        counts.label("instances"),
        _series.c.performed_procedure_step_start_date.label("performed_procedure_step_start_date"),
        _series.c.performed_procedure_step_start_time.label("performed_procedure_step_start_time"),
        literal(False).label("produced"),
    ).join(_studies, _studies.c.id == _series.c.study_id)
    if not with_results:
        return received.subquery("received_series")
    produced = (
        select(
            cast(null(), Integer),
            _results.c.series_instance_uid,
            _results.c.study_instance_uid,
            func.max(_results.c.kind),
            cast(null(), Integer),
            cast(null(), String),
            cast(null(), String),
            cast(null(), DateTime),
            func.count(),
            cast(null(), String),
            cast(null(), String),
            literal(True),
        )
        .where(_results.c.series_instance_uid.not_in(select(_series.c.series_instance_uid)))
        .group_by(_results.c.series_instance_uid, _results.c.study_instance_uid)
    )
    return union_all(received, produced).subquery("all_series")


def study_attributes(study: Row[Any]) -> dict[str, Any]:
    """The attributes of a row of `studies` (or of a select joined to it) by DICOM keyword."""
    return {
        "StudyInstanceUID": study.study_instance_uid,
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "AccessionNumber": study.accession_number,
        "StudyDate": study.study_date,
        "StudyDescription": study.study_description,
    }


@dataclass(frozen=True)
class StudySummary:
    """One study with its series: what QIDO-RS answers for a study and `dicom-ai-node studies` lists."""

    study: Row[Any]  # of `studies`
    series: list[Row[Any]]  # of all_series()

    def attributes(self) -> dict[str, Any]:
        """The study's attributes, its modalities and how many series and instances it holds, by DICOM keyword."""
        return {
            **study_attributes(self.study),
            "ModalitiesInStudy": sorted({row.modality for row in self.series if row.modality}),
            "NumberOfStudyRelatedSeries": len(self.series),
            "NumberOfStudyRelatedInstances": sum(row.instances for row in self.series),
        }


def summarize_studies(connection: Connection, studies: Select, with_results: bool) -> list[StudySummary]:
    """The studies `studies` selects (rows of `studies`, in its order and page), each with its series.

    QIDO-RS counts the series the node produced too (`with_results`); `dicom-ai-node studies` counts
    only the series received, as senders and the benchmarks compare them with what they sent.
    """
    found = connection.execute(studies).all()
    every_series = all_series(with_results)
    page = studies.with_only_columns(_studies.c.study_instance_uid)  # a subquery: no limit on bind parameters
    by_study: dict[str, list[Row[Any]]] = {}
    for row in connection.execute(select(every_series).where(every_series.c.study_uid.in_(page))):
        by_study.setdefault(row.study_uid, []).append(row)
    return [StudySummary(study, by_study.get(study.study_instance_uid, [])) for study in found]


def all_instances() -> Subquery:
    """Every instance, received or produced by the node, as one selectable: QIDO-RS and WADO-RS serve both."""
    received = (
        select(
            _instances.c.sop_instance_uid.label("sop_uid"),
            _instances.c.sop_class_uid.label("sop_class_uid"),
            _instances.c.instance_number.label("instance_number"),
            _instances.c.rows.label("rows"),
            _instances.c.columns.label("columns"),
            _instances.c.number_of_frames.label("number_of_frames"),
            _instances.c.bits_allocated.label("bits_allocated"),
            _instances.c.file_path.label("file_path"),
            _series.c.series_instance_uid.label("series_uid"),
            _studies.c.study_instance_uid.label("study_uid"),
            _series.c.modality.label("modality"),
            _series.c.id.label("series_id"),
            _series.c.series_number.label("series_number"),
            _series.c.series_description.label("series_description"),
            _series.c.performed_procedure_step_start_date.label("performed_procedure_step_start_date"),
            _series.c.performed_procedure_step_start_time.label("performed_procedure_step_start_time"),
            literal(False).label("produced"),
        )
        .join(_series, _series.c.id == _instances.c.series_id)
        .join(_studies, _studies.c.id == _series.c.study_id)
    )
    produced = select(
        _results.c.sop_instance_uid,
        _results.c.sop_class_uid,
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
        _results.c.file_path,
        _results.c.series_instance_uid,
        _results.c.study_instance_uid,
        _results.c.kind,
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), String),
        cast(null(), String),
        cast(null(), String),
        literal(True),
    ).where(_results.c.sop_instance_uid.not_in(select(_instances.c.sop_instance_uid)))
    return union_all(received, produced).subquery("all_instances")


def _results_by_series(connection, series_ids) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]]]:
    """(jobs, deliveries) of the series `series_ids` selects, counted by state per series id."""
    jobs: dict[int, dict[str, int]] = {}
    deliveries: dict[int, dict[str, int]] = {}
    for series_id, state, count in connection.execute(
        select(Job.series_id, Job.state, func.count()).where(Job.series_id.in_(series_ids))
        .group_by(Job.series_id, Job.state)
    ):
        jobs.setdefault(series_id, {})[state] = count
    for series_id, state, count in connection.execute(
        select(Job.series_id, Delivery.state, func.count()).join(Job, Job.id == Delivery.job_id)
        .where(Job.series_id.in_(series_ids)).group_by(Job.series_id, Delivery.state)
    ):
        deliveries.setdefault(series_id, {})[state] = count
    return jobs, deliveries


def _purged_studies(connection, study_instance_uids) -> set[str]:
    """The studies among these (UIDs, or a select of them) that were purged: their rows stay, purge records an event."""
    return set(connection.execute(
        select(Event.study_instance_uid).distinct()
        .where(Event.study_instance_uid.in_(study_instance_uids), Event.kind == EventKind.PURGED.value)
    ).scalars())


def find_study_uids(engine: Engine, prefix: str, limit: int = 10) -> list[str]:
    """[the Study Instance UID `prefix`] if there is such a study, else up to `limit` that start with it.

    Events count as well as studies: a study refused before anything of it was stored has only those.
    """
    prefix = prefix.strip()
    with engine.connect() as connection:
        for column in (Study.study_instance_uid, Event.study_instance_uid):
            if connection.execute(select(column).where(column == prefix).limit(1)).first() is not None:
                return [prefix]
            found = list(connection.execute(
                select(column).distinct().where(column.startswith(prefix, autoescape=True))
                .order_by(column).limit(limit)
            ).scalars())
            if found:
                return found
    return []


def iso_utc(value: dt.datetime | None) -> str | None:
    """A stored UTC time as ISO 8601 with milliseconds and "Z", as the CLI and webhooks show it."""
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def list_studies(engine: Engine, limit: int = 200) -> list[dict[str, Any]]:
    newest = select(_studies).order_by(Study.created_at.desc(), Study.id.desc()).limit(limit)
    page = newest.with_only_columns(Study.id)  # as a subquery: no limit on bind parameters
    with engine.connect() as connection:
        summaries = summarize_studies(connection, newest, with_results=False)
        jobs, deliveries = _results_by_series(connection, select(Series.id).where(Series.study_id.in_(page)))
        purged = _purged_studies(connection, select(Study.study_instance_uid).where(Study.id.in_(page)))
    result = []
    for summary in summaries:
        was_purged = summary.study.study_instance_uid in purged
        states = [
            series_state(row.state, jobs.get(row.series_id, {}), deliveries.get(row.series_id, {}),
                         was_purged and not row.instances)
            for row in summary.series
        ]
        result.append(
            {
                **summary.attributes(),
                "state": study_state(states),
                "received_at": iso_utc(summary.study.created_at),
                "last_received_at": iso_utc(max((row.last_received_at for row in summary.series), default=None)),
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
        jobs, deliveries = _results_by_series(connection, select(Series.id).where(Series.study_id == study_id))
        purged = bool(_purged_studies(connection, [study_instance_uid]))
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
            "state": series_state(row.state, jobs.get(row.id, {}), deliveries.get(row.id, {}), purged and not row.n),
            "state_reason": row.state_reason,
            "reprocess_requested": row.reprocess_requested,
            "late_instances": row.late_instances,
            "duplicates_received": row.duplicates_received,
            "bytes": int(row.size),
            "calling_ae_title": row.calling_ae,
            "first_received_at": iso_utc(row.first_received_at),
            "last_received_at": iso_utc(row.last_received_at),
            "completed_at": iso_utc(row.completed_at),
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
            "at": iso_utc(event.at),
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
                "first_received_at": iso_utc(oldest.first_received_at),
                "waiting_seconds": round((now - oldest.first_received_at).total_seconds()),
            }
            if oldest
            else None
        ),
        "failures_last_24h": failures,
        "jobs": job_counts(engine),
        "jobs_by_priority": job_waits(engine),
        "deliveries": delivery_counts(engine),
        "notifications": notification_counts(engine),
        "fetches": fetch_counts(engine),
    }


def _job_row(row) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "priority": Priority(row.priority).label,
        "model": row.model,
        "route": row.route,
        "StudyInstanceUID": row.study_instance_uid,
        "SeriesInstanceUID": row.series_instance_uid,
        "inputs": row.inputs,  # a study route's job: role -> SeriesInstanceUID
        "Modality": row.modality,
        "attempts": row.attempts,
        "device": row.device,
        "model_version": row.model_version,
        "findings": row.findings,
        "summary": row.summary,
        "error": row.error,
        "created_at": iso_utc(row.created_at),
        "started_at": iso_utc(row.started_at),
        "finished_at": iso_utc(row.finished_at),
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


def job_waits(engine: Engine) -> dict[str, dict[str, Any]]:
    """Per priority, most urgent first: how many jobs are queued and the longest any has waited; how many first
    runs started in the last hour and how long they had waited, on average, from queued to running."""
    now = utcnow()
    with engine.connect() as connection:
        queued = {
            row.priority: row
            for row in connection.execute(
                select(Job.priority, func.count().label("count"), func.min(Job.created_at).label("oldest"))
                .where(Job.state == JobState.QUEUED.value)
                .group_by(Job.priority)
            )
        }
        started = connection.execute(
            select(Job.priority, Job.created_at, Job.started_at)
            .where(Job.started_at >= now - dt.timedelta(hours=1), Job.attempts == 1)
        ).all()
    report = {}
    for priority in sorted(Priority, reverse=True):
        waits = [(row.started_at - row.created_at).total_seconds() for row in started if row.priority == priority]
        waiting = queued.get(priority.value)
        report[priority.label] = {
            "queued": waiting.count if waiting else 0,
            "oldest_queued_seconds": round((now - waiting.oldest).total_seconds()) if waiting else None,
            "started_last_hour": len(waits),
            "mean_wait_seconds_last_hour": round(sum(waits) / len(waits), 1) if waits else None,
        }
    return report


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
            "created_at": iso_utc(row.created_at),
            "last_attempt_at": iso_utc(row.last_attempt_at),
            "next_attempt_at": iso_utc(row.next_attempt_at) if row.state in ("pending", "failed") else None,
            "delivered_at": iso_utc(row.delivered_at),
            "failing_since": iso_utc(row.failing_since),  # the give-up window (delivery.give_up_after_hours) starts here
        }
        for row in rows
    ]


def list_fetches(engine: Engine, limit: int = 200) -> list[dict[str, Any]]:
    """Studies asked for with `fetch`, newest first."""
    with engine.connect() as connection:
        rows = connection.execute(select(Fetch.__table__).order_by(Fetch.id.desc()).limit(limit)).all()
    return [
        {
            "id": row.id,
            "state": row.state,
            "peer": row.peer,
            "StudyInstanceUID": row.study_instance_uid,
            "AccessionNumber": row.accession_number,
            "StudyDate": row.study_date,
            "ModalitiesInStudy": row.modalities,
            "NumberOfStudyRelatedInstances": row.expected_instances,
            "asked": row.asked,
            "attempts": row.attempts,
            "completed": row.completed,
            "failed": row.failed,
            "error": row.error,
            "requested_at": iso_utc(row.requested_at),
            "started_at": iso_utc(row.started_at),
            "finished_at": iso_utc(row.finished_at),
        }
        for row in rows
    ]


def fetch_counts(engine: Engine) -> dict[str, int]:
    return _counts_by_state(engine, Fetch.state, FetchState)


def _counts_by_state(engine: Engine, state: Any, states: Any) -> dict[str, int]:
    """How many rows are in each of `states` (an enum of the values the `state` column takes), zeros included."""
    with engine.connect() as connection:
        counts = dict(connection.execute(select(state, func.count()).group_by(state)).all())
    return {member.value: counts.get(member.value, 0) for member in states}


def list_notifications(engine: Engine, limit: int = 200) -> list[dict[str, Any]]:
    """Webhook calls, newest first."""
    query = (
        select(Notification.__table__, Study.study_instance_uid)
        .join(Job, Job.id == Notification.job_id)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .order_by(Notification.id.desc())
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        {
            "id": row.id,
            "state": row.state,
            "webhook": row.webhook,
            "event": row.event,
            "job_id": row.job_id,
            "delivery_id": row.delivery_id,
            "StudyInstanceUID": row.study_instance_uid,
            "attempts": row.attempts,
            "last_error": row.last_error,
            "created_at": iso_utc(row.created_at),
            "next_attempt_at": iso_utc(row.next_attempt_at) if row.state in ("pending", "failed") else None,
            "sent_at": iso_utc(row.sent_at),
        }
        for row in rows
    ]


def notification_counts(engine: Engine) -> dict[str, int]:
    return _counts_by_state(engine, Notification.state, DeliveryState)


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
