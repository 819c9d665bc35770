"""The delivery queue in SQL: one row per (result set, destination), with every attempt counted.

Nothing is deleted while undelivered.  A transient failure schedules the next
attempt with exponential backoff and jitter, for `give_up_after_hours` from the
first failure of the run (the last attempt falls at the end of that window); a
permanent failure, or one still transient at the end of the window, makes the
delivery `dead` with the reason and the command that sends it again.  Claims are
ordered by due time, so a destination that is down delays only its own
deliveries, never those to other destinations or of other studies; the delivery
runner's probe makes them due at once when the destination answers again.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, exists, func, select, update

from dicom_ai_node.config import DEFAULT_OUTPUTS, OUTPUT_KINDS, DeliverySection
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from dicom_ai_node.values import DeliveryOutcome

_deliveries = Delivery.__table__


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    destination: str
    attempt: int  # 1 for the first attempt
    study_instance_uid: str
    series_instance_uid: str
    calling_ae_title: str | None  # of the source series: where `origin` sends back to
    files: list[Path]  # the result objects the destination receives (its `outputs`), in the order they were made
    failing_since: dt.datetime | None = None  # first failed attempt of the current run of failures


class ResendRefused(Exception):
    """`resend` cannot queue anything; the message says why and what to do instead."""


ORIGIN = "origin"
RETRY_COMMAND = "dicom-ai-node retry D{id}"


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
    def __init__(
        self,
        engine: Engine,
        storage_root: Path,
        settings: DeliverySection,
        outputs_of: Callable[[str], Sequence[str]] = lambda destination: DEFAULT_OUTPUTS,
    ) -> None:
        """`outputs_of(destination)` says which result objects a destination receives (`Config.outputs_of`)."""
        self.engine = engine
        self.storage_root = storage_root
        self.settings = settings
        self.outputs_of = outputs_of

    def requeue_interrupted(self) -> int:
        """Deliveries left `sending` by a node that stopped are sent again (same objects, same UIDs)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_deliveries)
                .where(_deliveries.c.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value, next_attempt_at=utcnow())
            ).rowcount

    def claim_due(self, limit: int) -> list[ClaimedDelivery]:
        """Up to `limit` deliveries whose time has come, those of the most urgent jobs first."""
        now = utcnow()
        due = (
            select(Delivery.id)
            .join(Job, Job.id == Delivery.job_id)
            .where(
                Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.FAILED.value)),
                Delivery.next_attempt_at <= now,
            )
            .order_by(Job.priority.desc(), Delivery.next_attempt_at, Delivery.id)
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
            select(Delivery.id, Delivery.destination, Delivery.attempts, Delivery.job_id, Delivery.failing_since,
                   Series.id.label("series_id"), Series.series_instance_uid, Study.study_instance_uid)
            .join(Job, Job.id == Delivery.job_id)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Delivery.id == delivery_id)
        ).one()
        kinds = [OUTPUT_KINDS[output] for output in self.outputs_of(row.destination)]
        results = connection.execute(
            select(ResultObject.file_path)
            .where(ResultObject.job_id == row.job_id, ResultObject.kind.in_(kinds))
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
            failing_since=row.failing_since,
        )

    def record(self, delivery: ClaimedDelivery, outcome: DeliveryOutcome) -> DeliveryState:
        now = utcnow()
        failing_since = None if outcome.delivered else delivery.failing_since or now
        give_up_at = (failing_since or now) + dt.timedelta(hours=self.settings.give_up_after_hours)
        again = RETRY_COMMAND.format(id=delivery.id)
        last_error = None if outcome.delivered else outcome.reason
        if outcome.delivered:
            state, next_at = DeliveryState.DELIVERED, now
        elif outcome.permanent or now >= give_up_at:
            state, next_at = DeliveryState.DEAD, now
            last_error = f"{outcome.reason}; send it again with: {again}"
        else:
            state = DeliveryState.FAILED
            # Never past the end of the window: the last attempt is made there, then the delivery is dead.
            next_at = min(now + dt.timedelta(seconds=backoff_seconds(delivery.attempt, self.settings)), give_up_at)
        with self.engine.begin() as connection:
            connection.execute(
                update(_deliveries)
                .where(_deliveries.c.id == delivery.id)
                .values(
                    state=state.value,
                    last_error=last_error,
                    remote_status=outcome.remote_status,
                    next_attempt_at=next_at,
                    delivered_at=now if outcome.delivered else None,
                    failing_since=failing_since,
                )
            )
            what = f"delivery {delivery.id} of {len(delivery.files)} object(s) to {delivery.destination}"
            if state is DeliveryState.DELIVERED:
                message, level = f"{what}: delivered (attempt {delivery.attempt})", Level.INFO
            elif state is DeliveryState.DEAD:
                if outcome.permanent:
                    why, fix = "permanent failure", f"once that is fixed, send it again with: {again}"
                else:
                    assert failing_since is not None
                    why = (f"gave up: still failing {_duration((now - failing_since).total_seconds())} after the "
                           f"first failed attempt ({delivery.attempt} attempt(s), delivery.give_up_after_hours = "
                           f"{self.settings.give_up_after_hours:g})")
                    fix = f"send it again with: {again}"
                message, level = f"{what}: dead, {why}: {outcome.reason}; {fix}", Level.ERROR
            else:
                wait = (next_at - now).total_seconds()
                left = (give_up_at - now).total_seconds()
                message = (f"{what}: attempt {delivery.attempt} failed ({outcome.reason}); retry in {wait:.0f} s "
                           f"or as soon as the destination answers again (gives up in {_duration(left)})")
                level = Level.WARNING
            insert_event(
                connection,
                EventKind.of_delivery(state.value),
                message,
                level,
                study_instance_uid=delivery.study_instance_uid,
                series_instance_uid=delivery.series_instance_uid,
            )
        return state

    # The delivery runner's probe ---------------------------------------------------------

    def waiting_destinations(self) -> list[tuple[str, str | None]]:
        """(destination, calling AE title for `origin`, else None) of every delivery waiting to be retried."""
        with self.engine.connect() as connection:
            named = connection.execute(
                select(Delivery.destination)
                .where(Delivery.state == DeliveryState.FAILED.value, Delivery.destination != ORIGIN)
                .distinct()
            ).scalars().all()
            callers = connection.execute(
                select(Instance.calling_ae_title)
                .join(Job, Job.series_id == Instance.series_id)
                .join(Delivery, Delivery.job_id == Job.id)
                .where(Delivery.state == DeliveryState.FAILED.value, Delivery.destination == ORIGIN)
                .distinct()
            ).scalars().all()
        return [(name, None) for name in named] + [(ORIGIN, calling) for calling in callers if calling]

    def undelivered(self, destination: str, calling_ae_title: str | None = None) -> int:
        """How many deliveries to `destination` are still to be sent: waiting after a failure, due, or being sent."""
        undelivered = (DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.FAILED.value)
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count()).select_from(_deliveries).where(*self._to(destination, calling_ae_title, undelivered))
            ).scalar_one()

    def due_now(self, destination: str, calling_ae_title: str | None = None) -> int:
        """The destination answers again: its deliveries waiting out a backoff are due now."""
        now = utcnow()
        with self.engine.begin() as connection:
            return connection.execute(
                update(_deliveries)
                .where(*self._to(destination, calling_ae_title, (DeliveryState.FAILED.value,)),
                       _deliveries.c.next_attempt_at > now)
                .values(next_attempt_at=now)
            ).rowcount

    def note_resumed(self, name: str, count: int) -> None:
        with self.engine.begin() as connection:
            insert_event(
                connection,
                EventKind.DELIVERY_RESUMED,
                f"destination {name} answers again: {count} waiting delivery(ies) sent now, not after their backoff",
            )

    @staticmethod
    def _to(destination: str, calling_ae_title: str | None, states: tuple[str, ...]) -> list:
        conditions = [_deliveries.c.state.in_(states), _deliveries.c.destination == destination]
        if destination == ORIGIN:  # `origin` is a different peer for each sender
            conditions.append(
                exists().where(
                    Job.id == _deliveries.c.job_id,
                    Instance.series_id == Job.series_id,
                    Instance.calling_ae_title == calling_ae_title,
                )
            )
        return conditions

    # Admin actions -----------------------------------------------------------------------

    def retry(self, delivery_id: int) -> bool:
        """Send a dead or failed delivery again now, with a fresh give-up window."""
        with self.engine.begin() as connection:
            return bool(
                connection.execute(
                    update(_deliveries)
                    .where(
                        _deliveries.c.id == delivery_id,
                        _deliveries.c.state.in_((DeliveryState.DEAD.value, DeliveryState.FAILED.value)),
                    )
                    .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow(), failing_since=None)
                ).rowcount
            )

    def retry_all_failed(self) -> int:
        with self.engine.begin() as connection:
            return connection.execute(
                update(_deliveries)
                .where(_deliveries.c.state.in_((DeliveryState.DEAD.value, DeliveryState.FAILED.value)))
                .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow(), failing_since=None)
            ).rowcount

    def resend(self, study_instance_uid: str, destination: str) -> int:
        """Queue every finished result set of the study for `destination` again, even if delivered before.

        Only result sets whose objects are still on file, and that hold objects the destination receives (its
        `outputs`), are queued; if there are none, ResendRefused says why and what can be done instead (nothing
        is queued)."""
        with self.engine.begin() as connection:
            jobs = connection.execute(
                select(Job.id)
                .join(Series, Series.id == Job.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_instance_uid, Job.state == JobState.DONE.value)
                .order_by(Job.id)
            ).scalars().all()
            with_results = [
                job_id for job_id in jobs
                if connection.execute(select(exists().where(ResultObject.job_id == job_id))).scalar()
            ]
            if jobs and not with_results:
                raise ResendRefused(self._nothing_on_file(connection, study_instance_uid, jobs))
            outputs = self.outputs_of(destination)
            kinds = [OUTPUT_KINDS[output] for output in outputs]
            receivable = [
                job_id for job_id in with_results
                if connection.execute(select(exists().where(ResultObject.job_id == job_id,
                                                            ResultObject.kind.in_(kinds)))).scalar()
            ]
            if with_results and not receivable:
                raise ResendRefused(
                    f"study {study_instance_uid}: {destination} receives {', '.join(outputs)} (its outputs), and "
                    "none of the study's results is one of those (see: dicom-ai-node job show ID)"
                )
            with_results = receivable
            for job_id in with_results:
                _queue(connection, job_id, destination)
            return len(with_results)

    @staticmethod
    def _nothing_on_file(connection: Connection, study_instance_uid: str, jobs: list[int]) -> str:
        listed = ", ".join(f"J{job_id}" for job_id in jobs)
        purged_at = connection.execute(
            select(func.max(Event.at)).where(Event.study_instance_uid == study_instance_uid, Event.kind == EventKind.PURGED.value)
        ).scalar()
        images = connection.execute(
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_instance_uid)
        ).scalar_one()
        if purged_at is None:
            return (f"study {study_instance_uid}: the results of its finished job(s) ({listed}) are no longer "
                    "on this node, so there is nothing to send (see: dicom-ai-node job show ID)")
        what = f"study {study_instance_uid}: its results were purged on {purged_at:%Y-%m-%d %H:%M} UTC"
        if images:  # purge removes both; should only the results be gone, the images can be processed again
            return (f"{what}, nothing left to send; its images are still here, but a finished job cannot be "
                    f"run again ({listed}): send the study to the node again to process it anew")
        return (f"{what}, and its images with them, so there is nothing to send and nothing to re-process: "
                "send the study to the node again (e.g. from the PACS) to process it anew; its results then go "
                "to the route's destinations, and resend works again")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
