"""STOW-RS: a request's body spooled to disk whole, then each instance stored through the
ingest path C-STORE uses, and the DICOM JSON answer listing what was stored and what failed."""

from __future__ import annotations

import errno
import logging
import re
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.ingest.contexts import ACCEPTED_TRANSFER_SYNTAXES, StoragePolicy, describe
from dicom_ai_node.ingest.parse import DOES_NOT_MATCH_SOP_CLASS, RejectedDataset, parse_header, split_part10
from dicom_ai_node.ingest.receive import Receiver
from dicom_ai_node.store.files import DiskFull, InstanceStore
from dicom_ai_node.store.index import Arrivals, Index
from dicom_ai_node.values import IngestOutcome, Sender
from dicom_ai_node.web.dicom_json import DICOM_JSON, dicom_json, tag
from dicom_ai_node.web.metrics import Metrics
from dicom_ai_node.web.multipart import BLOCK_BYTES, PART_HEAD_BYTES, Part, parse_media_type, read_range
from dicom_ai_node.web.problem import HTTPProblem

log = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
_ACCEPTED_TS = frozenset(ACCEPTED_TRANSFER_SYNTAXES)


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

    def __init__(
        self, index: Index, store: InstanceStore, metrics: Metrics, max_inflated_bytes: int, policy: StoragePolicy
    ) -> None:
        self.index = index
        self.policy = policy
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
            meta, offset = split_part10(read_range(body, part.start, min(size, PART_HEAD_BYTES)))
        except Exception as exc:  # pydicom raises many types for garbage
            return _Outcome(None, None, CANNOT_UNDERSTAND, f"cannot read the File Meta Information: {exc}")
        sop_class = str(meta.get("MediaStorageSOPClassUID", "")) or None
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", "")) or None
        ts = str(meta.TransferSyntaxUID)
        if sop_class is None or not self.policy.accepts(sop_class):
            return _Outcome(sop_class, sop_uid, SOP_CLASS_NOT_SUPPORTED,
                            f"SOP class {describe(sop_class) if sop_class else '(none)'} is not stored here")
        if ts not in _ACCEPTED_TS:
            return _Outcome(sop_class, sop_uid, TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts} not accepted")
        # The dataset and then the whole file are read from the body separately, so at most two copies of
        # one instance are in memory while it is checked and written.
        dataset = read_range(body, part.start + offset, size - offset)
        if study_uid is not None and (mismatch := self._study_mismatch(dataset, ts, study_uid)):
            self.index.record(
                EventKind.STORE_FAILED, f"instance {sop_uid} from {sender} refused: {mismatch}", level=Level.ERROR,
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
        body[tag("FailedSOPSequence")] = {"vr": "SQ", "Value": result.failed}
    if result.stored:
        body[tag("ReferencedSOPSequence")] = {"vr": "SQ", "Value": result.stored}
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
            if len(pending) >= BLOCK_BYTES:
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
