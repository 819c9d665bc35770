"""The job queue in SQL: routing writes jobs, workers claim and finish them.

Workers are separate processes (possibly on other hosts against PostgreSQL), so
a job is claimed with one conditional UPDATE: whoever flips it from `queued`
to `running` owns it.  A job whose results found no disk space goes back to
`queued` with the free space it needs; workers pass the free space they see
when they claim, so it is not taken (and its model not run) again before then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, or_, select, update

from dicom_ai_node.routing.rules import RouteDecision, SeriesFacts
from dicom_ai_node.store.deliveries import create_for_job
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Instance, Job, JobState, ResultObject, Series, SeriesState, Study, utcnow

_jobs = Job.__table__
_series = Series.__table__


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    model: str
    route: str
    series_instance_uid: str
    study_instance_uid: str
    series_number: int | None
    paths: list[Path]


@dataclass(frozen=True)
class StoredResult:
    kind: str  # SEG | SR
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    file_path: str
    file_size: int


@dataclass(frozen=True)
class StageTimes:
    load: float | None = None
    inference: float | None = None
    write: float | None = None


class JobQueue:
    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.storage_root = storage_root

    # Routing side -------------------------------------------------------------------------

    def complete_series_facts(self) -> list[tuple[int, str, SeriesFacts]]:
        """(series id, study UID, facts) of every series waiting to be routed."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Series.id, Series.series_instance_uid, Series.modality, Series.body_part_examined,
                       Series.series_description, Study.study_instance_uid)
                .join(Study, Study.id == Series.study_id)
                .where(Series.state == SeriesState.COMPLETE.value)
                .order_by(Series.completed_at)
            ).all()
            facts = []
            for row in rows:
                instances = connection.execute(
                    select(Instance.sop_class_uid, Instance.image_type).where(Instance.series_id == row.id)
                ).all()
                facts.append(
                    (
                        row.id,
                        row.study_instance_uid,
                        SeriesFacts(
                            series_instance_uid=row.series_instance_uid,
                            modality=row.modality,
                            body_part_examined=row.body_part_examined,
                            series_description=row.series_description,
                            sop_class_uids=frozenset(i.sop_class_uid for i in instances),
                            image_types=frozenset(i.image_type for i in instances if i.image_type),
                            instances=len(instances),
                        ),
                    )
                )
        return facts

    def apply_route(self, series_id: int, study_uid: str, facts: SeriesFacts, decision: RouteDecision) -> bool:
        """Queue the decision's jobs (or mark not-routed); False if the series changed meanwhile."""
        now = utcnow()
        state = SeriesState.ROUTED if decision.models else SeriesState.NOT_ROUTED
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(_series)
                .where(_series.c.id == series_id, _series.c.state == SeriesState.COMPLETE.value)
                .values(
                    state=state.value,
                    state_reason=None if decision.models else decision.reason,
                    reprocess_requested=False,
                )
            ).rowcount
            if not changed:
                return False
            for model in decision.models:
                connection.execute(
                    _jobs.insert().values(
                        series_id=series_id,
                        route=decision.route,
                        model=model,
                        state=JobState.QUEUED.value,
                        attempts=0,
                        created_at=now,
                    )
                )
            message = (
                f"{decision.reason}: queued for {', '.join(decision.models)}"
                if decision.models
                else f"not routed: {decision.reason}"
            )
            insert_event(
                connection,
                "routed" if decision.models else "not-routed",
                message,
                level="info" if decision.models else "warning",
                study_instance_uid=study_uid,
                series_instance_uid=facts.series_instance_uid,
            )
        return True

    # Worker side --------------------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Jobs left `running` by a node that stopped are queued again (results have derived UIDs)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_jobs)
                .where(_jobs.c.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, error="re-queued: the node stopped while it was running")
            ).rowcount

    def claim(self, worker: str, models: list[str], free_bytes: int | None = None) -> ClaimedJob | None:
        """Take the oldest queued job; one waiting for disk space only if `free_bytes` is enough for it."""
        room = _jobs.c.needs_free_bytes.is_(None)
        if free_bytes is not None:
            room = or_(room, _jobs.c.needs_free_bytes <= free_bytes)
        next_job = (
            select(_jobs.c.id)
            .where(_jobs.c.state == JobState.QUEUED.value, _jobs.c.model.in_(models), room)
            .order_by(_jobs.c.id)
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
                select(Job.model, Job.route, Series.id, Series.series_instance_uid, Series.series_number,
                       Study.study_instance_uid)
                .join(Series, Series.id == Job.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Job.id == job_id)
            ).one()
            paths = connection.execute(
                select(Instance.file_path).where(Instance.series_id == row.id).order_by(Instance.id)
            ).scalars()
            return ClaimedJob(
                id=job_id,
                model=row.model,
                route=row.route,
                series_instance_uid=row.series_instance_uid,
                study_instance_uid=row.study_instance_uid,
                series_number=row.series_number,
                paths=[self.storage_root / path for path in paths],
            )

    def finish(
        self,
        job: ClaimedJob,
        results: list[StoredResult],
        times: StageTimes,
        device: str,
        model_version: str,
        destinations: list[str],
    ) -> None:
        """Record the results and queue their deliveries in the same transaction: none can be lost between."""
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
            create_for_job(connection, job.id, destinations)
            summary = ", ".join(f"{r.kind} {r.sop_instance_uid}" for r in results)
            insert_event(
                connection,
                "job-done",
                f"job {job.id} ({job.model}) done in {_total(times):.1f} s: {summary}",
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
            )

    def fail(self, job: ClaimedJob, state: JobState, reason: str, times: StageTimes, device: str | None) -> None:
        with self.engine.begin() as connection:
            self._close(connection, job, state, reason, times, device, None)
            insert_event(
                connection,
                f"job-{state.value}",
                f"job {job.id} ({job.model}) {state.value}: {reason}",
                level="error" if state is JobState.FAILED else "warning",
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
                "job-waiting",
                f"job {job.id} ({job.model}) {error}",
                level="warning",
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

