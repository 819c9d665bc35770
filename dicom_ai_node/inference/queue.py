"""The job queue in SQL: routing queues jobs (routing/router.py); every later change of a job's state is here.

Workers are separate processes (possibly on other hosts against PostgreSQL), so
a job is claimed with one conditional UPDATE: whoever flips it from `queued`
to `running` owns it.  A job whose results found no disk space goes back to
`queued` with the free space it needs; workers pass the free space they see
when they claim, so it is not taken (and its model not run) again before then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, func, or_, select, update

from dicom_ai_node.delivery.queue import create_for_job
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Instance, Job, JobState, Priority, ResultObject, Series, Study, utcnow
from dicom_ai_node.values import Found, StageTimes, StoredResult

_jobs = Job.__table__


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    model: str
    route: str
    series_instance_uid: str
    study_instance_uid: str
    series_number: int | None
    paths: list[Path]
    destinations: tuple[str, ...] | None  # decided at routing; None for jobs queued before they were stored
    # A study route's job: role -> the files of the series that fills it (the job's own series among them).
    inputs: dict[str, list[Path]] = field(default_factory=dict)


class JobQueue:
    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.storage_root = storage_root

    def requeue_interrupted(self) -> int:
        """Jobs left `running` by a node that stopped are queued again (results have derived UIDs)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_jobs)
                .where(_jobs.c.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, error="re-queued: the node stopped while it was running")
            ).rowcount

    def claim(self, worker: str, models: list[str], free_bytes: int | None = None) -> ClaimedJob | None:
        """Take the most urgent queued job, the oldest of those; one waiting for disk space only if `free_bytes` is
        enough for it.  So an urgent job waits at most for the jobs already running, however many are queued."""
        room = _jobs.c.needs_free_bytes.is_(None)
        if free_bytes is not None:
            room = or_(room, _jobs.c.needs_free_bytes <= free_bytes)
        next_job = (
            select(_jobs.c.id)
            .where(_jobs.c.state == JobState.QUEUED.value, _jobs.c.model.in_(models), room)
            .order_by(_jobs.c.priority.desc(), _jobs.c.id)
            .limit(1)
            .scalar_subquery()
        )
        with self.engine.begin() as connection:
            job_id = connection.execute(
                update(_jobs)
                .where(_jobs.c.id == next_job, _jobs.c.state == JobState.QUEUED.value)
                .values(
                    state=JobState.RUNNING.value,
                    worker=worker,
                    started_at=utcnow(),
                    finished_at=None,
                    attempts=_jobs.c.attempts + 1,
                    needs_free_bytes=None,
                )
                .returning(_jobs.c.id)
            ).scalar()
            if job_id is None:
                return None
            row = connection.execute(
                select(Job.model, Job.route, Job.destinations, Job.inputs, Series.id, Series.series_instance_uid,
                       Series.series_number, Study.study_instance_uid)
                .join(Series, Series.id == Job.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Job.id == job_id)
            ).one()
            inputs = {role: self._paths(connection, Series.series_instance_uid == uid)
                      for role, uid in (row.inputs or {}).items()}
            return ClaimedJob(
                id=job_id,
                model=row.model,
                route=row.route,
                series_instance_uid=row.series_instance_uid,
                study_instance_uid=row.study_instance_uid,
                series_number=row.series_number,
                paths=self._paths(connection, Series.id == row.id),
                destinations=None if row.destinations is None else tuple(row.destinations),
                inputs=inputs,
            )

    def _paths(self, connection, which_series) -> list[Path]:
        paths = connection.execute(
            select(Instance.file_path).join(Series, Series.id == Instance.series_id).where(which_series)
            .order_by(Instance.id)
        ).scalars()
        return [self.storage_root / path for path in paths]

    def finish(
        self,
        job: ClaimedJob,
        results: list[StoredResult],
        times: StageTimes,
        device: str,
        model_version: str,
        destinations: list[str],
        found: Found,
        left_out: Sequence[str] = (),
    ) -> None:
        """Record the results and what the model found, and queue their deliveries in the same transaction: none
        can be lost between.  A model that found nothing is done too ("no findings" in its event and job).
        `left_out` says what could not be made or kept, one `job-incomplete` warning each."""
        with self.engine.begin() as connection:
            for result in results:
                existing = connection.execute(
                    select(ResultObject.id).where(ResultObject.sop_instance_uid == result.sop_instance_uid)
                ).scalar()
                if existing is None:  # a re-run with the same inputs produces the same UIDs: keep one row
                    connection.execute(
                        ResultObject.__table__.insert().values(job_id=job.id, created_at=utcnow(), **vars(result))
                    )
            self._close(connection, job, JobState.DONE, None, times, device, model_version)
            connection.execute(
                update(_jobs).where(_jobs.c.id == job.id).values(findings=found.count, summary=found.summary)
            )
            create_for_job(connection, job.id, destinations)
            objects = ", ".join(f"{r.kind} {r.sop_instance_uid}" for r in results)
            insert_event(
                connection,
                EventKind.JOB_DONE,
                f"job {job.id} ({job.model}) done in {_total(times):.1f} s: {found.summary}; {objects}",
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
            )
            for reason in left_out:
                insert_event(
                    connection,
                    EventKind.JOB_INCOMPLETE,
                    f"job {job.id} ({job.model}): {reason}",
                    level=Level.WARNING,
                    study_instance_uid=job.study_instance_uid,
                    series_instance_uid=job.series_instance_uid,
                )

    def fail(self, job: ClaimedJob, state: JobState, reason: str, times: StageTimes, device: str | None) -> None:
        with self.engine.begin() as connection:
            self._close(connection, job, state, reason, times, device, None)
            insert_event(
                connection,
                EventKind.of_job(state.value),
                f"job {job.id} ({job.model}) {state.value}: {reason}",
                level=Level.ERROR if state is JobState.FAILED else Level.WARNING,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
            )

    def wait_for_space(
        self, job: ClaimedJob, reason: str, needed_free_bytes: int, times: StageTimes, device: str | None
    ) -> None:
        """Back to `queued` until the disk has `needed_free_bytes` free; not a failure, nothing to retry by hand."""
        needed_mib = -(-needed_free_bytes // 2**20)
        error = f"waiting for disk space: {reason}; it runs again once {needed_mib} MiB are free"
        with self.engine.begin() as connection:
            connection.execute(
                update(_jobs)
                .where(_jobs.c.id == job.id)
                .values(
                    state=JobState.QUEUED.value,
                    error=error,
                    needs_free_bytes=needed_free_bytes,
                    load_seconds=times.load,
                    inference_seconds=times.inference,
                    device=device,
                )
            )
            insert_event(
                connection,
                EventKind.JOB_WAITING,
                f"job {job.id} ({job.model}) {error}",
                level=Level.WARNING,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
            )

    def waiting_for_space(self) -> int:
        """How many queued jobs wait for disk space."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count()).where(
                    _jobs.c.state == JobState.QUEUED.value, _jobs.c.needs_free_bytes.is_not(None)
                )
            ).scalar_one()

    def prioritize(self, study_instance_uid: str, priority: Priority) -> int | None:
        """Every job of the study, queued now or by a series that arrives later, runs at `priority`, whatever its
        route says, and its results go out at it; returns how many of its jobs are queued, None if no such study."""
        with self.engine.begin() as connection:
            study_id = connection.execute(
                select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            ).scalar()
            if study_id is None:
                return None
            connection.execute(update(Study).where(Study.id == study_id).values(priority=priority.value))
            of_study = select(Series.id).where(Series.study_id == study_id)
            connection.execute(update(_jobs).where(_jobs.c.series_id.in_(of_study)).values(priority=priority.value))
            queued = connection.execute(
                select(func.count()).where(_jobs.c.series_id.in_(of_study), _jobs.c.state == JobState.QUEUED.value)
            ).scalar_one()
            insert_event(connection, EventKind.PRIORITIZED,
                         f"study set to {priority.label} by an admin: its {queued} queued job(s), those its later "
                         "series queue and its results' deliveries now run at that priority, whatever their route "
                         "says", study_instance_uid=study_instance_uid)
            return queued

    def cancel(self, job_id: int) -> str | None:
        """Cancel a queued (or failed) job; returns the state that prevented it, None on success."""
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id, _jobs.c.state.in_((JobState.QUEUED.value, JobState.FAILED.value)))
                .values(state=JobState.CANCELLED.value, error="cancelled by an admin", finished_at=utcnow())
            ).rowcount
            if changed:
                return None
            return connection.execute(select(Job.state).where(Job.id == job_id)).scalar() or "unknown"

    def retry(self, job_id: int | None = None) -> int:
        """Queue failed, skipped or cancelled jobs again (one, or all failed ones when job_id is None)."""
        again = (JobState.FAILED.value, JobState.SKIPPED.value, JobState.CANCELLED.value)
        condition = _jobs.c.id == job_id if job_id is not None else _jobs.c.state == JobState.FAILED.value
        with self.engine.begin() as connection:
            return connection.execute(
                update(_jobs)
                .where(condition, _jobs.c.state.in_(again))
                .values(state=JobState.QUEUED.value, error=None, finished_at=None, needs_free_bytes=None)
            ).rowcount

    @staticmethod
    def _close(connection, job, state, error, times, device, model_version) -> None:
        connection.execute(
            update(_jobs)
            .where(_jobs.c.id == job.id)
            .values(
                state=state.value,
                error=error,
                finished_at=utcnow(),
                load_seconds=times.load,
                inference_seconds=times.inference,
                write_seconds=times.write,
                device=device,
                model_version=model_version,
            )
        )


def _total(times: StageTimes) -> float:
    return sum(t for t in (times.load, times.inference, times.write) if t is not None)

