"""The instance index: the hot path of ingest and the audit trail.

Written with SQLAlchemy Core, not the ORM, because it runs once per received
instance inside the C-STORE handler: one short transaction per instance, with
`INSERT ... ON CONFLICT DO NOTHING` making re-sends idempotent on both SQLite
and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from typing import Iterator

from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store.models import (
    Event,
    Instance,
    RefusedInstance,
    RequestAttribute,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from dicom_ai_node.values import IngestOutcome, InstanceHeader, Sender

log = logging.getLogger(__name__)

_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_events = Event.__table__
_refused = RefusedInstance.__table__
_request_attributes = RequestAttribute.__table__

_SERIES_CACHE_SIZE = 10_000


class Arrivals:
    """What one sending brought (an association, a STOW-RS request): new and duplicate instances per series.

    A series whose instances were all stored before was sent again as a whole; `Index.record_resent`
    says so once per series, where counting duplicates alone (`Series.duplicates_received`) would not.
    """

    def __init__(self) -> None:
        self._series: dict[str, list] = {}  # series UID -> [study UID, new, duplicates]

    def count(self, study_instance_uid: str, series_instance_uid: str, duplicate: bool) -> None:
        entry = self._series.setdefault(series_instance_uid, [study_instance_uid, 0, 0])
        entry[2 if duplicate else 1] += 1

    def only_duplicates(self) -> list[tuple[str, str, int]]:
        """(study UID, series UID, instances) of each series that brought nothing new."""
        return [(study, series, duplicates) for series, (study, new, duplicates) in self._series.items() if not new]


def insert_event(
    connection: Connection, kind: EventKind, message: str, level: Level = Level.INFO, **uids: str | None
) -> None:
    """An audit row, in the transaction of the state change it records (a kind outside the catalogue is a bug)."""
    connection.execute(
        _events.insert().values(at=utcnow(), level=Level(level).value, kind=EventKind(kind).value, message=message, **uids)
    )


def _copy_fields(header: InstanceHeader, sender: Sender, file_size: int, now: dt.datetime) -> dict[str, object]:
    """The columns of an instance row that describe one received copy of it."""
    return {
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "image_type": header.image_type,
        "rows": header.rows,
        "columns": header.columns,
        "number_of_frames": header.number_of_frames,
        "bits_allocated": header.bits_allocated,
        "file_size": file_size,
        "received_at": now,
        "calling_ae_title": sender.ae_title,
        "calling_host": sender.host,
        "source": sender.source,
    }


def study_query_attributes(header: InstanceHeader) -> dict[str, str | None]:
    """The columns of a study row QIDO-RS matches and returns beyond the core ones (PS3.18 10.6.1-5, 10.6.3-3)."""
    return {
        "study_id": header.study_id,
        "referring_physician_name": header.referring_physician_name,
        "patient_birth_date": header.patient_birth_date,
        "patient_sex": header.patient_sex,
        "timezone_offset_from_utc": header.timezone_offset_from_utc,
        "specific_character_set": header.specific_character_set,
    }


def series_query_attributes(header: InstanceHeader) -> dict[str, object]:
    """The columns of a series row QIDO-RS matches beyond the core ones (PS3.18 10.6.1-5)."""
    return {
        "performed_procedure_step_start_date": header.performed_procedure_step_start_date,
        "performed_procedure_step_start_time": header.performed_procedure_step_start_time,
        "query_attributes_indexed": True,
    }


def request_attribute_rows(series_id: int, header: InstanceHeader) -> list[dict[str, object]]:
    return [
        {"series_id": series_id, "scheduled_procedure_step_id": step, "requested_procedure_id": procedure}
        for step, procedure in header.request_attributes
    ]


def _count_duplicate(connection: Connection, series_id: int) -> None:
    connection.execute(
        update(_series).where(_series.c.id == series_id).values(duplicates_received=_series.c.duplicates_received + 1)
    )


class Index:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time; queueing in-process beats busy-waiting on the file lock.
        self._write_lock = threading.Lock() if self._dialect == "sqlite" else contextlib.nullcontext()
        # Hot-path statements are built once: constructing SQLAlchemy statements per
        # instance cost more than the SQL itself.
        self._find_instance = select(_instances.c.series_id).where(
            _instances.c.sop_instance_uid == bindparam("sop_instance_uid")
        )
        self._series_ids: dict[str, int] = {}
        self._cache_lock = threading.Lock()
        self._find_series = select(_series.c.id).where(
            _series.c.series_instance_uid == bindparam("series_instance_uid")
        )
        # RETURNING says whether a row went in on both databases (rowcount does not with
        # PostgreSQL, where SQLAlchemy adds RETURNING for the primary key anyway).
        self._add_instance = (
            self._insert(_instances).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(_instances.c.id)
        )
        self._touch_receiving_series = (
            update(_series)
            .where(_series.c.id == bindparam("series_id"), _series.c.state == SeriesState.RECEIVING.value)
            .values(last_received_at=bindparam("now"))
        )

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """A write transaction that takes turns with ingest's writes (SQLite has one writer)."""
        with self._write_lock, self.engine.begin() as connection:
            yield connection

    def _insert(self, table):
        return (sqlite.insert if self._dialect == "sqlite" else postgresql.insert)(table)

    def stored_series_id(self, sop_instance_uid: str) -> int | None:
        """The series row of an already stored instance, or None if it is new."""
        with self.engine.connect() as connection:
            return connection.execute(self._find_instance, {"sop_instance_uid": sop_instance_uid}).scalar()

    def forget_instance(self, sop_instance_uid: str) -> None:
        """Undo `record_instance` for an instance whose file could not be written."""
        with self.write_transaction() as connection:
            connection.execute(_instances.delete().where(_instances.c.sop_instance_uid == sop_instance_uid))

    def record_duplicate(self, series_id: int) -> None:
        with self.write_transaction() as connection:
            _count_duplicate(connection, series_id)

    def describe_copy(self, header: InstanceHeader, sender: Sender, file_path: str, file_size: int) -> bool:
        """Make the row of a stored instance describe the copy now in its file (the row's file was lost).

        False if the row's file is elsewhere (the copy names another study or series): nothing changed.
        """
        with self.write_transaction() as connection:
            changed = connection.execute(
                update(_instances)
                .where(_instances.c.sop_instance_uid == header.sop_instance_uid, _instances.c.file_path == file_path)
                .values(**_copy_fields(header, sender, file_size, utcnow()))
            ).rowcount
            if changed:
                self._event(
                    connection,
                    EventKind.INSTANCE_RESTORED,
                    f"instance {header.sop_instance_uid} had lost its file; the copy {sender} sent again is "
                    "stored in its place",
                    header,
                    sender,
                    level=Level.WARNING,
                )
        return bool(changed)

    def record_refusal(self, header: InstanceHeader, sender: Sender, status: int, reason: str, message: str) -> None:
        """Audit a transient refusal and remember it: the series waits for the sender to send the instance again."""
        values = {
            "series_instance_uid": header.series_instance_uid,
            "study_instance_uid": header.study_instance_uid,
            "status": status,
            "reason": reason,
            "calling_ae_title": sender.ae_title,
            "refused_at": utcnow(),
        }
        with self.write_transaction() as connection:
            connection.execute(
                self._insert(_refused)
                .values(sop_instance_uid=header.sop_instance_uid, **values)
                .on_conflict_do_update(index_elements=["sop_instance_uid"], set_=values)
            )
            self._event(connection, EventKind.STORE_FAILED, message, header, sender, level=Level.ERROR)

    def record_instance(self, header: InstanceHeader, sender: Sender, file_path: str, file_size: int) -> IngestOutcome:
        return self.record_instances([(header, file_path, file_size)], sender)[0]

    def record_instances(
        self, instances: list[tuple[InstanceHeader, str, int]], sender: Sender
    ) -> list[IngestOutcome]:
        """Index (header, file path, file size) of instances from one sender in one transaction: one commit.

        A series is looked up (or created) once per transaction and, as it is RECEIVING
        after its first instance, touched once.
        """
        now = utcnow()
        series: dict[str, tuple[int, bool]] = {}  # series UID -> (id, created by this transaction)
        receiving: set[int] = set()  # series touched (and so RECEIVING) in this transaction
        announced: set[int] = set()  # series created here whose `receiving` event is written
        with self.write_transaction() as connection:
            outcomes = []
            for header, file_path, file_size in instances:
                if header.series_instance_uid not in series:
                    series[header.series_instance_uid] = self._series_row(connection, header, now)
                series_id, created = series[header.series_instance_uid]
                outcome = self._insert_instance(
                    connection, header, sender, file_path, file_size, now, series_id, receiving
                )
                if created and outcome is not IngestOutcome.DUPLICATE and series_id not in announced:
                    announced.add(series_id)
                    self._event(
                        connection,
                        EventKind.RECEIVING,
                        f"series {header.series_instance_uid} ({header.modality or '?'}, "
                        f"{header.series_description or 'no description'!r}) started arriving from {sender}",
                        header,
                        sender,
                    )
                outcomes.append(outcome)
        for series_instance_uid, (series_id, created) in series.items():
            if created:  # cached only once committed
                self._remember_series(series_instance_uid, series_id)
        return outcomes

    def _insert_instance(
        self,
        connection: Connection,
        header: InstanceHeader,
        sender: Sender,
        file_path: str,
        file_size: int,
        now: dt.datetime,
        series_id: int,
        receiving: set[int],
    ) -> IngestOutcome:
        inserted = connection.execute(
            self._add_instance,
            {
                "sop_instance_uid": header.sop_instance_uid,
                "series_id": series_id,
                "file_path": file_path,
                **_copy_fields(header, sender, file_size, now),
            },
        ).first()
        if inserted is None:  # stored before, or by a concurrent association just now
            _count_duplicate(connection, series_id)
            return IngestOutcome.DUPLICATE
        if series_id in receiving:
            return IngestOutcome.NEW
        receiving.add(series_id)
        if connection.execute(self._touch_receiving_series, {"series_id": series_id, "now": now}).rowcount:
            return IngestOutcome.NEW
        state = connection.execute(select(_series.c.state).where(_series.c.id == series_id)).scalar_one()
        connection.execute(
            update(_series)
            .where(_series.c.id == series_id)
            .values(
                state=SeriesState.RECEIVING.value,
                state_reason=f"re-opened: new instance after the series was {state}",
                last_received_at=now,
                reprocess_requested=True,
                late_instances=_series.c.late_instances + 1,
            )
        )
        self._event(
            connection,
            EventKind.LATE_INSTANCE,
            f"instance {header.sop_instance_uid} arrived after series {header.series_instance_uid} was "
            f"{state}; the series is re-opened and flagged for re-processing",
            header,
            sender,
            level=Level.WARNING,
        )
        return IngestOutcome.LATE

    def _series_row(self, connection: Connection, header: InstanceHeader, now: dt.datetime) -> tuple[int, bool]:
        """(series id, whether this call created it).

        Series rows are never deleted (purge keeps them for the audit), so their ids are
        cached: most instances then need one INSERT and one UPDATE, nothing else.
        """
        cached = self._series_ids.get(header.series_instance_uid)
        if cached is not None:
            return cached, False
        key = {"series_instance_uid": header.series_instance_uid}
        row = connection.execute(self._find_series, key).first()
        if row is not None:
            self._remember_series(header.series_instance_uid, row.id)
            return row.id, False
        connection.execute(
            self._insert(_studies)
            .values(
                study_instance_uid=header.study_instance_uid,
                patient_id=header.patient_id,
                patient_name=header.patient_name,
                accession_number=header.accession_number,
                study_date=header.study_date,
                study_time=header.study_time,
                study_description=header.study_description,
                **study_query_attributes(header),
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
        )
        study_id = connection.execute(
            select(_studies.c.id).where(_studies.c.study_instance_uid == header.study_instance_uid)
        ).scalar_one()
        created = connection.execute(
            self._insert(_series)
            .values(
                series_instance_uid=header.series_instance_uid,
                study_id=study_id,
                modality=header.modality,
                body_part_examined=header.body_part_examined,
                series_description=header.series_description,
                series_number=header.series_number,
                **series_query_attributes(header),
                state=SeriesState.RECEIVING.value,
                first_received_at=now,
                last_received_at=now,
                reprocess_requested=False,
                late_instances=0,
                duplicates_received=0,
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        ).rowcount
        row = connection.execute(self._find_series, key).one()
        if created and header.request_attributes:
            connection.execute(_request_attributes.insert(), request_attribute_rows(row.id, header))
        if not created:  # created in this transaction: cached only once it is committed (next instance)
            self._remember_series(header.series_instance_uid, row.id)
        return row.id, bool(created)

    def _remember_series(self, series_instance_uid: str, series_id: int) -> None:
        with self._cache_lock:
            if len(self._series_ids) >= _SERIES_CACHE_SIZE:
                self._series_ids.pop(next(iter(self._series_ids)))  # oldest first: dicts keep insertion order
            self._series_ids[series_instance_uid] = series_id

    def record_resent(self, sender: Sender, series: list[tuple[str, str, int]]) -> None:
        """A `resent` event for each (study UID, series UID, instances) a sender sent again with nothing new."""
        with self.write_transaction() as connection:
            for study_instance_uid, series_instance_uid, count in series:
                insert_event(
                    connection,
                    EventKind.RESENT,
                    f"series {series_instance_uid} sent again by {sender}: all {count} instance(s) were stored "
                    "already; the first copies are kept and nothing is processed again",
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    calling_ae_title=sender.ae_title,
                )

    def report(
        self, kind: EventKind, message: str, level: Level = Level.INFO, *, logger: logging.Logger, **uids: str | None
    ) -> None:
        """The log line and the audit row, with the same words; never raises (see `record`)."""
        logger.log(Level(level).logging_level, "%s", message)
        self.record(kind, message, level, **uids)

    def record(self, kind: EventKind, message: str, level: Level = Level.INFO, **uids: str | None) -> None:
        """The audit row alone, for what was logged where it was decided; never raises.

        What is recorded was already decided and acted on (a rejection sent, a feed
        retried): a database that cannot take the row must not undo it, so the failure
        to record goes to the log instead.  `uids`: study_instance_uid,
        series_instance_uid, sop_instance_uid, calling_ae_title.
        """
        try:
            with self.write_transaction() as connection:
                insert_event(connection, kind, message, level, **uids)
        except Exception:
            log.exception("could not write to the audit trail (%s): %s", kind, message)

    @staticmethod
    def _event(
        connection: Connection, kind: EventKind, message: str, header: InstanceHeader, sender: Sender,
        level: Level = Level.INFO,
    ) -> None:
        insert_event(
            connection,
            kind,
            message,
            level,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            calling_ae_title=sender.ae_title,
        )

    def receiving_series(self) -> list[tuple[str, str]]:
        """(study, series) UIDs of the series still receiving."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(_studies.c.study_instance_uid, _series.c.series_instance_uid)
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_series.c.state == SeriesState.RECEIVING.value)
            ).all()
        return [(row.study_instance_uid, row.series_instance_uid) for row in rows]
