"""Start-up repair of what a crash (kill -9, power cut) leaves between the index and the files.

Receiving commits an instance's row while its file is still being written (the
two overlap; Success waits for both).  A crash in between leaves a row without
its file, a whole file without its row, or a temporary file; none of them was
acknowledged, so the sender still holds the instance and sends it again.  At
start-up, before the SCP listens:

- a row without its file is removed (an `instance-lost` event names the sender),
  so the index lists only what is on disk and the re-send is stored as new;
- a whole `.dcm` without a row is deleted: it was never acknowledged, and indexing
  it from the file would mean trusting a copy nobody vouched for over the one the
  sender sends again (the receive path likewise replaces such a file);
- `*.tmp` files are deleted, among them the STOW-RS parts still arriving (`.incoming`).

A hospital archive holds millions of files, so the tree is not walked: only the
folders of series that received something in the `WINDOW` before the newest
instance (a crash can only cut short writes in flight), every series folder of
studies whose jobs were running (their results are written there), and the
workers' status folder.  More rows without files than a crash can leave (one
per instance in flight: `max_in_flight`), or a storage folder without a single
study in it while the index has some, mean something else happened (storage not
mounted, files deleted by hand): those rows are kept and the check reports an
error instead.  One `start-up-check` event
says what was done; `status` shows the last one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, Row, func, select

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store.files import INCOMING, path_component
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Event, Instance, Job, JobState, ResultObject, Series, Study

log = logging.getLogger(__name__)

# Longer than any single instance takes to write, even a multi-GB one on a slow disk.
WINDOW = dt.timedelta(hours=1)
EVENT_KIND = EventKind.START_UP_CHECK
_WORKERS_FOLDER = ".workers"  # see worker.py: worker_status_folder
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass
class Repair:
    series_checked: int = 0
    folders_checked: int = 0
    rows_checked: int = 0
    rows_removed: list[str] = field(default_factory=list)
    rows_kept_without_file: int = 0  # too many to be a crash's: left alone, reported as an error
    temporary_files: int = 0
    unacknowledged_files: int = 0

    def summary(self) -> str:
        scope = (f"{self.series_checked} series received in the {WINDOW.total_seconds() / 3600:g} h before the "
                 f"last instance, {self.folders_checked} folder(s)")
        repairs = [
            (len(self.rows_removed), "removed {} index row(s) without a file (their senders must send them again)"),
            (self.temporary_files, "deleted {} temporary file(s)"),
            (self.unacknowledged_files, "deleted {} unacknowledged file(s) without an index row"),
        ]
        done = [text.format(count) for count, text in repairs if count]
        if self.rows_kept_without_file:
            done.insert(0, f"{self.rows_kept_without_file} of {self.rows_checked} index rows have no file, more than "
                           "a crash leaves: nothing removed (is the storage mounted? were files deleted?)")
        return f"start-up check of {scope}: " + ("; ".join(done) if done else "nothing to repair")

    @property
    def level(self) -> str:
        if self.rows_kept_without_file:
            return "error"
        return Level.WARNING if self.rows_removed or self.temporary_files or self.unacknowledged_files else Level.INFO


def reconcile(engine: Engine, root: Path, max_in_flight: int) -> Repair:
    """Make rows and files agree again where a crash can have left them apart; see the module docstring.

    `max_in_flight`: how many instances the node can be writing at once (a crash cuts short no more).
    """
    repair = Repair()
    with engine.connect() as connection:
        newest = connection.execute(select(func.max(Series.last_received_at))).scalar()
        recent = connection.execute(
            select(Series.id, Series.series_instance_uid, Study.study_instance_uid)
            .join(Study, Study.id == Series.study_id)
            .where(Series.last_received_at >= newest - WINDOW)
        ).all() if newest else []
        busy_studies = connection.execute(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Job, Job.series_id == Series.id)
            .where(Job.state == JobState.RUNNING.value)
            .distinct()
        ).scalars().all()
    lost = [(series, row) for series in recent for row in _check_series(engine, root, series, repair)]
    repair.series_checked = len(recent)
    if lost and (len(lost) > max_in_flight or not _holds_a_study(root)):
        repair.rows_kept_without_file = len(lost)
    else:
        for series, row in lost:
            _remove_row(engine, series, row)
            repair.rows_removed.append(row.sop_instance_uid)
    for study in busy_studies:
        for folder in _subfolders(root / path_component(study)):
            repair.temporary_files += _delete_temporary(folder)
            repair.folders_checked += 1
    repair.temporary_files += _delete_temporary(root / _WORKERS_FOLDER)
    repair.temporary_files += _delete_temporary(root / INCOMING)
    message = repair.summary()
    log.log(_LOG_LEVELS[repair.level], "%s", message)
    with engine.begin() as connection:
        insert_event(connection, EVENT_KIND, message, repair.level)
    return repair


def _check_series(engine: Engine, root: Path, series: Row, repair: Repair) -> list[Row]:
    """Delete the series folder's leftovers; returns its rows without a file."""
    folder = root / path_component(series.study_instance_uid) / path_component(series.series_instance_uid)
    names = set(_listdir(folder))
    repair.folders_checked += 1
    with engine.connect() as connection:
        rows = connection.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.file_path, Instance.calling_ae_title,
                   Instance.calling_host, Instance.source, Instance.received_at)
            .where(Instance.series_id == series.id)
        ).all()
        # A result is never deleted here, even in a folder that also holds received instances.
        results = connection.execute(
            select(ResultObject.file_path).where(ResultObject.series_instance_uid == series.series_instance_uid)
        ).scalars().all()
    repair.rows_checked += len(rows)
    known = {root / path for path in [row.file_path for row in rows] + list(results)}
    for name in names:
        if name.endswith(".tmp"):
            repair.temporary_files += _unlink(folder / name)
        elif name.endswith(".dcm") and folder / name not in known:
            log.warning("deleting %s: a whole file whose index row was never committed (not acknowledged)",
                        folder / name)
            repair.unacknowledged_files += _unlink(folder / name)
    # A row's file is where the row says: an instance of this series may sit under another study's folder.
    return [row for row in rows if not (root / row.file_path).exists()]


def _remove_row(engine: Engine, series: Row, row: Row) -> None:
    sender = f"{row.calling_ae_title or '?'}@{row.calling_host or '?'} ({row.source})"
    message = (
        f"instance {row.sop_instance_uid} from {sender}, indexed at {row.received_at:%Y-%m-%d %H:%M:%S} UTC, has no "
        "file: the node stopped while writing it, before answering Success; the row is removed so that the "
        "sender's re-send is stored"
    )
    log.warning("%s", message)
    with engine.begin() as connection:
        connection.execute(Instance.__table__.delete().where(Instance.id == row.id))
        insert_event(
            connection,
            EventKind.INSTANCE_LOST,
            message,
            Level.WARNING,
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
            calling_ae_title=row.calling_ae_title,
        )


def _holds_a_study(root: Path) -> bool:
    """Whether the storage folder has at least one study folder (hidden ones are the node's own)."""
    return any(not name.startswith(".") and (root / name).is_dir() for name in _listdir(root))


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _subfolders(folder: Path) -> list[Path]:
    return [folder / name for name in _listdir(folder) if (folder / name).is_dir()]


def _delete_temporary(folder: Path) -> int:
    return sum(_unlink(folder / name) for name in _listdir(folder) if name.endswith(".tmp"))


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def last_check(engine: Engine) -> dict | None:
    """The last start-up check: when, and what it repaired (None before the first start)."""
    with engine.connect() as connection:
        event = connection.execute(
            select(Event.at, Event.level, Event.message)
            .where(Event.kind == EVENT_KIND)
            .order_by(Event.id.desc())
            .limit(1)
        ).first()
    if event is None:
        return None
    return {"at": event.at.isoformat(timespec="seconds") + "Z", "level": event.level, "message": event.message}
