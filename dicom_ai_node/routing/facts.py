"""What routing knows of a series: its indexed columns, plus how it was acquired, from one instance's header.

MR sequence attributes, contrast and slice thickness are not indexed (only routing reads them), so they come
from the header of the series' first instance, read without its pixels, once per completion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Connection, select

from dicom_ai_node.store.models import Instance, Series
from dicom_ai_node.values import SequenceFacts, SeriesFacts

log = logging.getLogger(__name__)

_SEQUENCE_KEYWORDS = (
    "ScanningSequence", "SequenceVariant", "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent",
    "SliceThickness", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
)


def series_facts(connection: Connection, storage_root: Path, series_id: int) -> SeriesFacts:
    series = connection.execute(
        select(Series.series_instance_uid, Series.modality, Series.body_part_examined, Series.series_description,
               Series.series_number).where(Series.id == series_id)
    ).one()
    instances = connection.execute(
        select(Instance.sop_class_uid, Instance.image_type, Instance.file_path)
        .where(Instance.series_id == series_id)
        .order_by(Instance.id)
    ).all()
    return SeriesFacts(
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        series_description=series.series_description,
        sop_class_uids=frozenset(i.sop_class_uid for i in instances),
        image_types=frozenset(i.image_type for i in instances if i.image_type),
        instances=len(instances),
        sequence=read_sequence(storage_root / instances[0].file_path) if instances else SequenceFacts(),
        series_number=series.series_number,
    )


def read_sequence(path: Path) -> SequenceFacts:
    """The acquisition attributes in one instance's header (an Enhanced MR's in its shared functional groups are
    not read: roles on them match by description and image type); empty when the file cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_SEQUENCE_KEYWORDS))
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning("cannot read %s for routing: %s", path, exc)
        return SequenceFacts()
    return SequenceFacts(
        scanning_sequence=_codes(ds, "ScanningSequence"),
        sequence_variant=_codes(ds, "SequenceVariant"),
        echo_time=_number(ds, "EchoTime"),
        repetition_time=_number(ds, "RepetitionTime"),
        inversion_time=_number(ds, "InversionTime"),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip() or None,
        slice_thickness=_number(ds, "SliceThickness"),
        acquired=str(ds.get("SeriesDate") or ds.get("AcquisitionDate") or "")
        + str(ds.get("SeriesTime") or ds.get("AcquisitionTime") or ""),
    )


def _codes(ds: Dataset, keyword: str) -> frozenset[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return frozenset()
    values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
    return frozenset(str(code).strip().upper() for code in values if str(code).strip())


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None
