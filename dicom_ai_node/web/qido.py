"""QIDO-RS: the query of a request, and the matching studies, series and instances from the index.

Received instances and the node's own results (SEG, SR in `result_objects`) are
searched as one archive, so a viewer using the node as its data source finds the
SEG next to the CT it was computed from.

Matching (PS3.18 10.6.1.2, PS3.4 C.2.2.2): every required matching key of PS3.18
Table 10.6.1-5 at its level and at every level below it (PatientID at /series and
/instances).  A key the node cannot match is a 400 naming it: ignoring it would widen
the answer to other patients' studies.  An empty value (universal matching) and
`includefield` only ask for the attribute to be returned; what the index does not
hold is read from the header of a stored file of that level.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Engine, Row, and_, exists, func, or_, select
from starlette.requests import Request

from dicom_ai_node.store.models import Instance, RequestAttribute, ResultObject, Series, Study
from dicom_ai_node.store.queries import all_instances, all_series, study_attributes, summarize_studies
from dicom_ai_node.web.dicom_json import dicom_json
from dicom_ai_node.web.problem import HTTPProblem

_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_results = ResultObject.__table__
_requests = RequestAttribute.__table__
log = logging.getLogger(__name__)

STUDY, SERIES, INSTANCE = 0, 1, 2
LEVEL_NAMES = {STUDY: "studies", SERIES: "series", INSTANCE: "instances"}

# The required matching keys of PS3.18 Table 10.6.1-5, with their level and how they match (PS3.4 C.2.2.2):
# text: single value or wildcard, case-sensitive; name: the same, case-insensitive (PN); uid: UID list;
# date / time: single value or range; integer: single value; modalities: list of values, any series of
# the study; request: sequence matching on an item of Request Attributes Sequence (0040,0275).
MATCHING_KEYS: dict[str, tuple[int, str]] = {
    "StudyDate": (STUDY, "date"),
    "StudyTime": (STUDY, "time"),
    "AccessionNumber": (STUDY, "text"),
    "ModalitiesInStudy": (STUDY, "modalities"),
    "ReferringPhysicianName": (STUDY, "name"),
    "PatientName": (STUDY, "name"),
    "PatientID": (STUDY, "text"),
    "StudyInstanceUID": (STUDY, "uid"),
    "StudyID": (STUDY, "text"),
    "Modality": (SERIES, "text"),
    "SeriesInstanceUID": (SERIES, "uid"),
    "SeriesNumber": (SERIES, "integer"),
    "PerformedProcedureStepStartDate": (SERIES, "date"),
    "PerformedProcedureStepStartTime": (SERIES, "time"),
    "RequestAttributesSequence.ScheduledProcedureStepID": (SERIES, "request"),
    "RequestAttributesSequence.RequestedProcedureID": (SERIES, "request"),
    "SOPClassUID": (INSTANCE, "uid"),
    "SOPInstanceUID": (INSTANCE, "uid"),
    "InstanceNumber": (INSTANCE, "integer"),
    # Beyond the table (an origin server may match more): the index holds them, and viewers' worklists
    # (OHIF's) filter by description.
    "StudyDescription": (STUDY, "text"),
    "SeriesDescription": (SERIES, "text"),
}
_REQUEST_ITEM_COLUMNS = {
    "ScheduledProcedureStepID": _requests.c.scheduled_procedure_step_id,
    "RequestedProcedureID": _requests.c.requested_procedure_id,
}

FUZZY_WARNING = "The fuzzymatching parameter is not supported. Only literal matching has been performed."

_IS_RANGE = (-(2**31), 2**31 - 1)  # what an IS value holds (PS3.5 6.2), and the index's integers: else a 400
_PAGING = (0, 2**63 - 1)  # limit and offset: SQLite's and PostgreSQL's BIGINT
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # DICOM strings hold no control characters but ESC
_DATE = r"[0-9]{8}"
_TIME = r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?"
_TIME_FLOOR, _TIME_CEILING = "000000.000000", "235959.999999"


def _printable(key: str) -> str:
    """A query key as it may appear in a header or message: control and non-ASCII characters escaped, no quotes."""
    return ascii(key)[1:-1].replace('"', "'")


def _attribute(part: str) -> str | None:
    """The keyword of one element of a query key (a keyword or 8 hex digits); None when it names no attribute."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
        return keyword_for_tag(int(part, 16)) or None
    return part if tag_for_keyword(part) is not None else None


def _key_path(key: str, level: int | None = None) -> str:
    """`key` (keywords or tags, `.`-separated for a sequence's items) as keywords; 400 if one names no attribute
    (listing the matching keys of `level` when it is a matching key)."""
    # PS3.18 Table 10.6.1-5 writes the name of (0040,0275) without the keyword's plural s.
    keywords = [_attribute(_SPELLINGS.get(part, part)) for part in key.split(".")]
    if not all(keywords):
        keys = f"; matching keys of /{LEVEL_NAMES[level]}: {', '.join(supported_keys(level))}" if level is not None \
            else ""
        raise HTTPProblem(400, f"query parameter {_printable(key)} names no DICOM attribute (use a keyword such as "
                               f"PatientID or a tag such as 00100020){keys}")
    return ".".join(keywords)  # type: ignore[arg-type]


_SPELLINGS = {"RequestAttributeSequence": "RequestAttributesSequence"}


def _integer(name: str, value: str, low: int, high: int) -> int:
    """`value` (an IS-style integer: optional sign, padding spaces) within [low, high]; else 400."""
    text = value.strip(" ")
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", text) or not low <= int(text) <= high:
        raise HTTPProblem(400, f"{name} must be an integer from {low} to {high}, not {value[:40]!r}")
    return int(text)


def supported_keys(level: int) -> list[str]:
    """The matching keys a search at `level` takes: its level's and the levels above."""
    return [key for key, (key_level, _) in MATCHING_KEYS.items() if key_level <= level]


@dataclass(frozen=True)
class Query:
    """A QIDO-RS query: matching keys (by keyword path) with their values, attributes asked for, paging."""

    match: dict[str, list[str]]
    limit: int
    offset: int
    include: frozenset[str] = frozenset()  # keywords asked for by includefield or universal matching
    include_all: bool = False
    fuzzy: bool = False

    def warning(self, service: str) -> str | None:
        """The Warning header PS3.18 8.3.4.2 requires when fuzzy matching was asked for and not performed."""
        return f'299 {service} "{FUZZY_WARNING}"' if self.fuzzy else None

    @classmethod
    def from_request(cls, request: Request, max_results: int, level: int = INSTANCE) -> Query:
        """The query of `request` for a search at `level`; 400 for a key the node cannot match there, or a value
        no attribute can hold (out of range, control characters, a malformed date)."""
        match: dict[str, list[str]] = {}
        include: set[str] = set()
        include_all = fuzzy = False
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
            elif key == "includefield":
                for item in filter(None, (part.strip() for part in value.split(","))):
                    if item == "all":
                        include_all = True
                    else:
                        include.add(_key_path(item).split(".")[0])
            elif key == "fuzzymatching":
                if value not in ("true", "false"):
                    raise HTTPProblem(400, f"fuzzymatching must be true or false, not {_printable(value[:40])!r}")
                fuzzy = value == "true"
            else:
                path = _key_path(key, level)
                value = value.strip(" ")
                if value == "" or value == "*" and MATCHING_KEYS.get(path, (0, ""))[1] in ("text", "name"):
                    include.add(path.split(".")[0])  # universal matching: return the attribute, match everything
                    continue
                if path not in MATCHING_KEYS or MATCHING_KEYS[path][0] > level:
                    raise HTTPProblem(400, _unsupported(key, path, level))
                match.setdefault(path, []).append(_checked(path, value))
        return cls(match, limit, offset, frozenset(include), include_all, fuzzy)


def _unsupported(key: str, path: str, level: int) -> str:
    where = f"/{LEVEL_NAMES[level]}"
    if path in MATCHING_KEYS:
        reason = f"{path} is a {LEVEL_NAMES[MATCHING_KEYS[path][0]]}-level key, not matched when searching {where}"
    else:
        reason = f"the node does not match on {path}"
    return (f"query parameter {_printable(key)}: {reason}; ignoring it would return more than asked for. Matching "
            f"keys of {where}: {', '.join(supported_keys(level))} (ask for other attributes with includefield)")


def _checked(path: str, value: str) -> str:
    """`value` of matching key `path` if its form fits the key's matching type; else 400 saying which form."""
    kind = MATCHING_KEYS[path][1]
    if kind == "integer":
        return str(_integer(path, value, *_IS_RANGE))
    if kind == "date" and not re.fullmatch(f"{_DATE}|{_DATE}-|-{_DATE}|{_DATE}-{_DATE}", value):
        raise HTTPProblem(400, f"{path} {value[:40]!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    if kind == "time" and not re.fullmatch(f"{_TIME}|{_TIME}-|-{_TIME}|{_TIME}-{_TIME}", value):
        raise HTTPProblem(400, f"{path} {value[:40]!r}: use HH[MM[SS[.FFFFFF]]], optionally as a range "
                               "(low-high, -high, low-)")
    return value


def _list(value: str) -> list[str]:
    """A UID list or list of values (PS3.18 8.3.4.1): comma- or backslash-separated."""
    return [item.strip() for item in re.split(r"[,\\]", value) if item.strip()]


@dataclass
class _Columns:
    """Where each level's attributes are in the statement a search builds."""

    study: Any  # the studies table
    every_series: Any  # all_series(): ModalitiesInStudy looks at every series of the study
    series: Any = None  # the selectable with the series columns (all_series(), all_instances()); None at /studies
    instance: Any = None  # all_instances() at /instances


class _Matcher:
    """SQL conditions for the matching keys of a query (PS3.4 C.2.2.2)."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def text(self, column, value: str, case_insensitive: bool = False) -> ColumnElement[bool]:
        """Single value or wild card matching; PN is case-insensitive (PS3.4 C.2.2.2.4), other VRs are not."""
        wildcard = "*" in value or "?" in value
        if case_insensitive:
            column, value = func.lower(column), value.lower()
        if not wildcard:
            return column == value
        if self.dialect == "sqlite" and not case_insensitive:  # SQLite's LIKE ignores case; GLOB does not
            return column.op("GLOB")(value.replace("[", "[[]"))
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")

    @staticmethod
    def date(column, value: str) -> ColumnElement[bool]:
        if "-" not in value:
            return column == value
        low, high = value.split("-")
        return and_(*([column >= low] if low else []), *([column <= high] if high else []))

    @staticmethod
    def time(column, value: str) -> ColumnElement[bool]:
        """Range matching of TM (PS3.4 C.2.2.2.5): partial times and fractions compare at full precision.

        A time with fewer components covers all the times it starts (10 is 10:00:00 to 10:59:59.999999).
        """
        def padded(time: str, fill: str) -> str:
            return time + fill[len(time):]

        stored = column + func.substr(_TIME_FLOOR, func.length(column) + 1)
        low, _, high = value.partition("-") if "-" in value else (value, "", value)
        return and_(
            *([stored >= padded(low, _TIME_FLOOR)] if low else []),
            *([stored <= padded(high, _TIME_CEILING)] if high else []),
        )


def _conditions(query: Query, matcher: _Matcher, columns: _Columns) -> list[ColumnElement[bool]]:
    """The WHERE conditions of `query` over `columns`; every key's values must all match (a conjunction)."""
    study, series, instance = columns.study, columns.series, columns.instance
    by_key: dict[str, Callable[[str], ColumnElement[bool]]] = {
        "StudyDate": lambda value: matcher.date(study.c.study_date, value),
        "StudyTime": lambda value: matcher.time(study.c.study_time, value),
        "AccessionNumber": lambda value: matcher.text(study.c.accession_number, value),
        "ReferringPhysicianName": lambda value: matcher.text(study.c.referring_physician_name, value, True),
        "PatientName": lambda value: matcher.text(study.c.patient_name, value, True),
        "PatientID": lambda value: matcher.text(study.c.patient_id, value),
        "StudyID": lambda value: matcher.text(study.c.study_id, value),
        "StudyDescription": lambda value: matcher.text(study.c.study_description, value),
        "StudyInstanceUID": lambda value: study.c.study_instance_uid.in_(_list(value)),
        "ModalitiesInStudy": lambda value: study.c.study_instance_uid.in_(
            select(columns.every_series.c.study_uid).where(
                or_(*(matcher.text(columns.every_series.c.modality, item) for item in _list(value)))
            ).correlate(None)  # every series of the study, not only the one the outer query is at
        ),
    }
    if series is not None:
        by_key.update({
            "Modality": lambda value: or_(*(matcher.text(series.c.modality, item) for item in _list(value))),
            "SeriesInstanceUID": lambda value: series.c.series_uid.in_(_list(value)),
            "SeriesNumber": lambda value: series.c.series_number == int(value),
            "SeriesDescription": lambda value: matcher.text(series.c.series_description, value),
            "PerformedProcedureStepStartDate": lambda value: matcher.date(
                series.c.performed_procedure_step_start_date, value),
            "PerformedProcedureStepStartTime": lambda value: matcher.time(
                series.c.performed_procedure_step_start_time, value),
        })
    if instance is not None:
        by_key.update({
            "SOPClassUID": lambda value: instance.c.sop_class_uid.in_(_list(value)),
            "SOPInstanceUID": lambda value: instance.c.sop_uid.in_(_list(value)),
            "InstanceNumber": lambda value: instance.c.instance_number == int(value),
        })
    conditions = []
    item_conditions = []
    for key, values in query.match.items():
        for value in values:
            if key.startswith("RequestAttributesSequence."):
                item_conditions.append(matcher.text(_REQUEST_ITEM_COLUMNS[key.split(".")[1]], value))
            else:
                conditions.append(by_key[key](value))
    if item_conditions:  # sequence matching: one item must match every key given for it (PS3.4 C.2.2.2.6)
        conditions.append(exists().where(_requests.c.series_id == series.c.series_id, *item_conditions))
    return conditions


# --- answers ---------------------------------------------------------------------------------------------

_AVAILABILITY = "ONLINE"  # every indexed instance is on the node's disk (PS3.3 C.4.23.1.1 Instance Availability)


def _study_fields(row: Row[Any]) -> dict[str, Any]:
    """The study's return attributes the index holds (PS3.18 Table 10.6.3-3), from a row joined to `studies`."""
    fields = {
        **study_attributes(row),
        "StudyTime": row.study_time,
        "ReferringPhysicianName": row.referring_physician_name,
        "PatientBirthDate": row.patient_birth_date,
        "PatientSex": row.patient_sex,
        "StudyID": row.study_id,
    }
    if row.timezone_offset_from_utc:  # "if present" in the table
        fields["TimezoneOffsetFromUTC"] = row.timezone_offset_from_utc
    if row.specific_character_set:
        # The JSON answer is Unicode (PS3.18 F.2): values in another character set were decoded on ingest.
        fields["SpecificCharacterSet"] = "ISO_IR 192"
    return fields


# Read from a produced object's file: the index holds only its UIDs (queries.all_series/all_instances).
_PRODUCED_FIELDS = ("SeriesNumber", "SeriesDescription", "PerformedProcedureStepStartDate",
                    "PerformedProcedureStepStartTime", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                    "NumberOfFrames")
_REQUEST_ITEM_KEYWORDS = ("ScheduledProcedureStepID", "RequestedProcedureID")
# Not returned by `includefield=all` at a level above theirs (they describe one series or instance of it),
# nor the functional groups of a multi-frame object (megabytes for a SEG); includefield=<keyword> returns any.
_SERIES_ONLY = {"Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "RequestAttributesSequence",
                "BodyPartExamined", "Laterality", "ProtocolName", "FrameOfReferenceUID", "PositionReferenceIndicator"}
_INSTANCE_ONLY = {"SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                  "BitsStored", "HighBit", "NumberOfFrames", "ImageType", "ContentDate", "ContentTime",
                  "AcquisitionDate", "AcquisitionTime", "AcquisitionNumber", "ImagePositionPatient",
                  "ImageOrientationPatient", "SliceLocation", "WindowCenter", "WindowWidth", "RescaleIntercept",
                  "RescaleSlope", "InstanceCreationDate", "InstanceCreationTime", "PixelRepresentation",
                  "SamplesPerPixel", "PhotometricInterpretation", "PixelSpacing", "SliceThickness"}
_NEVER_ALL = {"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "SegmentSequence",
              "ContentSequence"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_INLINE_BINARY_LIMIT = 1024


class Qido:
    """QIDO-RS answers from the index; attributes the index does not hold for a result come from its file."""

    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.root = storage_root
        self.matcher = _Matcher(engine.dialect.name)

    def search_studies(self, query: Query, base_url: str) -> list[dict[str, Any]]:
        conditions = _conditions(query, self.matcher, _Columns(_studies, all_series()))
        statement = select(_studies).where(*conditions).order_by(_studies.c.id).limit(query.limit).offset(query.offset)
        with self.engine.connect() as connection:
            summaries = summarize_studies(connection, statement, with_results=True)
            files = self._study_files(connection, [summary.study.study_instance_uid for summary in summaries]) \
                if _wants_more(query) else {}
        answer = []
        for summary in summaries:
            uid = summary.study.study_instance_uid
            fields = {
                **summary.attributes(),
                **_study_fields(summary.study),
                "InstanceAvailability": _AVAILABILITY,
                "RetrieveURL": f"{base_url}/studies/{uid}",
            }
            answer.append(self._with_included(dicom_json(fields), query, files.get(uid), STUDY))
        return answer

    def search_series(self, query: Query, base_url: str, study_uid: str | None) -> list[dict[str, Any]]:
        every_series = all_series()
        conditions = _conditions(query, self.matcher, _Columns(_studies, every_series, series=every_series))
        if study_uid:
            conditions.append(_studies.c.study_instance_uid == study_uid)
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
            produced_files = self._produced_first_files(connection, [row.series_uid for row in rows if row.produced])
            received = [row.series_id for row in rows if not row.produced]
            items = _request_items(connection, received)
            files = self._series_files(connection, received) if _wants_more(query) else {}
        answer = []
        for row in rows:
            fields = {
                **_study_fields(row),
                **_series_fields(row, items.get(row.series_id, [])),
                "NumberOfSeriesRelatedInstances": row.instances,
                "InstanceAvailability": _AVAILABILITY,
                "RetrieveURL": f"{base_url}/studies/{row.study_uid}/series/{row.series_uid}",
            }
            path = files.get(row.series_id)
            if row.produced:
                path = produced_files[row.series_uid]
                fields.update(_produced_series_fields(self.root / path))
            answer.append(self._with_included(dicom_json(fields), query, path, SERIES))
        return answer

    def search_instances(
        self, query: Query, base_url: str, study_uid: str | None, series_uid: str | None
    ) -> list[dict[str, Any]]:
        every_instance = all_instances()
        conditions = _conditions(
            query, self.matcher, _Columns(_studies, all_series(), series=every_instance, instance=every_instance)
        )
        if study_uid:
            conditions.append(every_instance.c.study_uid == study_uid)
        if series_uid:
            conditions.append(every_instance.c.series_uid == series_uid)
        statement = (
            select(every_instance, _studies)
            .join(_studies, _studies.c.study_instance_uid == every_instance.c.study_uid)
            .where(*conditions)
            .order_by(every_instance.c.study_uid, every_instance.c.series_uid, every_instance.c.instance_number,
                      every_instance.c.sop_uid)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
            items = _request_items(connection, [row.series_id for row in rows if not row.produced])
        answer = []
        for row in rows:
            fields = {
                **_study_fields(row),
                **_series_fields(row, items.get(row.series_id, [])),
                "SOPClassUID": row.sop_class_uid,
                "SOPInstanceUID": row.sop_uid,
                "InstanceNumber": row.instance_number,
                "Rows": row.rows,
                "Columns": row.columns,
                "BitsAllocated": row.bits_allocated,
                "NumberOfFrames": row.number_of_frames,
                "InstanceAvailability": _AVAILABILITY,
                "RetrieveURL": f"{base_url}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}",
            }
            if row.produced:
                fields.update(_produced_series_fields(self.root / row.file_path))
                fields.update({key: _summary(self.root / row.file_path)[key] for key in _PRODUCED_FIELDS})
            elif row.rows is not None and row.bits_allocated is None:  # an image indexed before migration 0008
                fields["BitsAllocated"] = _summary(self.root / row.file_path)["BitsAllocated"]
            answer.append(self._with_included(dicom_json(fields), query, row.file_path, INSTANCE))
        return answer

    def _with_included(self, found: dict[str, Any], query: Query, path: str | None, level: int) -> dict[str, Any]:
        """`found` with the attributes `includefield` (or universal matching) asked for and the index lacks,
        read from the header of `path` (a stored file of the result's level)."""
        missing = {f"{tag_for_keyword(keyword):08X}" for keyword in query.include} - found.keys()
        if not (missing or query.include_all) or path is None:
            return found
        header = _header_json(self.root / path)
        wanted = set(missing)
        if query.include_all:
            excluded = _NEVER_ALL | (_SERIES_ONLY | _INSTANCE_ONLY if level == STUDY else set()) | (
                _INSTANCE_ONLY if level == SERIES else set())
            wanted |= {tag for tag, element in header.items() if element["keyword"] not in excluded}
        extra = {tag: header[tag]["json"] for tag in wanted - found.keys() if tag in header}
        return dict(sorted({**found, **extra}.items()))

    @staticmethod
    def _study_files(connection, study_uids: list[str]) -> dict[str, str]:
        """A stored file of each study (its first received instance, else its first result)."""
        if not study_uids:
            return {}
        received = connection.execute(
            select(_studies.c.study_instance_uid, func.min(_instances.c.file_path))
            .join(_series, _series.c.study_id == _studies.c.id)
            .join(_instances, _instances.c.series_id == _series.c.id)
            .where(_studies.c.study_instance_uid.in_(study_uids))
            .group_by(_studies.c.study_instance_uid)
        ).all()
        produced = connection.execute(
            select(_results.c.study_instance_uid, func.min(_results.c.file_path))
            .where(_results.c.study_instance_uid.in_(study_uids))
            .group_by(_results.c.study_instance_uid)
        ).all()
        return {**dict(produced), **dict(received)}

    @staticmethod
    def _series_files(connection, series_ids: list[int]) -> dict[int, str]:
        """A stored file of each received series (its first instance)."""
        if not series_ids:
            return {}
        return dict(connection.execute(
            select(_instances.c.series_id, func.min(_instances.c.file_path))
            .where(_instances.c.series_id.in_(series_ids))
            .group_by(_instances.c.series_id)
        ).all())

    @staticmethod
    def _produced_first_files(connection, series_uids: list[str]) -> dict[str, str]:
        if not series_uids:
            return {}
        return dict(connection.execute(
            select(_results.c.series_instance_uid, func.min(_results.c.file_path))
            .where(_results.c.series_instance_uid.in_(series_uids))
            .group_by(_results.c.series_instance_uid)
        ).all())


def _wants_more(query: Query) -> bool:
    return query.include_all or bool(query.include)


def _request_items(connection, series_ids: Iterable[int]) -> dict[int, list[dict[str, str | None]]]:
    """The Request Attributes Sequence items of each of these received series, in the order they came."""
    ids = [series_id for series_id in series_ids if series_id is not None]
    if not ids:
        return {}
    items: dict[int, list[dict[str, str | None]]] = {}
    for row in connection.execute(
        select(_requests).where(_requests.c.series_id.in_(ids)).order_by(_requests.c.id)
    ):
        items.setdefault(row.series_id, []).append(
            {"ScheduledProcedureStepID": row.scheduled_procedure_step_id,
             "RequestedProcedureID": row.requested_procedure_id}
        )
    return items


def _series_fields(row: Row[Any], request_items: list[dict[str, str | None]]) -> dict[str, Any]:
    """The series' return attributes the index holds (PS3.18 Table 10.6.3-4)."""
    return {
        "Modality": row.modality,
        "SeriesInstanceUID": row.series_uid,
        "SeriesNumber": row.series_number,
        "SeriesDescription": row.series_description,
        "PerformedProcedureStepStartDate": row.performed_procedure_step_start_date,
        "PerformedProcedureStepStartTime": row.performed_procedure_step_start_time,
        "RequestAttributesSequence": request_items,
    }


def _produced_series_fields(path: Path) -> dict[str, Any]:
    summary = _summary(path)
    return {
        **{key: summary[key] for key in ("SeriesNumber", "SeriesDescription", "PerformedProcedureStepStartDate",
                                         "PerformedProcedureStepStartTime")},
        "RequestAttributesSequence": summary["RequestAttributesSequence"],
    }


def _read(path: Path) -> Dataset:
    """The header of a stored file; empty if it is gone (purged while the query ran) or unreadable, so the
    answer lacks what only the file holds rather than failing.  Not cached then: lru_cache keeps no exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        log.warning("QIDO-RS: cannot read the header of %s: %s", path, exc)
        raise _Unreadable from exc


class _Unreadable(Exception):
    """A stored file whose header cannot be read."""


def _summary(path: Path) -> dict[str, Any]:
    try:
        return _cached_summary(path)
    except _Unreadable:
        return {**dict.fromkeys(_PRODUCED_FIELDS), "RequestAttributesSequence": []}


def _header_json(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return _cached_header_json(path)
    except _Unreadable:
        return {}


def _plain(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return [str(item) for item in value]
    return value if isinstance(value, int) else str(value)


@lru_cache(maxsize=4096)
def _cached_summary(path: Path) -> dict[str, Any]:
    """Series and image attributes of a file whose row lacks them (a result, an image indexed before 0008).

    Stored files never change, so the few values are cached (small: a dozen values per file).
    """
    ds = _read(path)
    return {
        **{key: _plain(ds.get(key)) for key in _PRODUCED_FIELDS},
        "RequestAttributesSequence": [
            {keyword: _plain(item.get(keyword)) for keyword in _REQUEST_ITEM_KEYWORDS}
            for item in ds.get("RequestAttributesSequence") or ()
        ],
    }


@lru_cache(maxsize=128)
def _cached_header_json(path: Path) -> dict[str, dict[str, Any]]:
    """Tag -> {"keyword", "json"} of every attribute in the file's header, for includefield.

    Bounded: no pixel data (stop_before_pixels), binary values over 1 KiB left out, 128 files cached.
    """
    ds = _read(path)
    elements: dict[str, dict[str, Any]] = {}
    for element in ds:
        if element.tag.group in (0x0002,) or element.tag.is_private:
            continue
        if element.VR in _BINARY_VRS and len(element.value or b"") > _INLINE_BINARY_LIMIT:
            continue
        try:
            converted = element.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=_INLINE_BINARY_LIMIT)
        except Exception:  # a value pydicom cannot convert (malformed in the file): left out, not a 500
            continue
        elements[f"{element.tag:08X}"] = {"keyword": element.keyword, "json": converted}
    return elements

