"""The instance index: the hot path of ingest and the audit trail.

Written with SQLAlchemy Core, not the ORM, because it runs once per received
instance inside the C-STORE handler: one short transaction per instance, with
`INSERT ... ON CONFLICT DO NOTHING` making re-sends idempotent on both SQLite
and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import threading
from dataclasses import dataclass
from typing import Iterator

from sqlalchemy import Connection, Engine, Row, bindparam, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_ai_node.store.models import Event, Instance, RefusedInstance, Series, SeriesState, Study, utcnow

_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_events = Event.__table__
_refused = RefusedInstance.__table__


@dataclass(frozen=True)
class InstanceHeader:
    """The header fields ingest extracts from a dataset for the index and the router."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    image_type: str | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None


@dataclass(frozen=True)
class Sender:
    """Who sent an instance, and by which way in."""

    ae_title: str | None
    host: str | None
    source: str = "dimse"

    def __str__(self) -> str:
        return f"{self.ae_title or '?'}@{self.host or '?'} ({self.source})"


_SERIES_CACHE_SIZE = 10_000


class Outcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID already stored: first copy kept
    LATE = "late"  # new instance for a series that had completed: re-opened for re-processing


@dataclass(frozen=True)
class CompletedSeries:
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    instances: int
    reprocess: bool


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


def insert_event(connection: Connection, kind: str, message: str, level: str = "info", **uids: str | None) -> None:
    connection.execute(_events.insert().values(at=utcnow(), level=level, kind=kind, message=message, **uids))


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
        "file_size": file_size,
        "received_at": now,
        "calling_ae_title": sender.ae_title,
        "calling_host": sender.host,
        "source": sender.source,
    }


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
    def _write(self) -> Iterator[Connection]:
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
        with self._write() as connection:
            connection.execute(_instances.delete().where(_instances.c.sop_instance_uid == sop_instance_uid))

    def record_duplicate(self, series_id: int) -> None:
        with self._write() as connection:
            _count_duplicate(connection, series_id)

    def describe_copy(self, header: InstanceHeader, sender: Sender, file_path: str, file_size: int) -> bool:
        """Make the row of a stored instance describe the copy now in its file (the row's file was lost).

        False if the row's file is elsewhere (the copy names another study or series): nothing changed.
        """
        with self._write() as connection:
            changed = connection.execute(
                update(_instances)
                .where(_instances.c.sop_instance_uid == header.sop_instance_uid, _instances.c.file_path == file_path)
                .values(**_copy_fields(header, sender, file_size, utcnow()))
            ).rowcount
            if changed:
                self._event(
                    connection,
                    "instance-restored",
                    f"instance {header.sop_instance_uid} had lost its file; the copy {sender} sent again is "
                    "stored in its place",
                    header,
                    sender,
                    level="warning",
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
        with self._write() as connection:
            connection.execute(
                self._insert(_refused)
                .values(sop_instance_uid=header.sop_instance_uid, **values)
                .on_conflict_do_update(index_elements=["sop_instance_uid"], set_=values)
            )
            self._event(connection, "store-failed", message, header, sender, level="error")

    def record_instance(self, header: InstanceHeader, sender: Sender, file_path: str, file_size: int) -> Outcome:
        now = utcnow()
        with self._write() as connection:
            series_id, created = self._series_row(connection, header, now)
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
                return Outcome.DUPLICATE
            if created:
                self._event(
                    connection,
                    "receiving",
                    f"series {header.series_instance_uid} ({header.modality or '?'}, "
                    f"{header.series_description or 'no description'!r}) started arriving from {sender}",
                    header,
                    sender,
                )
            if connection.execute(self._touch_receiving_series, {"series_id": series_id, "now": now}).rowcount:
                return Outcome.NEW
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
                "late-instance",
                f"instance {header.sop_instance_uid} arrived after series {header.series_instance_uid} was "
                f"{state}; the series is re-opened and flagged for re-processing",
                header,
                sender,
                level="warning",
            )
            return Outcome.LATE

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
        with self._write() as connection:
            for study_instance_uid, series_instance_uid, count in series:
                insert_event(
                    connection,
                    "resent",
                    f"series {series_instance_uid} sent again by {sender}: all {count} instance(s) were stored "
                    "already; the first copies are kept and nothing is processed again",
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    calling_ae_title=sender.ae_title,
                )

    def record_event(
        self,
        kind: str,
        message: str,
        *,
        level: str = "info",
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        calling_ae_title: str | None = None,
    ) -> None:
        with self._write() as connection:
            insert_event(
                connection,
                kind,
                message,
                level,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                sop_instance_uid=sop_instance_uid,
                calling_ae_title=calling_ae_title,
            )

    @staticmethod
    def _event(
        connection: Connection, kind: str, message: str, header: InstanceHeader, sender: Sender, level: str = "info"
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

    def complete_stable_series(self, stable_seconds: float, refused_wait_seconds: float) -> list[CompletedSeries]:
        """Mark every series with no new instance for `stable_seconds` as complete.

        The state lives only in the database, so after a restart the same call
        completes series whose last instance arrived before the restart.  A
        series with instances refused for a transient reason (Out of Resources,
        Processing Failure) waits for the sender to send them again: it is not
        processed with slices missing.  If they do not come within
        `refused_wait_seconds` of the last refusal, it completes with what it
        has, and says so.
        """
        now = utcnow()
        cutoff = now - dt.timedelta(seconds=stable_seconds)
        counts = (
            select(func.count())
            .where(_instances.c.series_id == _series.c.id)
            .scalar_subquery()
            .label("instances")
        )
        with self.engine.connect() as connection:
            candidates = connection.execute(
                select(
                    _series.c.id,
                    _series.c.series_instance_uid,
                    _series.c.modality,
                    _series.c.state_reason,
                    _series.c.reprocess_requested,
                    _series.c.late_instances,
                    _studies.c.study_instance_uid,
                    counts,
                )
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_series.c.state == SeriesState.RECEIVING.value, _series.c.last_received_at < cutoff)
            ).all()
        refusals = self._outstanding_refusals({row.series_instance_uid for row in candidates}) if candidates else {}
        give_up = now - dt.timedelta(seconds=refused_wait_seconds)
        completed = []
        for row in candidates:
            refused = refusals.get(row.series_instance_uid)
            if refused is not None and refused.last_refused_at >= give_up:
                self._wait_for_refused(row, refused.count, stable_seconds)
                continue
            missing = f"{refused.count} refused instance(s) were not re-sent" if refused is not None else None
            with self._write() as connection:
                changed = connection.execute(
                    update(_series)
                    .where(
                        _series.c.id == row.id,
                        _series.c.state == SeriesState.RECEIVING.value,
                        _series.c.last_received_at < cutoff,
                    )
                    .values(
                        state=SeriesState.COMPLETE.value,
                        state_reason=f"incomplete: {missing}" if missing else None,
                        completed_at=now,
                    )
                ).rowcount
                if not changed:  # an instance arrived meanwhile
                    continue
                uids = {"study_instance_uid": row.study_instance_uid, "series_instance_uid": row.series_instance_uid}
                if missing:  # given up: the event keeps the count
                    of_series = _refused.c.series_instance_uid == row.series_instance_uid
                    connection.execute(_refused.delete().where(of_series))
                    insert_event(
                        connection,
                        "series-incomplete",
                        f"{missing} within series.refused_wait_seconds = {refused_wait_seconds:g} s: the series "
                        f"completes with the {row.instances} instance(s) it has",
                        "warning",
                        **uids,
                    )
                note = f"; {row.late_instances} late instance(s), re-processing requested" if row.reprocess_requested else ""
                insert_event(
                    connection,
                    "complete",
                    f"series complete: {row.instances} instance(s), no new instance for {stable_seconds:g} s{note}",
                    **uids,
                )
            completed.append(
                CompletedSeries(
                    row.series_instance_uid, row.study_instance_uid, row.modality, row.instances, row.reprocess_requested
                )
            )
        return completed

    def _outstanding_refusals(self, series_uids: set[str]) -> dict[str, Row]:
        """Series UID -> (count, last_refused_at) of its refused instances not stored since.

        Refusals are settled here, off the receive path: one that has been stored
        since is dropped.  The table is empty unless something was refused.
        """
        with self.engine.connect() as connection:
            held = series_uids & set(connection.execute(select(_refused.c.series_instance_uid).distinct()).scalars())
            if not held:
                return {}
            of_held = _refused.c.series_instance_uid.in_(held)
            stored = exists().where(_instances.c.sop_instance_uid == _refused.c.sop_instance_uid)
            settled = connection.execute(select(func.count()).select_from(_refused).where(of_held, stored)).scalar_one()
        with self._write() as connection:
            if settled:
                connection.execute(_refused.delete().where(of_held, stored))
            rows = connection.execute(
                select(
                    _refused.c.series_instance_uid,
                    func.count().label("count"),
                    func.max(_refused.c.refused_at).label("last_refused_at"),
                )
                .where(of_held)
                .group_by(_refused.c.series_instance_uid)
            ).all()
        return {row.series_instance_uid: row for row in rows}

    def _wait_for_refused(self, series: Row, count: int, stable_seconds: float) -> None:
        """Say (once per change) why a quiet series is not complete yet."""
        reason = f"waiting for {count} refused instance(s) to be re-sent"
        if series.state_reason == reason:
            return
        with self._write() as connection:
            connection.execute(
                update(_series)
                .where(_series.c.id == series.id, _series.c.state == SeriesState.RECEIVING.value)
                .values(state_reason=reason)
            )
            insert_event(
                connection,
                "series-waiting",
                f"series quiet for {stable_seconds:g} s, but {count} of its instance(s) were refused (disk full or "
                "a processing failure) and not sent again; it completes once they arrive, or without them after "
                "series.refused_wait_seconds",
                "warning",
                study_instance_uid=series.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
            )


def refused_waiting(engine: Engine) -> tuple[int, int]:
    """(instances, series): refused instances not stored since, of series still receiving."""
    stored = exists().where(_instances.c.sop_instance_uid == _refused.c.sop_instance_uid)
    receiving = select(_series.c.series_instance_uid).where(_series.c.state == SeriesState.RECEIVING.value)
    with engine.connect() as connection:
        row = connection.execute(
            select(func.count(), func.count(func.distinct(_refused.c.series_instance_uid))).where(
                ~stored, _refused.c.series_instance_uid.in_(receiving)
            )
        ).one()
    return row[0], row[1]
