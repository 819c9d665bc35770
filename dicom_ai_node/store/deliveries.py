"""The delivery queue in SQL: one row per (result set, destination), with every attempt counted.

Nothing is deleted while undelivered.  A transient failure schedules the next
attempt with exponential backoff and jitter; a permanent one (or running out of
attempts) makes the delivery `dead` with the reason, until an admin retries it.
Claims are ordered by due time, so a destination that is down delays only its
own deliveries, never those to other destinations or of other studies.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, select, update

from dicom_ai_node.config import DeliverySection
from dicom_ai_node.delivery.outcome import Outcome
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    utcnow,
)

_deliveries = Delivery.__table__


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    destination: str
    attempt: int  # 1 for the first attempt
    study_instance_uid: str
    series_instance_uid: str
    calling_ae_title: str | None  # of the source series: where `origin` sends back to
    files: list[Path]


def backoff_seconds(failures: int, settings: DeliverySection) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries never synchronise."""
    ceiling = min(settings.max_backoff_seconds, settings.initial_backoff_seconds * 2 ** (failures - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def create_for_job(connection: Connection, job_id: int, destinations: list[str]) -> int:
    """Queue the job's results for each destination, unless that very result set is already on its way there.

    De-duplication is keyed on the result objects (their derived SOP Instance UIDs)
    and the destination, never on the study: a re-processed series has new UIDs and
    is delivered again; a retried job with the same UIDs is not.
    """
    uids = sorted(connection.execute(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job_id)).scalars())
    created = 0
    for destination in destinations:
        if _already_covered(connection, uids, destination):
            continue
        _queue(connection, job_id, destination)
        created += 1
    return created


def _queue(connection: Connection, job_id: int, destination: str) -> None:
    now = utcnow()
    connection.execute(
        _deliveries.insert().values(
            job_id=job_id,
            destination=destination,
            state=DeliveryState.PENDING.value,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
    )


def _already_covered(connection: Connection, uids: list[str], destination: str) -> bool:
    active = (DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.FAILED.value,
              DeliveryState.DELIVERED.value)
    rows = connection.execute(
        select(Delivery.job_id).where(Delivery.destination == destination, Delivery.state.in_(active))
    ).scalars().all()
    for other_job in set(rows):
        other = sorted(
            connection.execute(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == other_job)).scalars()
        )
        if other == uids:
            return True
    return False


class DeliveryQueue:
    def __init__(self, engine: Engine, storage_root: Path, settings: DeliverySection) -> None:
        self.engine = engine
        self.storage_root = storage_root
        self.settings = settings

    def requeue_interrupted(self) -> int:
        """Deliveries left `sending` by a node that stopped are sent again (same objects, same UIDs)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_deliveries)
                .where(_deliveries.c.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value, next_attempt_at=utcnow())
            ).rowcount

    def claim_due(self, limit: int) -> list[ClaimedDelivery]:
        now = utcnow()
        due = (
            select(Delivery.id)
            .where(
                Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.FAILED.value)),
                Delivery.next_attempt_at <= now,
            )
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        )
        claimed = []
        with self.engine.begin() as connection:
            for delivery_id in connection.execute(due).scalars().all():
                taken = connection.execute(
                    update(_deliveries)
                    .where(
                        _deliveries.c.id == delivery_id,
                        _deliveries.c.state.in_((DeliveryState.PENDING.value, DeliveryState.FAILED.value)),
                    )
                    .values(state=DeliveryState.SENDING.value, last_attempt_at=now, attempts=_deliveries.c.attempts + 1)
                ).rowcount
                if taken:
                    claimed.append(self._describe(connection, delivery_id))
        return claimed

    def _describe(self, connection: Connection, delivery_id: int) -> ClaimedDelivery:
        row = connection.execute(
            select(Delivery.id, Delivery.destination, Delivery.attempts, Delivery.job_id, Series.id.label("series_id"),
                   Series.series_instance_uid, Study.study_instance_uid)
            .join(Job, Job.id == Delivery.job_id)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Delivery.id == delivery_id)
        ).one()
        results = connection.execute(
            select(ResultObject.file_path)
            .where(ResultObject.job_id == row.job_id)
            .order_by(ResultObject.id)
        ).all()
        calling = connection.execute(
            select(Instance.calling_ae_title).where(Instance.series_id == row.series_id).limit(1)
        ).scalar()
        return ClaimedDelivery(
            id=row.id,
            destination=row.destination,
            attempt=row.attempts,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            calling_ae_title=calling,
            files=[self.storage_root / r.file_path for r in results],
        )

    def record(self, delivery: ClaimedDelivery, outcome: Outcome) -> DeliveryState:
        now = utcnow()
        if outcome.delivered:
            state, next_at = DeliveryState.DELIVERED, now
        elif outcome.permanent or delivery.attempt >= self.settings.max_attempts:
            state, next_at = DeliveryState.DEAD, now
        else:
            state = DeliveryState.FAILED
            next_at = now + dt.timedelta(seconds=backoff_seconds(delivery.attempt, self.settings))
        with self.engine.begin() as connection:
            connection.execute(
                update(_deliveries)
                .where(_deliveries.c.id == delivery.id)
                .values(
                    state=state.value,
                    last_error=None if outcome.delivered else outcome.reason,
                    remote_status=outcome.remote_status,
                    next_attempt_at=next_at,
                    delivered_at=now if outcome.delivered else None,
                )
            )
            what = f"delivery {delivery.id} of {len(delivery.files)} object(s) to {delivery.destination}"
            if state is DeliveryState.DELIVERED:
                message, level = f"{what}: delivered (attempt {delivery.attempt})", "info"
            elif state is DeliveryState.DEAD:
                why = "permanent failure" if outcome.permanent else f"gave up after {delivery.attempt} attempts"
                message, level = f"{what}: dead, {why}: {outcome.reason}", "error"
            else:
                wait = (next_at - now).total_seconds()
                message, level = f"{what}: attempt {delivery.attempt} failed ({outcome.reason}); retry in {wait:.0f} s", "warning"
            insert_event(
                connection,
                f"delivery-{state.value}",
                message,
                level,
                study_instance_uid=delivery.study_instance_uid,
                series_instance_uid=delivery.series_instance_uid,
            )
        return state

    # Admin actions -----------------------------------------------------------------------

    def retry(self, delivery_id: int) -> bool:
        """Send a dead or failed delivery again now, with a fresh attempt budget."""
        with self.engine.begin() as connection:
            return bool(
                connection.execute(
                    update(_deliveries)
                    .where(
                        _deliveries.c.id == delivery_id,
                        _deliveries.c.state.in_((DeliveryState.DEAD.value, DeliveryState.FAILED.value)),
                    )
                    .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow())
                ).rowcount
            )

    def retry_all_failed(self) -> int:
        with self.engine.begin() as connection:
            return connection.execute(
                update(_deliveries)
                .where(_deliveries.c.state.in_((DeliveryState.DEAD.value, DeliveryState.FAILED.value)))
                .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow())
            ).rowcount

    def resend(self, study_instance_uid: str, destination: str) -> int:
        """Queue every finished result set of the study for `destination` again, even if delivered before."""
        with self.engine.begin() as connection:
            jobs = connection.execute(
                select(Job.id)
                .join(Series, Series.id == Job.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_instance_uid, Job.state == JobState.DONE.value)
            ).scalars().all()
            for job_id in jobs:
                _queue(connection, job_id, destination)
            return len(jobs)

