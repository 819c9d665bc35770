"""The notification queue in SQL: which webhook calls are owed, found from the state of jobs and deliveries.

Nothing elsewhere has to remember to notify: `discover` looks for jobs whose route notifies webhooks and whose
results are all delivered (or had nowhere to go), jobs that failed or were skipped, and deliveries that died, and
owes each webhook one call per job and event (per dead delivery for "delivery-dead").  Because it reads state,
not hooks, a call is never lost to a crash between two transactions and never owed twice.  Calls are retried
like deliveries: backoff with jitter while the failures are transient, dead after `give_up_after_hours`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, exists, or_, select, update

from dicom_ai_node.config import DeliverySection
from dicom_ai_node.delivery.queue import backoff_seconds
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Notification,
    Priority,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from dicom_ai_node.store.queries import iso_utc
from dicom_ai_node.values import DeliveryOutcome

_notifications = Notification.__table__
RETRY_COMMAND = "dicom-ai-node retry N{id}"


class NotificationEvent(enum.StrEnum):
    """What a call is about, and the `on` value of [webhooks] that asks for it."""

    RESULTS_DELIVERED = "results-delivered"  # every delivery of the job's results delivered, or none to make
    JOB_FAILED = "job-failed"  # the job failed or was skipped (the payload's job.state says which)
    DELIVERY_DEAD = "delivery-dead"  # a delivery of the job's results gave up

    @property
    def asked_by(self) -> str:
        return "delivered" if self is NotificationEvent.RESULTS_DELIVERED else "failed"


@dataclass(frozen=True)
class ClaimedNotification:
    id: int
    webhook: str
    event: NotificationEvent
    attempt: int  # 1 for the first
    payload: dict[str, Any]
    study_instance_uid: str
    series_instance_uid: str
    failing_since: dt.datetime | None


class NotificationQueue:
    def __init__(self, engine: Engine, settings: DeliverySection, node_ae_title: str,
                 patient_id_for: set[str] | frozenset[str] = frozenset()) -> None:
        """`patient_id_for`: the webhooks whose payload may carry the PatientID."""
        self.engine = engine
        self.settings = settings
        self.node_ae_title = node_ae_title
        self.patient_id_for = patient_id_for

    def requeue_interrupted(self) -> int:
        """Calls left `sending` by a node that stopped are made again (the receiver de-duplicates by call id)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_notifications)
                .where(_notifications.c.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value, next_attempt_at=utcnow())
            ).rowcount

    def retry(self, notification_id: int | None = None) -> int:
        """Make a failed or dead call again now, with a fresh give-up window (all of them when None)."""
        again = _notifications.c.state.in_((DeliveryState.DEAD.value, DeliveryState.FAILED.value))
        which = [again] if notification_id is None else [again, _notifications.c.id == notification_id]
        with self.engine.begin() as connection:
            return connection.execute(
                update(_notifications).where(*which).values(
                    state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow(), failing_since=None)
            ).rowcount

    def discover(self, wanted: dict[str, set[str]]) -> int:
        """Owe the calls that jobs and deliveries now call for; `wanted` is each configured webhook's `on`.
        Returns how many calls it queued.

        Each outcome is told once: a job run again (`retry J<id>`) that fails or delivers again, or a delivery
        sent again (`retry D<id>`) that dies again, is a new outcome.  Only outcomes of the last give-up window
        and a day are looked at, so each pass stays a few indexed queries however long the node runs.
        """
        owed = 0
        since = utcnow() - dt.timedelta(hours=self.settings.give_up_after_hours + 24)
        notifying = Job.notify.is_not(None)

        def told(event: NotificationEvent):
            return exists().where(Notification.job_id == Job.id, Notification.event == event.value,
                                  Notification.created_at >= Job.finished_at)

        undelivered = exists().where(Delivery.job_id == Job.id, Delivery.state != DeliveryState.DELIVERED.value)
        lately_delivered = exists().where(Delivery.job_id == Job.id, Delivery.delivered_at >= since)
        delivered = select(Job.id, Job.notify).where(
            notifying, Job.state == JobState.DONE.value, ~undelivered,
            or_(Job.finished_at >= since, lately_delivered), ~told(NotificationEvent.RESULTS_DELIVERED))
        failed = select(Job.id, Job.notify).where(
            notifying, Job.state.in_((JobState.FAILED.value, JobState.SKIPPED.value)), Job.finished_at >= since,
            ~told(NotificationEvent.JOB_FAILED))
        dead = (select(Delivery.id, Job.id, Job.notify).join(Job, Job.id == Delivery.job_id)
                .where(notifying, Delivery.state == DeliveryState.DEAD.value, Delivery.last_attempt_at >= since,
                       ~exists().where(Notification.delivery_id == Delivery.id,
                                       Notification.created_at >= Delivery.last_attempt_at)))
        with self.engine.begin() as connection:
            for event, query in ((NotificationEvent.RESULTS_DELIVERED, delivered),
                                 (NotificationEvent.JOB_FAILED, failed)):
                for job_id, names in connection.execute(query).all():
                    owed += self._owe(connection, wanted, job_id, None, names, event)
            for delivery_id, job_id, names in connection.execute(dead).all():
                owed += self._owe(connection, wanted, job_id, delivery_id, names, NotificationEvent.DELIVERY_DEAD)
        return owed

    def _owe(self, connection, wanted: dict[str, set[str]], job_id: int, delivery_id: int | None,
             names: list[str] | None, event: NotificationEvent) -> int:
        """One call per webhook of `names` that asks for the event, its body as things stand now."""
        owed = 0
        for name in names or ():
            if event.asked_by not in wanted.get(name, set()):
                continue  # the webhook does not ask for it, or is no longer configured
            now = utcnow()
            payload = self._payload(connection, job_id, delivery_id, event, name in self.patient_id_for)
            connection.execute(_notifications.insert().values(
                job_id=job_id, delivery_id=delivery_id, webhook=name, event=event.value, payload=json.dumps(payload),
                state=DeliveryState.PENDING.value, attempts=0, created_at=now, next_attempt_at=now))
            owed += 1
        return owed

    def abandon(self, configured: Collection[str]) -> int:
        """Calls still owed to webhooks no longer in the config are dead: nobody is there to make them to."""
        waiting = (DeliveryState.PENDING.value, DeliveryState.FAILED.value)
        with self.engine.begin() as connection:
            return connection.execute(
                update(_notifications)
                .where(_notifications.c.state.in_(waiting), _notifications.c.webhook.not_in(list(configured)))
                .values(state=DeliveryState.DEAD.value, last_error="its webhook is no longer in [webhooks]")
            ).rowcount

    def claim_due(self, limit: int, webhooks: Collection[str]) -> list[ClaimedNotification]:
        """Up to `limit` calls to `webhooks` (those configured) whose time has come, the most urgent jobs' first."""
        now = utcnow()
        waiting = (DeliveryState.PENDING.value, DeliveryState.FAILED.value)
        due = (select(Notification.id).join(Job, Job.id == Notification.job_id)
               .where(Notification.state.in_(waiting), Notification.next_attempt_at <= now,
                      Notification.webhook.in_(list(webhooks)))
               .order_by(Job.priority.desc(), Notification.next_attempt_at, Notification.id).limit(limit))
        claimed = []
        with self.engine.begin() as connection:
            for notification_id in connection.execute(due).scalars().all():
                taken = connection.execute(
                    update(_notifications)
                    .where(_notifications.c.id == notification_id, _notifications.c.state.in_(waiting))
                    .values(state=DeliveryState.SENDING.value, attempts=_notifications.c.attempts + 1)
                ).rowcount
                if taken:
                    claimed.append(self._describe(connection, notification_id))
        return claimed

    @staticmethod
    def _describe(connection, notification_id: int) -> ClaimedNotification:
        row = connection.execute(
            select(Notification.__table__, Series.series_instance_uid, Study.study_instance_uid)
            .join(Job, Job.id == Notification.job_id)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Notification.id == notification_id)
        ).one()
        # The id is the same on every attempt, and so is the rest of the body: what happened, as it was then.
        payload = {"id": f"N{row.id}", **json.loads(row.payload)}
        return ClaimedNotification(row.id, row.webhook, NotificationEvent(row.event), row.attempts, payload,
                                   row.study_instance_uid, row.series_instance_uid, row.failing_since)

    def _payload(self, connection, job_id: int, delivery_id: int | None, event: NotificationEvent,
                 include_patient_id: bool) -> dict[str, Any]:
        """What happened to which job of which study, what it made and where it went."""
        row = connection.execute(
            select(Job.model, Job.model_version, Job.route, Job.priority, Job.state, Job.findings, Job.summary,
                   Job.error, Job.finished_at, Series.series_instance_uid, Series.modality, Study.study_instance_uid,
                   Study.accession_number, Study.patient_id)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Job.id == job_id)
        ).one()
        results = connection.execute(
            select(ResultObject.kind, ResultObject.sop_class_uid, ResultObject.sop_instance_uid,
                   ResultObject.series_instance_uid).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
        ).all()
        deliveries = connection.execute(
            select(Delivery.id, Delivery.destination, Delivery.state, Delivery.delivered_at, Delivery.last_error)
            .where(Delivery.job_id == job_id).order_by(Delivery.id)
        ).all()
        study = {"StudyInstanceUID": row.study_instance_uid, "AccessionNumber": row.accession_number}
        if include_patient_id:
            study["PatientID"] = row.patient_id
        payload = {
            "event": event.value,
            "node": self.node_ae_title,
            "study": study,
            "series": {"SeriesInstanceUID": row.series_instance_uid, "Modality": row.modality},
            "job": {"id": f"J{job_id}", "model": row.model, "model_version": row.model_version,
                    "route": row.route, "priority": Priority(row.priority).label, "state": row.state,
                    "findings": row.findings, "summary": row.summary, "error": row.error,
                    "finished_at": iso_utc(row.finished_at)},
            "results": [{"kind": r.kind, "SOPClassUID": r.sop_class_uid, "SOPInstanceUID": r.sop_instance_uid,
                         "SeriesInstanceUID": r.series_instance_uid} for r in results],
            "deliveries": [{"id": f"D{d.id}", "destination": d.destination, "state": d.state,
                            "delivered_at": iso_utc(d.delivered_at), "error": d.last_error} for d in deliveries],
        }
        if delivery_id is not None:
            payload["delivery"] = f"D{delivery_id}"  # the one that died
        return payload

    def record(self, call: ClaimedNotification, outcome: DeliveryOutcome) -> DeliveryState:
        """The call's outcome: done, retried later with backoff, or dead (permanent, or past the give-up window)."""
        now = utcnow()
        failing_since = None if outcome.delivered else call.failing_since or now
        give_up_at = (failing_since or now) + dt.timedelta(hours=self.settings.give_up_after_hours)
        if outcome.delivered:
            state, next_at = DeliveryState.DELIVERED, now
        elif outcome.permanent or now >= give_up_at:
            state, next_at = DeliveryState.DEAD, now
        else:
            state = DeliveryState.FAILED
            next_at = min(now + dt.timedelta(seconds=backoff_seconds(call.attempt, self.settings)), give_up_at)
        with self.engine.begin() as connection:
            connection.execute(
                update(_notifications).where(_notifications.c.id == call.id).values(
                    state=state.value, last_error=None if outcome.delivered else outcome.reason,
                    next_attempt_at=next_at, sent_at=now if outcome.delivered else None, failing_since=failing_since)
            )
            what = f"webhook {call.webhook} told of {call.event} (N{call.id}, {call.payload['job']['id']})"
            if state is DeliveryState.DELIVERED:
                kind, level = EventKind.NOTIFICATION_SENT, Level.INFO
                message = f"{what}: answered {outcome.remote_status}"
            elif state is DeliveryState.DEAD:
                why = "refused" if outcome.permanent else f"still failing after {self.settings.give_up_after_hours:g} h"
                kind, level = EventKind.NOTIFICATION_DEAD, Level.ERROR
                again = RETRY_COMMAND.format(id=call.id)
                message = f"{what}: gave up, {why}: {outcome.reason}; make it again with: {again}"
            else:
                wait = (next_at - now).total_seconds()
                kind, level = EventKind.NOTIFICATION_FAILED, Level.WARNING
                message = f"{what}: attempt {call.attempt} failed ({outcome.reason}); retry in {wait:.0f} s"
            insert_event(connection, kind, message, level, study_instance_uid=call.study_instance_uid,
                         series_instance_uid=call.series_instance_uid)
        return state
