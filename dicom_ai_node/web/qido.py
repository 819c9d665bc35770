"""QIDO-RS: the query of a request, and the matching studies, series and instances from the index.

Received instances and the node's own results (SEG, SR in `result_objects`) are
searched as one archive, so a viewer using the node as its data source finds the
SEG next to the CT it was computed from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import Engine, Row, Subquery, and_, func, select
from starlette.requests import Request

from dicom_ai_node.store.models import ResultObject, Study
from dicom_ai_node.store.queries import all_instances, all_series, study_attributes, summarize_studies
from dicom_ai_node.web.dicom_json import dicom_json
from dicom_ai_node.web.problem import HTTPProblem

_studies = Study.__table__
_results = ResultObject.__table__


def _keyword(key: str) -> str | None:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or None
    return key


def _values(raw: list[str]) -> list[str]:
    """UID lists come as repeated parameters, comma- or backslash-separated."""
    return [value.strip() for item in raw for value in re.split(r"[,\\]", item) if value.strip()]


def _like(column, pattern: str):
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    escaped = escaped.replace("*", "%").replace("?", "_")
    return func.lower(column).like(escaped.lower(), escape="\\")


def _text_match(column, value: str, case_insensitive: bool = False):
    if "*" in value or "?" in value:
        return _like(column, value)
    return func.lower(column) == value.lower() if case_insensitive else column == value


def _date_range(column, value: str):
    if not re.fullmatch(r"[0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8}", value):
        raise HTTPProblem(400, f"StudyDate {value!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    if "-" not in value:
        return column == value
    low, high = value.split("-")
    return and_(*([column >= low] if low else []), *([column <= high] if high else []))


MATCHING_KEYS = frozenset({
    "PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyInstanceUID", "ModalitiesInStudy",
    "Modality", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
})


# Integer value representations and the values they hold (PS3.5 6.2): a query value outside them is a
# 400.  The keys matched in SQL are IS, whose range the database's integers hold, so none overflows there.
_INTEGER_VRS = {
    "IS": (-(2**31), 2**31 - 1), "SL": (-(2**31), 2**31 - 1), "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1), "US": (0, 2**16 - 1), "SV": (-(2**63), 2**63 - 1), "UV": (0, 2**64 - 1),
}
_PAGING = (0, 2**63 - 1)  # limit and offset: SQLite's and PostgreSQL's BIGINT
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # DICOM strings hold no control characters but ESC


def _integer(name: str, value: str, low: int, high: int) -> int:
    """`value` (an IS-style integer: optional sign, padding spaces) within [low, high]; else 400."""
    text = value.strip(" ")
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", text) or not low <= int(text) <= high:
        raise HTTPProblem(400, f"{name} must be an integer from {low} to {high}, not {value[:40]!r}")
    return int(text)


def _printable(key: str) -> str:
    """A query key as it may appear in a header: control and non-ASCII characters escaped, no quotes."""
    return ascii(key)[1:-1].replace('"', "'")


@dataclass(frozen=True)
class Query:
    """A QIDO-RS query: matching keys by keyword, paging; keys the index cannot match are listed in `ignored`."""

    match: dict[str, list[str]]
    limit: int
    offset: int
    ignored: tuple[str, ...] = ()

    def warning(self) -> str | None:
        """A Warning header (PS3.18 8.1.5) naming the matching keys that were ignored."""
        if not self.ignored:
            return None
        keys = ", ".join(_printable(key) for key in self.ignored)
        return f'299 dicom-ai-node "matching on {keys} is not supported and was ignored"'

    @classmethod
    def from_request(cls, request: Request, max_results: int) -> Query:
        """The query of `request`; 400 for a value no attribute can hold (out of range, control characters)."""
        match: dict[str, list[str]] = {}
        ignored: list[str] = []
        limit, offset = max_results, 0
        for key, value in request.query_params.multi_items():
            if _CONTROL.search(key) or _CONTROL.search(value):
                raise HTTPProblem(400, f"query parameter {_printable(key)}: control characters are not allowed")
            if key in ("limit", "offset"):
                number = _integer(key, value, *_PAGING)
                if key == "limit":
                    limit = min(number, max_results)
                else:
                    offset = number
                continue
            if key in ("includefield", "fuzzymatching"):
                continue  # every attribute the index holds is returned anyway
            keyword = _keyword(key)
            vr = dictionary_VR(keyword) if keyword and tag_for_keyword(keyword) else None
            if vr in _INTEGER_VRS and value != "":
                value = str(_integer(keyword, value, *_INTEGER_VRS[vr]))
            if keyword in MATCHING_KEYS:
                if value != "":
                    match.setdefault(keyword, []).append(value)
            else:
                ignored.append(key)
        return cls(match, limit, offset, tuple(ignored))

    def one(self, keyword: str) -> str | None:
        values = self.match.get(keyword)
        return values[0] if values else None


def _study_conditions(query: Query, every_series: Subquery) -> list:
    conditions = []
    for keyword, column in (("PatientID", _studies.c.patient_id), ("AccessionNumber", _studies.c.accession_number)):
        if (value := query.one(keyword)) is not None:
            conditions.append(_text_match(column, value))
    if (value := query.one("PatientName")) is not None:
        conditions.append(_text_match(_studies.c.patient_name, value, case_insensitive=True))
    if (value := query.one("StudyDate")) is not None:
        conditions.append(_date_range(_studies.c.study_date, value))
    if uids := _values(query.match.get("StudyInstanceUID", [])):
        conditions.append(_studies.c.study_instance_uid.in_(uids))
    if modalities := _values(query.match.get("ModalitiesInStudy", [])):
        with_modality = select(every_series.c.study_uid).where(every_series.c.modality.in_(modalities))
        conditions.append(_studies.c.study_instance_uid.in_(with_modality))
    return conditions


def _study_fields(row: Row[Any]) -> dict[str, Any]:
    """The study attributes returned with each series: those a study summary has, and StudyTime."""
    return {**study_attributes(row), "StudyTime": row.study_time}


class Qido:
    """QIDO-RS answers from the index; attributes the index does not hold for a result come from its file."""

    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.root = storage_root

    def search_studies(self, query: Query, base_url: str) -> list[dict[str, Any]]:
        statement = (
            select(_studies)
            .where(*_study_conditions(query, all_series()))
            .order_by(_studies.c.id)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            summaries = summarize_studies(connection, statement, with_results=True)
        return [
            dicom_json(
                {
                    **summary.attributes(),
                    "StudyTime": summary.study.study_time,
                    "RetrieveURL": f"{base_url}/studies/{summary.study.study_instance_uid}",
                }
            )
            for summary in summaries
        ]

    def search_series(self, query: Query, base_url: str, study_uid: str | None) -> list[dict[str, Any]]:
        every_series = all_series()
        conditions = _study_conditions(query, every_series)
        if study_uid:
            conditions.append(_studies.c.study_instance_uid == study_uid)
        if modalities := _values(query.match.get("Modality", [])):
            conditions.append(every_series.c.modality.in_(modalities))
        if uids := _values(query.match.get("SeriesInstanceUID", [])):
            conditions.append(every_series.c.series_uid.in_(uids))
        statement = (
            select(every_series, _studies)
            .join(_studies, _studies.c.study_instance_uid == every_series.c.study_uid)
            .where(*conditions)
            .order_by(_studies.c.id, every_series.c.produced, every_series.c.series_number, every_series.c.series_uid)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
            first_files = self._first_files(connection, [row.series_uid for row in rows if row.produced])
        answer = []
        for row in rows:
            fields = {
                **_study_fields(row),
                "SeriesInstanceUID": row.series_uid,
                "Modality": row.modality,
                "SeriesNumber": row.series_number,
                "SeriesDescription": row.series_description,
                "NumberOfSeriesRelatedInstances": row.instances,
                "RetrieveURL": f"{base_url}/studies/{row.study_uid}/series/{row.series_uid}",
            }
            if row.produced:
                header = _header(self.root / first_files[row.series_uid])
                fields.update({key: header.get(key) for key in ("SeriesNumber", "SeriesDescription")})
            answer.append(dicom_json(fields))
        return answer

    @staticmethod
    def _first_files(connection, series_uids: list[str]) -> dict[str, str]:
        if not series_uids:
            return {}
        rows = connection.execute(
            select(_results.c.series_instance_uid, func.min(_results.c.file_path))
            .where(_results.c.series_instance_uid.in_(series_uids))
            .group_by(_results.c.series_instance_uid)
        ).all()
        return dict(rows)

    def search_instances(
        self, query: Query, base_url: str, study_uid: str | None, series_uid: str | None
    ) -> list[dict[str, Any]]:
        every_instance = all_instances()
        conditions = []
        for keyword, column, given in (
            ("StudyInstanceUID", every_instance.c.study_uid, study_uid),
            ("SeriesInstanceUID", every_instance.c.series_uid, series_uid),
            ("SOPInstanceUID", every_instance.c.sop_uid, None),
            ("SOPClassUID", every_instance.c.sop_class_uid, None),
            ("Modality", every_instance.c.modality, None),
        ):
            if given:
                conditions.append(column == given)
            elif values := _values(query.match.get(keyword, [])):
                conditions.append(column.in_(values))
        if (value := query.one("InstanceNumber")) is not None:  # an integer in IS's range (Query)
            conditions.append(every_instance.c.instance_number == int(value))
        statement = (
            select(every_instance)
            .where(*conditions)
            .order_by(every_instance.c.study_uid, every_instance.c.series_uid, every_instance.c.instance_number,
                      every_instance.c.sop_uid)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        answer = []
        for row in rows:
            fields = {
                "StudyInstanceUID": row.study_uid,
                "SeriesInstanceUID": row.series_uid,
                "SOPClassUID": row.sop_class_uid,
                "SOPInstanceUID": row.sop_uid,
                "Modality": row.modality,
                "InstanceNumber": row.instance_number,
                "Rows": row.rows,
                "Columns": row.columns,
                "NumberOfFrames": row.number_of_frames,
                "RetrieveURL": f"{base_url}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}",
            }
            if row.produced:
                header = _header(self.root / row.file_path)
                fields.update({key: header.get(key) for key in ("InstanceNumber", "Rows", "Columns", "NumberOfFrames")})
            answer.append(dicom_json(fields))
        return answer

@lru_cache(maxsize=4096)
def _header(path: Path) -> dict[str, Any]:
    """Series and image attributes of a result file (the table holds only its UIDs); files never change."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {key: ds.get(key) for key in ("SeriesNumber", "SeriesDescription", "InstanceNumber", "Rows", "Columns",
                                         "NumberOfFrames")}

