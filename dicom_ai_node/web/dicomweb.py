"""DICOMweb handlers: STOW-RS into the durable ingest path, QIDO-RS from the index, WADO-RS from storage.

Received instances and the node's own results (SEG, SR in `result_objects`) are
served as one archive, so a viewer using the node as its data source finds the
SEG next to the CT it was computed from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import Engine, Integer, String, and_, cast, func, literal, null, select, union_all
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dicom_ai_node.ingest.contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from dicom_ai_node.ingest.parse import DOES_NOT_MATCH_SOP_CLASS, RejectedDataset, parse_header, split_part10
from dicom_ai_node.ingest.receive import Receiver
from dicom_ai_node.store.files import DiskFull, InstanceStore
from dicom_ai_node.store.index import Arrivals, Index
from dicom_ai_node.store.models import Instance, ResultObject, Series, Study
from dicom_ai_node.values import IngestOutcome, Sender
from dicom_ai_node.web.metrics import Metrics

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
_ACCEPTED_TS = frozenset(ACCEPTED_TRANSFER_SYNTAXES)
_STORAGE_CLASSES = frozenset(STORAGE_SOP_CLASSES)
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, "1.2.840.10008.1.2"})
_CHUNK = 1 << 20
_PART_HEAD = 1 << 16  # a part's header block, and the File Meta Information, fit in this
# Parts of one STOW-RS request: a 4000-slice series fits; each part costs a scan of the spooled body.
MAX_STOW_PARTS = 20000

_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_results = ResultObject.__table__


class HTTPProblem(Exception):
    """A request refused as a whole, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def problem_response(exc: HTTPProblem) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


# --- media types and multipart ------------------------------------------------------------------------


def parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """`multipart/related; type="application/dicom"; boundary=x` -> ("multipart/related", {...})."""
    main, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for match in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        value = match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return main.strip().lower(), params


@dataclass(frozen=True)
class Part:
    """One part of a multipart body kept in a file: its headers, and where its content lies."""

    headers: dict[str, str]
    start: int
    end: int


class MultipartError(ValueError):
    """The body is not a complete multipart message (malformed or truncated)."""


def parse_multipart(body: BinaryIO, boundary: str) -> list[Part]:
    """Locate the parts of a whole multipart body in a seekable file; MultipartError unless it is closed.

    The file is scanned a block at a time, so memory stays one block whatever the body's size; the
    contents stay in the file until `read_range` fetches one part.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    start = _find(body, delimiter, 0)
    if start < 0:
        raise MultipartError("the body does not contain the boundary given in Content-Type")
    parts: list[Part] = []
    position = start + len(delimiter)
    while not (head := read_range(body, position, _PART_HEAD)).startswith(b"--"):
        number = len(parts) + 1
        if number > MAX_STOW_PARTS:
            raise MultipartError(f"more than {MAX_STOW_PARTS} parts: send the instances in several requests")
        line_end = head.find(b"\r\n")
        headers_end = head.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if headers_end < 0:
            raise MultipartError(f"part {number} has no complete header block (truncated body?)")
        headers = {}
        for line in head[line_end + 2 : headers_end].decode("latin-1").split("\r\n"):
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    raise MultipartError(f"part {number}: malformed header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
        content_start = position + headers_end + 4
        end = _find(body, b"\r\n" + delimiter, content_start)
        if end < 0:
            raise MultipartError(f"part {number} is not closed by a boundary (truncated body?)")
        parts.append(Part(headers, content_start, end))
        position = end + 2 + len(delimiter)
    if not parts:
        raise MultipartError("the multipart body has no parts")
    return parts


def _find(file: BinaryIO, needle: bytes, start: int) -> int:
    """Offset of the first `needle` at or after `start` in `file`, or -1; reads one block at a time."""
    overlap = len(needle) - 1
    position = start
    while True:
        block = read_range(file, position, _CHUNK + overlap)
        found = block.find(needle)
        if found >= 0:
            return position + found
        if len(block) < _CHUNK + overlap:
            return -1
        position += _CHUNK


def read_range(file: BinaryIO, start: int, size: int) -> bytes:
    """Up to `size` bytes of `file` from offset `start` (fewer at its end)."""
    file.seek(start)
    return file.read(size)


def _chunks(file: BinaryIO, start: int, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of `file` from `start`, a block at a time, for streaming responses."""
    file.seek(start)
    while size:
        chunk = file.read(min(_CHUNK, size))
        if not chunk:
            raise OSError(f"{file.name} ends {size} bytes before the end of what it was expected to hold")
        size -= len(chunk)
        yield chunk


# --- DICOM JSON -----------------------------------------------------------------------------------------


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def dicom_json(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword -> value(s) to the DICOM JSON model; None or empty gives the attribute without Value."""
    result: dict[str, Any] = {}
    for keyword, value in values.items():
        vr = "UR" if keyword == "RetrieveURL" else dictionary_VR(keyword)
        items = value if isinstance(value, list) else [] if value in (None, "") else [value]
        element: dict[str, Any] = {"vr": vr}
        if items:
            if vr == "PN":
                items = [{"Alphabetic": str(item)} for item in items]
            elif vr in ("IS", "US", "UL", "SL", "SS"):
                items = [int(item) for item in items]
            element["Value"] = items
        result[_tag(keyword)] = element
    return dict(sorted(result.items()))


# --- STOW-RS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StowResult:
    stored: list[dict[str, Any]]
    failed: list[dict[str, Any]]


@dataclass(frozen=True)
class _Outcome:
    """What happened to one part: a failure status with its reason, or where the instance now lives."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    status: int = 0
    reason: str = ""
    size: int = 0
    duplicate: bool = False
    series_uid: str = ""
    study_uid: str = ""


class Stow:
    """Stores every part of a STOW-RS request through the one ingest path C-STORE uses."""

    def __init__(self, index: Index, store: InstanceStore, metrics: Metrics, max_inflated_bytes: int) -> None:
        self.index = index
        self.receiver = Receiver(index, store, max_inflated_bytes=max_inflated_bytes)
        self.metrics = metrics

    def store(
        self, body: BinaryIO, parts: list[Part], sender: Sender, study_uid: str | None, base_url: str
    ) -> StowResult:
        """Store the parts of `body` one at a time: memory holds one instance, never the request."""
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        arrivals = Arrivals()
        for part in parts:
            outcome = self._store_one(body, part, sender, study_uid)
            reference = {
                "ReferencedSOPClassUID": outcome.sop_class_uid,
                "ReferencedSOPInstanceUID": outcome.sop_instance_uid,
            }
            if outcome.status:
                failed.append(dicom_json({**reference, "FailureReason": outcome.status}))
                self.metrics.stow_instance(sender, "failed", 0)
                log.warning("STOW-RS from %s: instance %s failed (0x%04X): %s",
                            sender, outcome.sop_instance_uid or "?", outcome.status, outcome.reason)
                continue
            url = (f"{base_url}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
                   f"/instances/{outcome.sop_instance_uid}")
            stored.append(dicom_json({**reference, "RetrieveURL": url}))
            self.metrics.stow_instance(sender, "duplicate" if outcome.duplicate else "stored", outcome.size)
            arrivals.count(outcome.study_uid, outcome.series_uid, outcome.duplicate)
        if resent := arrivals.only_duplicates():
            try:
                self.index.record_resent(sender, resent)
            except Exception:  # every instance is stored and answered; only the audit line is lost
                log.exception("could not record in the audit trail: %d series sent again by %s", len(resent), sender)
        return StowResult(stored, failed)

    def _store_one(self, body: BinaryIO, part: Part, sender: Sender, study_uid: str | None) -> _Outcome:
        media = parse_media_type(part.headers.get("content-type", "application/dicom"))[0]
        if media != "application/dicom":
            return _Outcome(None, None, CANNOT_UNDERSTAND, f"part of type {media}, expected application/dicom")
        size = part.end - part.start
        try:
            meta, offset = split_part10(read_range(body, part.start, min(size, _PART_HEAD)))
        except Exception as exc:  # pydicom raises many types for garbage
            return _Outcome(None, None, CANNOT_UNDERSTAND, f"cannot read the File Meta Information: {exc}")
        sop_class = str(meta.get("MediaStorageSOPClassUID", "")) or None
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", "")) or None
        ts = str(meta.TransferSyntaxUID)
        if sop_class not in _STORAGE_CLASSES:
            return _Outcome(sop_class, sop_uid, SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not stored here")
        if ts not in _ACCEPTED_TS:
            return _Outcome(sop_class, sop_uid, TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts} not accepted")
        # The dataset and then the whole file are read from the body separately, so at most two copies of
        # one instance are in memory while it is checked and written.
        dataset = read_range(body, part.start + offset, size - offset)
        if study_uid is not None and (mismatch := self._study_mismatch(dataset, ts, study_uid)):
            self.index.record_event(
                "store-failed", f"instance {sop_uid} from {sender} refused: {mismatch}", level="error",
                study_instance_uid=study_uid, sop_instance_uid=sop_uid, calling_ae_title=sender.ae_title,
            )
            return _Outcome(sop_class, sop_uid, DOES_NOT_MATCH_SOP_CLASS, mismatch)
        received = self.receiver.receive(dataset, ts, lambda: read_range(body, part.start, size), sender, sop_uid)
        if not received.ok or received.header is None:
            return _Outcome(sop_class, sop_uid, received.status, received.reason)
        header = received.header
        return _Outcome(
            header.sop_class_uid,
            header.sop_instance_uid,
            size=received.size,
            duplicate=received.outcome is IngestOutcome.DUPLICATE,
            series_uid=header.series_instance_uid,
            study_uid=header.study_instance_uid,
        )

    def _study_mismatch(self, dataset: bytes, ts: str, study_uid: str) -> str | None:
        try:
            header = parse_header(dataset, ts, max_inflated_bytes=self.receiver.max_inflated_bytes)
        except RejectedDataset:
            return None  # the receiver refuses it with the precise reason
        if header.study_instance_uid != study_uid:
            return f"StudyInstanceUID {header.study_instance_uid} differs from the study in the URL {study_uid}"
        return None


def stow_response(result: StowResult, base_url: str, study_uid: str | None) -> Response:
    body: dict[str, Any] = {}
    if study_uid:
        body.update(dicom_json({"RetrieveURL": f"{base_url}/studies/{study_uid}"}))
    if result.failed:
        body[_tag("FailedSOPSequence")] = {"vr": "SQ", "Value": result.failed}
    if result.stored:
        body[_tag("ReferencedSOPSequence")] = {"vr": "SQ", "Value": result.stored}
    status = 200 if not result.failed else 202 if result.stored else 409
    return JSONResponse(dict(sorted(body.items())), status_code=status, media_type=DICOM_JSON)


def check_stow_content_type(header: str | None) -> str:
    """The boundary of a STOW-RS body; 415 for anything but multipart/related of application/dicom."""
    media, params = parse_media_type(header or "")
    if media != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
        raise HTTPProblem(
            415, f"STOW-RS takes multipart/related; type=\"application/dicom\", not {header or 'no Content-Type'}"
        )
    if not params.get("boundary"):
        raise HTTPProblem(400, "multipart/related without a boundary parameter")
    return params["boundary"]


async def spool_body(request: Request, limit: int, store: InstanceStore) -> BinaryIO:
    """The whole body in a temporary file beside the stored instances; nothing is stored before all of it arrived.

    413 past `limit` bytes, whether announced by Content-Length or found while reading a chunked body;
    507 when the disk cannot hold the body and then the instances made from it (twice its size) above
    storage.min_free_mb.  The file has no name (O_TMPFILE), so it is gone once closed, even after kill -9.
    """
    length = request.headers.get("content-length", "")
    declared = int(length) if re.fullmatch(r"[0-9]{1,19}", length) else 0
    if declared > limit:
        raise HTTPProblem(413, f"request body of {declared} bytes exceeds web.max_request_mb")
    await run_in_threadpool(_check_space, store, 2 * declared)
    spool = tempfile.TemporaryFile(dir=store.root)
    try:
        received, pending = 0, bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPProblem(413, "request body exceeds web.max_request_mb")
            pending += chunk
            if len(pending) >= _CHUNK:
                await run_in_threadpool(_spool, spool, pending, store, received)
                pending = bytearray()
        await run_in_threadpool(_spool, spool, pending, store, received)
    except BaseException:
        spool.close()
        raise
    return spool


def _spool(spool: BinaryIO, data: bytearray, store: InstanceStore, received: int) -> None:
    """Append to the spool while the disk, after the body so far, still has room for as much again."""
    _check_space(store, received)
    try:
        spool.write(data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HTTPProblem(507, "the disk filled up while receiving the request; nothing stored") from None
        raise


def _check_space(store: InstanceStore, incoming: int) -> None:
    try:
        store.check_space(incoming)
    except DiskFull as exc:
        raise HTTPProblem(507, f"not enough disk space for this request, nothing stored: {exc.strerror}") from None


# --- QIDO-RS --------------------------------------------------------------------------------------------

# Every series, received or produced by the node (SEG/SR of `result_objects`), as one selectable.
def _all_series():
    counts = select(func.count()).where(_instances.c.series_id == _series.c.id).scalar_subquery()
    received = select(
        _series.c.series_instance_uid.label("series_uid"),
        _studies.c.study_instance_uid.label("study_uid"),
        _series.c.modality.label("modality"),
        _series.c.series_number.label("series_number"),
        _series.c.series_description.label("series_description"),
        counts.label("instances"),
        literal(False).label("produced"),
    ).join(_studies, _studies.c.id == _series.c.study_id)
    produced = (
        select(
            _results.c.series_instance_uid,
            _results.c.study_instance_uid,
            func.max(_results.c.kind),
            cast(null(), Integer),
            cast(null(), String),
            func.count(),
            literal(True),
        )
        .where(_results.c.series_instance_uid.not_in(select(_series.c.series_instance_uid)))
        .group_by(_results.c.series_instance_uid, _results.c.study_instance_uid)
    )
    return union_all(received, produced).subquery("all_series")


def _all_instances():
    received = (
        select(
            _instances.c.sop_instance_uid.label("sop_uid"),
            _instances.c.sop_class_uid.label("sop_class_uid"),
            _instances.c.instance_number.label("instance_number"),
            _instances.c.rows.label("rows"),
            _instances.c.columns.label("columns"),
            _instances.c.number_of_frames.label("number_of_frames"),
            _instances.c.file_path.label("file_path"),
            _series.c.series_instance_uid.label("series_uid"),
            _studies.c.study_instance_uid.label("study_uid"),
            _series.c.modality.label("modality"),
            literal(False).label("produced"),
        )
        .join(_series, _series.c.id == _instances.c.series_id)
        .join(_studies, _studies.c.id == _series.c.study_id)
    )
    produced = select(
        _results.c.sop_instance_uid,
        _results.c.sop_class_uid,
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
        _results.c.file_path,
        _results.c.series_instance_uid,
        _results.c.study_instance_uid,
        _results.c.kind,
        literal(True),
    ).where(_results.c.sop_instance_uid.not_in(select(_instances.c.sop_instance_uid)))
    return union_all(received, produced).subquery("all_instances")


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


def _study_conditions(query: Query, all_series) -> list:
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
        conditions.append(
            _studies.c.study_instance_uid.in_(select(all_series.c.study_uid).where(all_series.c.modality.in_(modalities)))
        )
    return conditions


def _study_fields(row) -> dict[str, Any]:
    return {
        "StudyInstanceUID": row.study_instance_uid,
        "StudyDate": row.study_date,
        "StudyTime": row.study_time,
        "AccessionNumber": row.accession_number,
        "PatientName": row.patient_name,
        "PatientID": row.patient_id,
        "StudyDescription": row.study_description,
    }


class Archive:
    """Read side: QIDO-RS answers and the files WADO-RS streams."""

    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.root = storage_root

    def search_studies(self, query: Query, base_url: str) -> list[dict[str, Any]]:
        all_series = _all_series()
        statement = (
            select(_studies)
            .where(*_study_conditions(query, all_series))
            .order_by(_studies.c.id)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            studies = connection.execute(statement).all()
            uids = [row.study_instance_uid for row in studies]
            series = connection.execute(
                select(all_series.c.study_uid, all_series.c.modality, all_series.c.instances).where(
                    all_series.c.study_uid.in_(uids)
                )
            ).all()
        by_study: dict[str, list] = {}
        for row in series:
            by_study.setdefault(row.study_uid, []).append(row)
        answer = []
        for study in studies:
            rows = by_study.get(study.study_instance_uid, [])
            answer.append(
                dicom_json(
                    {
                        **_study_fields(study),
                        "ModalitiesInStudy": sorted({row.modality for row in rows if row.modality}),
                        "NumberOfStudyRelatedSeries": len(rows),
                        "NumberOfStudyRelatedInstances": sum(row.instances for row in rows),
                        "RetrieveURL": f"{base_url}/studies/{study.study_instance_uid}",
                    }
                )
            )
        return answer

    def search_series(self, query: Query, base_url: str, study_uid: str | None) -> list[dict[str, Any]]:
        all_series = _all_series()
        conditions = _study_conditions(query, all_series)
        if study_uid:
            conditions.append(_studies.c.study_instance_uid == study_uid)
        if modalities := _values(query.match.get("Modality", [])):
            conditions.append(all_series.c.modality.in_(modalities))
        if uids := _values(query.match.get("SeriesInstanceUID", [])):
            conditions.append(all_series.c.series_uid.in_(uids))
        statement = (
            select(all_series, _studies)
            .join(_studies, _studies.c.study_instance_uid == all_series.c.study_uid)
            .where(*conditions)
            .order_by(_studies.c.id, all_series.c.produced, all_series.c.series_number, all_series.c.series_uid)
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
        all_instances = _all_instances()
        conditions = []
        for keyword, column, given in (
            ("StudyInstanceUID", all_instances.c.study_uid, study_uid),
            ("SeriesInstanceUID", all_instances.c.series_uid, series_uid),
            ("SOPInstanceUID", all_instances.c.sop_uid, None),
            ("SOPClassUID", all_instances.c.sop_class_uid, None),
            ("Modality", all_instances.c.modality, None),
        ):
            if given:
                conditions.append(column == given)
            elif values := _values(query.match.get(keyword, [])):
                conditions.append(column.in_(values))
        if (value := query.one("InstanceNumber")) is not None:  # an integer in IS's range (Query)
            conditions.append(all_instances.c.instance_number == int(value))
        statement = (
            select(all_instances)
            .where(*conditions)
            .order_by(all_instances.c.study_uid, all_instances.c.series_uid, all_instances.c.instance_number,
                      all_instances.c.sop_uid)
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

    def files(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[Path]:
        """The stored files of a study, series or instance, in series and instance order; [] if unknown."""
        all_instances = _all_instances()
        conditions = [all_instances.c.study_uid == study_uid]
        if series_uid:
            conditions.append(all_instances.c.series_uid == series_uid)
        if sop_uid:
            conditions.append(all_instances.c.sop_uid == sop_uid)
        statement = (
            select(all_instances.c.file_path)
            .where(*conditions)
            .order_by(all_instances.c.produced, all_instances.c.series_uid, all_instances.c.instance_number,
                      all_instances.c.sop_uid)
        )
        with self.engine.connect() as connection:
            return [self.root / path for path in connection.execute(statement).scalars()]


@lru_cache(maxsize=4096)
def _header(path: Path) -> dict[str, Any]:
    """Series and image attributes of a result file (the table holds only its UIDs); files never change."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {key: ds.get(key) for key in ("SeriesNumber", "SeriesDescription", "InstanceNumber", "Rows", "Columns",
                                         "NumberOfFrames")}


# --- WADO-RS --------------------------------------------------------------------------------------------


def _accepts(request: Request, media_type: str) -> bool:
    """Whether the Accept header allows multipart/related parts of `media_type`."""
    accept = request.headers.get("accept")
    if not accept:
        return True
    for item in accept.split(","):
        main, params = parse_media_type(item)
        if main in ("*/*", "multipart/*"):
            return True
        if main == "multipart/related" and params.get("type", media_type).lower() in (media_type, "*/*", "*"):
            return True
    return False


def multipart_files(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """Stream stored files unchanged as multipart/related parts (runs in the thread pool), a block at a time."""
    for path in paths:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n".encode()
            yield from _chunks(file, 0, size)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def retrieve_response(request: Request, paths: list[Path]) -> Response:
    if not paths:
        raise HTTPProblem(404, "no such study, series or instance")
    if not _accepts(request, "application/dicom"):
        raise HTTPProblem(406, 'instances are served as multipart/related; type="application/dicom" only')
    boundary = secrets.token_hex(16)
    return StreamingResponse(
        multipart_files(paths, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def instance_metadata(path: Path) -> dict[str, Any]:
    """Full DICOM JSON of one instance without its pixel data (viewers fetch frames separately)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    metadata = ds.to_json_dict(bulk_data_threshold=1 << 30)
    metadata[_tag("TransferSyntaxUID")] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    return dict(sorted(metadata.items()))


def metadata_response(paths: list[Path]) -> Response:
    """The metadata of each instance as one JSON array, produced an instance at a time (a study may hold
    thousands, and enhanced multi-frame headers run to megabytes each)."""

    def array() -> Iterator[bytes]:
        yield b"["
        for number, path in enumerate(paths):
            yield (b"," if number else b"") + json.dumps(
                instance_metadata(path), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode()
        yield b"]"

    return StreamingResponse(array(), media_type=DICOM_JSON)


def frame_numbers(frame_list: str) -> list[int]:
    """The frame numbers of a `frames/{list}` URL in the order asked; 400 unless each is a positive integer.

    A repeated number is refused, not removed: PS3.18 defines the list as non-duplicate frame numbers,
    and refusing keeps the response's parts matching the request one to one.  With numbers distinct and
    at most NumberOfFrames, no response is larger than the instance's pixel data (400 copies of frame 1
    were once 200 MB built in memory).
    """
    numbers: dict[int, None] = {}  # ordered, and a set
    for item in frame_list.split(","):
        if not re.fullmatch(r"[1-9][0-9]{0,9}", item):
            raise HTTPProblem(400, f"frame {item[:20]!r}: frames are listed as positive integers separated by commas")
        if int(item) in numbers:
            raise HTTPProblem(400, f"frame {int(item)} is listed more than once: a frame list holds distinct numbers")
        numbers[int(item)] = None
    return list(numbers)


@dataclass(frozen=True)
class PixelFrames:
    """Where the native frames of a stored instance lie in its file."""

    path: Path
    offset: int  # of the Pixel Data value
    size: int  # bytes per frame
    count: int


def pixel_frames(path: Path) -> PixelFrames:
    """Locate native (uncompressed, little endian) frames from the header alone; the pixel data is not read."""
    ds = pydicom.dcmread(path, defer_size=_PART_HEAD)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        raise HTTPProblem(
            406, f"frames are served for native little-endian pixel data only; this instance is {ts.name}: "
            "retrieve the whole instance instead"
        )
    bits = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated
    if bits % 8:
        raise HTTPProblem(406, "frames of this bit-packed pixel data do not start on byte boundaries")
    pixels = ds.get_item("PixelData", keep_deferred=True)
    size = bits // 8
    count = min(int(ds.get("NumberOfFrames") or 1), pixels.length // size)
    return PixelFrames(path, pixels.value_tell, size, count)


def frames_response(source: PixelFrames, numbers: list[int]) -> Response:
    """The frames asked for, streamed from the file a block at a time; 404 if one does not exist."""
    for number in numbers:
        if number > source.count:
            raise HTTPProblem(404, f"frame {number} does not exist: the instance has {source.count} frame(s)")
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Type: application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
            "\r\n\r\n").encode()

    def parts() -> Iterator[bytes]:
        with source.path.open("rb") as file:
            for number in numbers:
                yield head
                yield from _chunks(file, source.offset + (number - 1) * source.size, source.size)
                yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        parts(),
        media_type=f'multipart/related; type="application/octet-stream"; '
        f"transfer-syntax={ExplicitVRLittleEndian}; boundary={boundary}",
    )
