"""Queueing a route's jobs: one per model, at the study's priority when an admin set one, else the route's."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, select

from dicom_ai_node.store.models import Job, JobState, Priority, Study

_jobs = Job.__table__


def priority_of(connection: Connection, study_id: int, route_priority: str) -> Priority:
    study_priority = connection.execute(select(Study.priority).where(Study.id == study_id)).scalar()
    return Priority[route_priority.upper()] if study_priority is None else Priority(study_priority)


def queue_jobs(
    connection: Connection,
    *,
    series_id: int,
    route: str,
    models: tuple[str, ...],
    destinations: tuple[str, ...],
    notify: tuple[str, ...],
    priority: Priority,
    now: dt.datetime,
    inputs: dict[str, str] | None = None,
) -> None:
    for model in models:
        connection.execute(
            _jobs.insert().values(
                series_id=series_id,
                route=route,
                model=model,
                destinations=list(destinations),
                notify=list(notify) or None,
                inputs=inputs,
                state=JobState.QUEUED.value,
                priority=priority.value,
                attempts=0,
                created_at=now,
            )
        )


def urgency(priority: Priority) -> str:
    """" (stat)" after a message about jobs queued at another priority than routine."""
    return "" if priority is Priority.ROUTINE else f" ({priority.label})"
