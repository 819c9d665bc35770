"""Series completion: a series is complete once nothing new arrived for `stable_seconds`.

DICOM has no "end of series" message, so like Orthanc's StableAge the node
waits for quiet.  The clock is the `last_received_at` column, not memory, so a
restart in the middle of receiving still completes the series.  Quiet is not
enough when instances of the series were refused for a transient reason: the
series waits for their re-send (up to `series.refused_wait_seconds`).

A study the node pulled (`fetch`) has a better signal than quiet: the C-MOVE's
final response says the peer has sent everything.  While its C-MOVE runs, its
series do not complete however long the peer pauses (a PACS restoring from slow
storage); once the C-MOVE has ended, they complete at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine, Row, and_, exists, func, or_, select, update

from dicom_ai_node.config import Peer
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.fetch.dimse import series_counts
from dicom_ai_node.store.index import Index, insert_event
from dicom_ai_node.store.models import (
    Fetch,
    FetchState,
    Instance,
    RefusedInstance,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from dicom_ai_node.values import CompletedSeries

log = logging.getLogger(__name__)

_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_refused = RefusedInstance.__table__
_fetches = Fetch.__table__
_ASK_AGAIN_SECONDS = 10.0  # how often a waiting series' sender is asked again
_RETRY_HORIZON_SECONDS = 600.0  # the waits between a fetch's attempts, together


@dataclass
class _Asked:
    """The last C-FIND to a study's sender: when, the answer under way, the last counts it gave."""

    at: float
    answer: Future
    counts: dict[str, int] | None
    failed: bool = False  # it never answered: quiet decides for the study


class SeriesCompletion:
    """Every change of a series from `receiving` to `complete`, and the wait for refused instances before it.

    Writes take turns with ingest's through the index's write transaction (SQLite has one writer).
    """

    def __init__(self, index: Index, peers: dict[str, Peer] | None = None, our_ae_title: str = "AI_NODE",
                 sender_count_wait_seconds: float = 0.0, fetch_timeout_seconds: float = 3600.0) -> None:
        """`peers`: the PACS whose series are complete only once the node holds as many instances as they say they
        hold, waiting up to `sender_count_wait_seconds` after the last instance (0: quiet alone decides).
        `fetch_timeout_seconds`: a fetch's C-MOVE ends by then, so its study's series wait no longer than twice it.
        """
        self.index = index
        self.our_ae_title = our_ae_title
        self.sender_count_wait_seconds = sender_count_wait_seconds
        self.fetch_wait = dt.timedelta(seconds=2 * fetch_timeout_seconds + _RETRY_HORIZON_SECONDS)
        self._peers = {peer.ae_title: (name, peer) for name, peer in (peers or {}).items()}
        # The senders are asked off the stage thread (a PACS that does not answer must not hold up the completion
        # and routing of every other series), once per study, and again every _ASK_AGAIN_SECONDS while it waits.
        self._askers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sender-count")
        self._asked: dict[str, _Asked] = {}  # study UID -> the last question and answer

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
        sender = (select(func.min(_instances.c.calling_ae_title)).where(_instances.c.series_id == _series.c.id)
                  .scalar_subquery().label("sender"))
        columns = (_series.c.id, _series.c.series_instance_uid, _series.c.modality, _series.c.state_reason,
                   _series.c.reprocess_requested, _series.c.late_instances, _series.c.last_received_at,
                   _studies.c.study_instance_uid, counts, sender)
        with self.index.engine.connect() as connection:
            candidates = connection.execute(
                select(*columns)
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_series.c.state == SeriesState.RECEIVING.value, _series.c.last_received_at < cutoff)
            ).all()
            # Fetches under way, or between attempts after a transient failure, started recently enough.
            fetching = dict(connection.execute(
                select(_fetches.c.study_instance_uid, _fetches.c.id)
                .where(or_(_fetches.c.state == FetchState.FETCHING.value,
                           and_(_fetches.c.state == FetchState.QUEUED.value, _fetches.c.attempts > 0)),
                       _fetches.c.started_at >= now - self.fetch_wait)
            ).all())
            # Series that began arriving during a C-MOVE of their study, and were last added to before it ended:
            # the peer sent them whole.  (A series another sender pushed before the move is not one of them.)
            moved = connection.execute(
                select(*columns, _fetches.c.finished_at.label("moved_at"))
                .join(_studies, _studies.c.id == _series.c.study_id)
                .join(_fetches, _fetches.c.study_instance_uid == _studies.c.study_instance_uid)
                .where(_series.c.state == SeriesState.RECEIVING.value, _fetches.c.state == FetchState.DONE.value,
                       _series.c.first_received_at >= _fetches.c.started_at,
                       _series.c.last_received_at <= _fetches.c.finished_at)
            ).all()
        ends = {row.id: row.moved_at for row in moved}
        moved = list({row.id: row for row in moved}.values())
        candidates = [*moved, *(row for row in candidates if row.id not in ends)]
        self._forget_studies_not_in(candidates)
        refusals = self._outstanding_refusals({row.series_instance_uid for row in candidates}) if candidates else {}
        give_up = now - dt.timedelta(seconds=refused_wait_seconds)
        completed = []
        for row in candidates:
            refused = refusals.get(row.series_instance_uid)
            if refused is not None and refused.last_refused_at >= give_up:
                self._wait_for_refused(row, refused.count, stable_seconds)
                continue
            if row.id not in ends and row.study_instance_uid in fetching:
                self._wait_for_move(row, fetching[row.study_instance_uid], stable_seconds)
                continue
            missing = (f"{refused.count} refused instance(s) were not re-sent within series.refused_wait_seconds = "
                       f"{refused_wait_seconds:g} s" if refused is not None else None)
            signal = ("the peer's C-MOVE of the study has ended" if row.id in ends
                      else f"no new instance for {stable_seconds:g} s")
            told = None if row.id in ends else self._sender_count(row)
            in_time = now - row.last_received_at < dt.timedelta(seconds=self.sender_count_wait_seconds)
            if told is not None:
                name, holds = told
                if (holds is None or holds > row.instances) and in_time:
                    self._wait_for_sender(row, name, holds)
                    continue
                if holds is not None and holds > row.instances:
                    missing = (f"its sender {name} holds {holds} instance(s) of the series, and {holds - row.instances}"
                               " of them were not stored here within series.sender_count_wait_seconds (not sent, or "
                               "refused: see the series' events)")
                signal += f", and the sender {name} holds {holds}" if holds is not None else ""
            with self.index.write_transaction() as connection:
                changed = connection.execute(
                    update(_series)
                    .where(
                        _series.c.id == row.id,
                        _series.c.state == SeriesState.RECEIVING.value,
                        _series.c.last_received_at <= ends[row.id] if row.id in ends
                        else _series.c.last_received_at < cutoff,
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
                        EventKind.SERIES_INCOMPLETE,
                        f"{missing}: the series completes with the {row.instances} instance(s) it has",
                        Level.WARNING,
                        **uids,
                    )
                note = f"; {row.late_instances} late instance(s), re-processing requested" if row.reprocess_requested else ""
                insert_event(
                    connection,
                    EventKind.COMPLETE,
                    f"series complete: {row.instances} instance(s), {signal}{note}",
                    **uids,
                )
            log.info(
                "series %s of study %s complete: %d instance(s) (%s)%s",
                row.series_instance_uid,
                row.study_instance_uid,
                row.instances,
                row.modality or "?",
                ", re-processing requested" if row.reprocess_requested else "",
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
        with self.index.engine.connect() as connection:
            held = series_uids & set(connection.execute(select(_refused.c.series_instance_uid).distinct()).scalars())
            if not held:
                return {}
            of_held = _refused.c.series_instance_uid.in_(held)
            stored = exists().where(_instances.c.sop_instance_uid == _refused.c.sop_instance_uid)
            settled = connection.execute(select(func.count()).select_from(_refused).where(of_held, stored)).scalar_one()
        with self.index.write_transaction() as connection:
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

    def _sender_count(self, series: Row) -> tuple[str, int | None] | None:
        """(peer name, instances it holds of the series; None while it has not answered yet) when the series came
        from a configured peer; None when quiet alone decides (no such peer, or it never answered)."""
        if not self.sender_count_wait_seconds or series.sender not in self._peers:
            return None
        name, peer = self._peers[series.sender]
        asked = self._asked.get(series.study_instance_uid)
        if asked is not None and asked.answer.done() and not asked.failed:
            try:
                asked.counts = asked.answer.result()
            except Exception as exc:  # a peer that cannot answer leaves its last answer, or quiet, to decide
                asked.failed = asked.counts is None
                if asked.failed:
                    log.warning("study %s: cannot ask its sender %s how many instances it holds (%s); quiet "
                                "decides", series.study_instance_uid, name, exc)
        if asked is not None and asked.failed:
            return None
        if asked is None or (asked.answer.done() and time.monotonic() - asked.at >= _ASK_AGAIN_SECONDS):
            answer = self._askers.submit(series_counts, self.our_ae_title, name, peer, series.study_instance_uid)
            asked = self._asked[series.study_instance_uid] = _Asked(time.monotonic(), answer,
                                                                    asked.counts if asked else None)
        if asked.counts is None:
            return name, None  # the first question is under way
        holds = asked.counts.get(series.series_instance_uid)
        return None if holds is None else (name, holds)

    def _forget_studies_not_in(self, candidates: list[Row]) -> None:
        waiting = {row.study_instance_uid for row in candidates}
        for study in [study for study in self._asked if study not in waiting]:
            del self._asked[study]

    def _wait_for_sender(self, series: Row, name: str, holds: int | None) -> None:
        if holds is None:  # the first question is under way: shown in `series`, not worth an event
            self._wait(series, f"asking its sender {name} how many instances it holds", None)
            return
        self._wait(series, f"waiting for {holds - series.instances} of the {holds} instance(s) its sender {name} holds",
                   f"series quiet, but its sender {name} holds {holds} instance(s) of it and {series.instances} "
                   "arrived: it completes once the rest arrive, or without them after "
                   "series.sender_count_wait_seconds")

    def _wait_for_move(self, series: Row, fetch_id: int, stable_seconds: float) -> None:
        self._wait(series, f"waiting for the C-MOVE of fetch F{fetch_id} to end",
                   f"series quiet for {stable_seconds:g} s while its study is being fetched (F{fetch_id}): it "
                   "completes when the peer's C-MOVE ends, however long the peer pauses")

    def _wait_for_refused(self, series: Row, count: int, stable_seconds: float) -> None:
        self._wait(series, f"waiting for {count} refused instance(s) to be re-sent",
                   f"series quiet for {stable_seconds:g} s, but {count} of its instance(s) were refused (disk full or "
                   "a processing failure) and not sent again; it completes once they arrive, or without them after "
                   "series.refused_wait_seconds", Level.WARNING)

    def _wait(self, series: Row, reason: str, message: str | None, level: Level = Level.INFO) -> None:
        """Say (once per change of `reason`) why a quiet series is not complete yet: in `series` and, with
        `message`, in a `series-waiting` event."""
        if series.state_reason == reason:
            return
        with self.index.write_transaction() as connection:
            connection.execute(
                update(_series)
                .where(_series.c.id == series.id, _series.c.state == SeriesState.RECEIVING.value)
                .values(state_reason=reason)
            )
            if message is not None:
                insert_event(connection, EventKind.SERIES_WAITING, message, level,
                             study_instance_uid=series.study_instance_uid,
                             series_instance_uid=series.series_instance_uid)


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
