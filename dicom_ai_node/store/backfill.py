"""Start-up backfill of the QIDO-RS attributes migration 0008 added, for series indexed before it.

Ingest fills them for every instance it receives since; the rows indexed before
have NULL there and `series.query_attributes_indexed` NULL.  At start-up, before
anything is served, one stored file per such series (its first instance) is read,
header only, and the series, its Request Attributes Sequence items and any study
column still NULL are filled from it.  That is bounded (one small read per series,
done once), and QIDO-RS then matches old studies like new ones.  Bits Allocated of
instances is not backfilled: QIDO-RS reads it from the file of an image whose row
lacks it (web/qido.py).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Engine, func, select, update

from dicom_ai_node.store.models import Instance, RequestAttribute, Series, Study

log = logging.getLogger(__name__)

_STUDY_KEYWORDS = {
    "study_id": "StudyID",
    "referring_physician_name": "ReferringPhysicianName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "timezone_offset_from_utc": "TimezoneOffsetFromUTC",
    "specific_character_set": "SpecificCharacterSet",
}
_SERIES_KEYWORDS = {
    "performed_procedure_step_start_date": "PerformedProcedureStepStartDate",
    "performed_procedure_step_start_time": "PerformedProcedureStepStartTime",
}
_BATCH = 500


def _text(ds: Dataset, keyword: str) -> str | None:
    """The value as ingest indexes it (web/qido.py matches it): text, multiple values joined by a backslash."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
    return "\\".join(str(item).strip() for item in values) or None


def backfill_query_attributes(engine: Engine, root: Path) -> int:
    """Fill the 0008 attributes of series indexed before it from one of their files; returns how many series."""
    done = 0
    while True:
        with engine.connect() as connection:
            pending = connection.execute(
                select(Series.id, Series.study_id, func.min(Instance.file_path).label("file_path"))
                .outerjoin(Instance, Instance.series_id == Series.id)
                .where(Series.query_attributes_indexed.is_(None))
                .group_by(Series.id, Series.study_id)
                .limit(_BATCH)
            ).all()
        if not pending:
            break
        for row in pending:
            _backfill_series(engine, root, row.id, row.study_id, row.file_path)
        done += len(pending)
    if done:
        log.info("filled the QIDO-RS attributes of %d series indexed before migration 0008 from their files", done)
    return done


def _backfill_series(engine: Engine, root: Path, series_id: int, study_id: int, file_path: str | None) -> None:
    ds = _read_header(root / file_path) if file_path else None
    with engine.begin() as connection:
        values: dict[str, object] = {"query_attributes_indexed": True}
        if ds is not None:
            values.update({column: _text(ds, keyword) for column, keyword in _SERIES_KEYWORDS.items()})
            items = [
                {"series_id": series_id, "scheduled_procedure_step_id": _text(item, "ScheduledProcedureStepID"),
                 "requested_procedure_id": _text(item, "RequestedProcedureID")}
                for item in ds.get("RequestAttributesSequence") or ()
            ]
            if items:
                connection.execute(RequestAttribute.__table__.insert(), items)
            for column, keyword in _STUDY_KEYWORDS.items():  # only where still NULL: never overwrite ingest's
                if (value := _text(ds, keyword)) is not None:
                    still_null = getattr(Study, column).is_(None)
                    connection.execute(update(Study).where(Study.id == study_id, still_null).values({column: value}))
        connection.execute(update(Series).where(Series.id == series_id).values(values))


def _read_header(path: Path) -> Dataset | None:
    """The header of a stored file; None if it is gone or unreadable (the series then keeps NULLs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for a damaged file; the backfill must not stop start-up
        log.warning("cannot read %s to fill its series' QIDO-RS attributes: %s", path, exc)
        return None
