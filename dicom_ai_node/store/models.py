"""SQL schema: studies, series, instances and the audit trail of what happened.

The database is the hand-over point between stages: ingest writes rows,
series completion flips states, and later stages (routing, inference,
delivery) pick work up from here.  Every table change goes through an Alembic
migration in `store/migrations/versions/`.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SeriesState(str, enum.Enum):
    """Where a series is on its way through the node."""

    RECEIVING = "receiving"  # instances arriving; waits `stable_seconds` after the last one
    COMPLETE = "complete"  # no new instance for `stable_seconds`; ready for routing
    ROUTED = "routed"  # jobs queued for its models (see the jobs table for their progress)
    NOT_ROUTED = "not-routed"  # complete, but no rule sends it to a model (reason recorded)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # error recorded; `retry` re-queues it
    SKIPPED = "skipped"  # the series cannot be processed by this model (reason recorded)
    CANCELLED = "cancelled"  # by an admin (`cancel`); `retry` queues it again


class Priority(enum.IntEnum):
    """How urgent a job is, and the delivery of its results: workers take the most urgent queued job first, then
    the oldest.  Named after DICOM's Requested Procedure Priority (0040,1003), whose STAT, HIGH, ROUTINE and LOW
    radiology staff already use (its MEDIUM, between ROUTINE and LOW in no defined order, is left out)."""

    LOW = 0
    ROUTINE = 1
    HIGH = 2
    STAT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class StudyRouteState(str, enum.Enum):
    """Where a study is on a study route (one whose model reads several series of the study by role)."""

    COLLECTING = "collecting"  # a series of it fills one of the route's roles; waits for the others and quiet
    WAITING = "waiting"  # roles still missing after the route's study_wait_seconds; the route says wait
    QUEUED = "queued"  # jobs queued with the series of its roles (see the jobs table for their progress)
    SKIPPED = "skipped"  # roles still missing after the route's study_wait_seconds (reason recorded)


class FetchState(str, enum.Enum):
    QUEUED = "queued"  # asked for (`fetch`), waiting for its turn, the window or the rate limit
    FETCHING = "fetching"  # the C-MOVE is under way
    DONE = "done"  # the peer moved every instance it holds (or some failed: counted, reason recorded)
    FAILED = "failed"  # refused, moved nothing or not all, or still failing after a few tries; `retry F<id>`


class DeliveryState(str, enum.Enum):
    PENDING = "pending"  # waiting for its first attempt
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"  # a transient failure; the next attempt is scheduled (next_attempt_at)
    DEAD = "dead"  # permanent failure, or still failing after delivery.give_up_after_hours; `retry` sends it again


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    # QIDO-RS matching keys and return attributes (PS3.18 Tables 10.6.1-5, 10.6.3-3); since 0008.  Wider than
    # their VRs allow: a sender's over-long value must not make PostgreSQL refuse the instance.
    study_id: Mapped[str | None] = mapped_column(String(64), index=True)
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(64))
    patient_sex: Mapped[str | None] = mapped_column(String(64))
    timezone_offset_from_utc: Mapped[str | None] = mapped_column(String(64))
    specific_character_set: Mapped[str | None] = mapped_column(String(256))
    # Set by an admin (`prioritize`): the priority of this study's jobs, over their routes' (since 0010).
    priority: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_patient_id", "patient_id"), Index("ix_studies_study_date", "study_date"))


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), default=SeriesState.RECEIVING.value)
    state_reason: Mapped[str | None] = mapped_column(Text)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # A new instance after completion re-opens the series and asks for re-processing.
    reprocess_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    late_instances: Mapped[int] = mapped_column(Integer, default=0)
    duplicates_received: Mapped[int] = mapped_column(Integer, default=0)
    # QIDO-RS series matching keys (PS3.18 Table 10.6.1-5); since 0008.
    performed_procedure_step_start_date: Mapped[str | None] = mapped_column(String(64))
    performed_procedure_step_start_time: Mapped[str | None] = mapped_column(String(64))
    # NULL on rows indexed before 0008 until the start-up backfill has read their attributes from a file
    # (store/backfill.py); True for every series indexed since.
    query_attributes_indexed: Mapped[bool | None] = mapped_column(Boolean, default=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_state_last_received", "state", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_type: Mapped[str | None] = mapped_column(String(256))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    # QIDO-RS instance return attribute (PS3.18 Table 10.6.3-5); NULL on images indexed before 0008 (read
    # from the file when asked).
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(String(512))
    file_size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    calling_host: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="dimse")

    series: Mapped[Series] = relationship(back_populates="instances")


class RequestAttribute(Base):
    """One item of a series' Request Attributes Sequence (0040,0275): QIDO-RS sequence matching
    (PS3.4 C.2.2.2.6) needs both IDs of the same item together, so each item is a row."""

    __tablename__ = "request_attributes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    scheduled_procedure_step_id: Mapped[str | None] = mapped_column(String(64), index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(64), index=True)


class RefusedInstance(Base):
    """An instance refused with a transient status (Out of Resources, Processing Failure).

    The sender still holds it and is expected to send it again; until then its
    series does not complete (see `SeriesCompletion` in series/completion.py).  Keyed by
    UIDs, not by foreign keys: the refused instance may be the first of its series.
    The row goes once the instance is stored, or when its series gives up waiting.
    """

    __tablename__ = "refused_instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    refused_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    """Audit trail: what happened to a study and why, in words an admin can act on.

    UIDs are plain strings, not foreign keys, so failures for objects that never
    made it into the index (a malformed dataset, a rejected sender) are kept too.
    """

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    kind: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)


class Job(Base):
    """One model run on one series: (series, model), with timings for each stage."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    route: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    # A `Priority`: from the route, or the study's when an admin set one (since 0010).
    priority: Mapped[int] = mapped_column(Integer, default=Priority.ROUTINE.value)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    model_version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # Where the results go, decided once when the series was routed: renaming or removing the route later
    # changes nothing.  NULL for jobs queued before 0007: they use their route's destinations at finish.
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    # The webhooks its route notifies (names in [webhooks]), decided when its series was routed (since 0011).
    notify: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))  # None is SQL NULL, not 'null'
    # Set while the job waits for disk space: free bytes its results need (its reserve included).
    # Workers take it again only once the disk has that much free; `queued` meanwhile, the reason in `error`.
    needs_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # A study route's job: role -> SeriesInstanceUID of the series it reads (since 0013); `series_id` is the
    # route's first role, whose grid the results lie on.  NULL for a series route's job.
    inputs: Mapped[dict[str, str] | None] = mapped_column(JSON(none_as_null=True))
    # What the model found: how many findings (segments with voxels, detections; 1 for a classification's
    # answer), 0 for "found nothing", and in a line for admins ("Nodule 1 (97%)", "Contrast agent: Present").
    findings: Mapped[int | None] = mapped_column(Integer)
    summary: Mapped[str | None] = mapped_column(Text)
    load_seconds: Mapped[float | None] = mapped_column(Float)
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    write_seconds: Mapped[float | None] = mapped_column(Float)

    results: Mapped[list[ResultObject]] = relationship(back_populates="job")


class StudyRoute(Base):
    """A study on a study route: which series its jobs read for the route's roles, and what was decided
    (since 0013).  A series that fills a role after the decision opens it again: new jobs, new results."""

    __tablename__ = "study_routes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))  # indexed by the unique (study_id, route)
    route: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=StudyRouteState.COLLECTING.value, index=True)
    inputs: Mapped[dict[str, str] | None] = mapped_column(JSON(none_as_null=True))  # role -> series UID, as queued
    reason: Mapped[str | None] = mapped_column(Text)
    runs: Mapped[int] = mapped_column(Integer, default=0)  # how many times its jobs were queued
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (UniqueConstraint("study_id", "route"),)


class ResultObject(Base):
    """A DICOM object the node produced (SEG, SR), stored like a received instance."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # SEG | SR | PR (presentation state) | SC (secondary capture)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    file_path: Mapped[str] = mapped_column(String(512))
    file_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class Delivery(Base):
    """One result set (the SEG and SR of a job) to one destination, with its attempts."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    remote_status: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # First failed attempt of the current run of transient failures (None once delivered or retried by
    # hand): the delivery is dead when it still fails delivery.give_up_after_hours after this.
    failing_since: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Notification(Base):
    """One call of a webhook about one job: its results delivered, the job failed, or a delivery of its results
    dead (`delivery_id`); with its attempts, retried like a delivery."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"))
    webhook: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))  # notify.queue.NotificationEvent
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, as things stood when the call was owed
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    failing_since: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Fetch(Base):
    """One study to retrieve from a peer, asked for with `dicom-ai-node fetch` (found by its C-FIND)."""

    __tablename__ = "fetches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer: Mapped[str] = mapped_column(String(64))  # a name in [peers]
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    modalities: Mapped[str | None] = mapped_column(String(64))
    expected_instances: Mapped[int | None] = mapped_column(Integer)  # the peer's NumberOfStudyRelatedInstances
    asked: Mapped[str] = mapped_column(Text)  # the query that found it, for the admin
    state: Mapped[str] = mapped_column(String(16), default=FetchState.QUEUED.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int | None] = mapped_column(Integer)  # instances the peer moved
    failed: Mapped[int | None] = mapped_column(Integer)  # instances it could not move
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # Not tried again before this, after a transient failure (peer down, busy, cut off).
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class SourceCursor(Base):
    """How far the node has followed a PACS's change feed (Orthanc: the /changes sequence number).

    Written after each pulled series and each batch, so a restart resumes there: a series
    may be pulled twice (ingest skips what it holds), never skipped.
    """

    __tablename__ = "source_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # the name in [sources]
    last_change: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
