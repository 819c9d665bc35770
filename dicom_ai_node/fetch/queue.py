"""The fetch queue in SQL: studies asked for, retrieved one at a time, resumed after a restart."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, update

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.fetch.dimse import FoundStudy, Moved
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Fetch, FetchState, utcnow

_fetches = Fetch.__table__
# A transient failure is tried again this many times, waiting twice as long each time, then the fetch fails.
_TRIES = 5
_FIRST_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class ClaimedFetch:
    id: int
    peer: str
    study_instance_uid: str
    expected_instances: int | None
    attempts: int  # this one included


class FetchQueue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def request(self, peer: str, studies: list[FoundStudy], asked: str, again: bool = False) -> tuple[int, int]:
        """Queue the studies; one already queued, being fetched or fetched from this peer is left alone unless
        `again`.  Returns (queued, left alone)."""
        queued = skipped = 0
        now = utcnow()
        with self.engine.begin() as connection:
            for study in studies:
                rows = connection.execute(
                    select(Fetch.id, Fetch.state)
                    .where(Fetch.peer == peer, Fetch.study_instance_uid == study.study_instance_uid)
                ).all()
                states = {row.state for row in rows}
                if (states & {FetchState.QUEUED.value, FetchState.FETCHING.value}
                        or (FetchState.DONE.value in states and not again)):
                    skipped += 1
                    continue
                values = dict(accession_number=study.accession_number, study_date=study.study_date,
                              modalities=study.modalities, expected_instances=study.instances, asked=asked,
                              state=FetchState.QUEUED.value, attempts=0, error=None, requested_at=now,
                              next_attempt_at=now, finished_at=None)
                again_of = [row.id for row in rows if row.state == FetchState.FAILED.value]
                if again_of:  # one row per study and peer: a failed one is asked for again, not copied
                    connection.execute(update(_fetches).where(_fetches.c.id == again_of[0]).values(**values))
                else:
                    connection.execute(_fetches.insert().values(
                        peer=peer, study_instance_uid=study.study_instance_uid, **values))
                queued += 1
            insert_event(connection, EventKind.FETCH_REQUESTED,
                         f"fetch from {peer} ({asked}): {len(studies)} study(ies) found, {queued} queued"
                         + (f", {skipped} already queued or fetched" if skipped else ""))
        return queued, skipped

    def requeue_interrupted(self) -> int:
        """Fetches left `fetching` by a node that stopped are queued again (what arrived is kept: the peer's second
        C-MOVE sends it again and ingest skips what it holds)."""
        with self.engine.begin() as connection:
            return connection.execute(
                update(_fetches).where(_fetches.c.state == FetchState.FETCHING.value)
                .values(state=FetchState.QUEUED.value, error="re-queued: the node stopped while it was fetching")
            ).rowcount

    def started_since(self, since: dt.datetime) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).where(Fetch.started_at >= since)).scalar_one()

    def claim(self) -> ClaimedFetch | None:
        """Take the oldest queued fetch whose time has come."""
        oldest = (select(_fetches.c.id)
                  .where(_fetches.c.state == FetchState.QUEUED.value, _fetches.c.next_attempt_at <= utcnow())
                  .order_by(_fetches.c.id).limit(1).scalar_subquery())
        with self.engine.begin() as connection:
            row = connection.execute(
                update(_fetches).where(_fetches.c.id == oldest, _fetches.c.state == FetchState.QUEUED.value)
                .values(state=FetchState.FETCHING.value, started_at=utcnow(), attempts=_fetches.c.attempts + 1)
                .returning(_fetches.c.id, _fetches.c.peer, _fetches.c.study_instance_uid,
                           _fetches.c.expected_instances, _fetches.c.attempts)
            ).first()
        return None if row is None else ClaimedFetch(*row)

    def record(self, fetch: ClaimedFetch, moved: Moved) -> FetchState:
        """Done; or queued again after a wait if the failure may pass and tries are left; else failed."""
        now = utcnow()
        again = moved.transient and fetch.attempts < _TRIES
        state = FetchState.DONE if moved.ok else FetchState.QUEUED if again else FetchState.FAILED
        wait = _FIRST_WAIT_SECONDS * 2 ** (fetch.attempts - 1)
        with self.engine.begin() as connection:
            connection.execute(
                update(_fetches).where(_fetches.c.id == fetch.id).values(
                    state=state.value, completed=moved.completed, failed=moved.failed, error=moved.reason,
                    finished_at=None if again else now, next_attempt_at=now + dt.timedelta(seconds=wait)))
            what = f"fetch F{fetch.id} from {fetch.peer}"
            if again:
                insert_event(connection, EventKind.FETCH_FAILED,
                             f"{what}: attempt {fetch.attempts} of {_TRIES} failed: {moved.reason}; tried again in "
                             f"{wait:.0f} s", Level.WARNING, study_instance_uid=fetch.study_instance_uid)
            elif moved.ok:
                expected = f" of {fetch.expected_instances}" if fetch.expected_instances is not None else ""
                message = f"{what}: {moved.completed}{expected} instance(s) moved" + (
                    f"; {moved.reason}" if moved.reason else "")
                insert_event(connection, EventKind.FETCH_DONE, message,
                             Level.WARNING if moved.failed else Level.INFO,
                             study_instance_uid=fetch.study_instance_uid)
            else:
                insert_event(connection, EventKind.FETCH_FAILED,
                             f"{what} failed after {fetch.attempts} attempt(s): {moved.reason}; queue it again "
                             f"with: dicom-ai-node retry F{fetch.id}",
                             Level.ERROR, study_instance_uid=fetch.study_instance_uid)
        return state

    def retry(self, fetch_id: int | None = None) -> int:
        """Queue failed fetches again now, with fresh tries (one, or all when None)."""
        which = [_fetches.c.state == FetchState.FAILED.value]
        if fetch_id is not None:
            which.append(_fetches.c.id == fetch_id)
        with self.engine.begin() as connection:
            return connection.execute(
                update(_fetches).where(*which).values(state=FetchState.QUEUED.value, error=None, finished_at=None,
                                                      attempts=0, next_attempt_at=utcnow())
            ).rowcount
