"""STOW-RS (PS3.18 §10.5): each part of a request's body written to a file of its own and checked while the
rest arrives, the instances stored together through the ingest path C-STORE uses once the body is whole, and
the Store Instances Response Module (PS3.18 Annex I) listing what was stored, with which warning, and what
failed and why."""

from __future__ import annotations

import errno
import logging
import os
import re
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicom_ai_node.ingest.contexts import ACCEPTED_TRANSFER_SYNTAXES, StoragePolicy, describe
from dicom_ai_node.ingest.parse import DOES_NOT_MATCH_SOP_CLASS, RejectedDataset, parse_header, split_part10
from dicom_ai_node.ingest.receive import Arrival, Received, Receiver
from dicom_ai_node.store.files import DiskFull, FileRange, InstanceStore
from dicom_ai_node.store.index import Arrivals, Index
from dicom_ai_node.values import IngestOutcome, Sender
from dicom_ai_node.web.dicom_json import DICOM_JSON, dicom_json, tag
from dicom_ai_node.web.metrics import Metrics
from dicom_ai_node.web.multipart import (
    BLOCK_BYTES,
    PART_HEAD_BYTES,
    MultipartError,
    MultipartScanner,
    Part,
    parse_media_type,
)
from dicom_ai_node.web.problem import HTTPProblem

log = logging.getLogger(__name__)

# Failure Reason (PS3.18 Table I.2-2) and Warning Reason (Table I.2-1) values.
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
COERCION_OF_DATA_ELEMENTS = 0xB000
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
_ACCEPTED_TS = frozenset(ACCEPTED_TRANSFER_SYNTAXES)


@dataclass(frozen=True)
class StowResult:
    stored: list[dict[str, Any]]  # Referenced SOP Sequence items, WarningReason on those kept from an earlier copy
    failed: list[dict[str, Any]]  # Failed SOP Sequence items
    studies: set[str]  # the studies of the stored instances

    @property
    def warnings(self) -> int:
        return sum(tag("WarningReason") in item for item in self.stored)


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
    audit: bool = False  # a refusal the audit trail records, as C-STORE's are


class Stow:
    """Stores every part of a STOW-RS request through the one ingest path C-STORE uses."""

    def __init__(
        self, index: Index, store: InstanceStore, metrics: Metrics, max_inflated_bytes: int, policy: StoragePolicy
    ) -> None:
        self.index = index
        self.policy = policy
        self.instance_store = store
        self.receiver = Receiver(index, store, max_inflated_bytes=max_inflated_bytes)
        self.metrics = metrics

    def upload(self, boundary: str, sender: Sender, study_uid: str | None) -> Upload:
        return Upload(self, boundary, sender, study_uid)

    def store(self, upload: Upload, base_url: str) -> StowResult:
        """Store together (`Receiver.receive_many`) the parts of a whole body that passed their checks, and
        answer for each.  Their files were written and checked while the body arrived; none is named, so none
        is stored, before the whole body is here."""
        outcomes: list[_Outcome] = []
        arrivals: list[Arrival] = []
        numbers: list[int] = []
        for number, checked in enumerate(upload.checked()):
            if isinstance(checked, Arrival):
                arrivals.append(checked)
                numbers.append(number)
                outcomes.append(_Outcome(None, None))  # replaced below
                continue
            if checked.audit:
                self.receiver.refuse(checked.status, checked.reason, upload.sender, checked.sop_instance_uid)
            outcomes.append(checked)
        received = self.receiver.receive_many(arrivals, upload.sender)
        upload.remove_incoming()
        for number, arrival, answer in zip(numbers, arrivals, received):
            outcomes[number] = _outcome(arrival, answer)
        return self._answer(outcomes, upload.sender, base_url)

    def _answer(self, outcomes: list[_Outcome], sender: Sender, base_url: str) -> StowResult:
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        arrivals = Arrivals()
        for outcome in outcomes:
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
            # PS3.18 Table I.1-1: WarningReason on an instance accepted with a warning.  A SOP Instance UID already
            # held keeps its first copy, so what the URL retrieves may differ from what was sent.
            warning = {"WarningReason": COERCION_OF_DATA_ELEMENTS} if outcome.duplicate else {}
            stored.append(dicom_json({**reference, "RetrieveURL": url, **warning}))
            self.metrics.stow_instance(sender, "duplicate" if outcome.duplicate else "stored", outcome.size)
            arrivals.count(outcome.study_uid, outcome.series_uid, outcome.duplicate)
        if resent := arrivals.only_duplicates():
            try:
                self.index.record_resent(sender, resent)
            except Exception:  # every instance is stored and answered; only the audit line is lost
                log.exception("could not record in the audit trail: %d series sent again by %s", len(resent), sender)
        studies = {outcome.study_uid for outcome in outcomes if not outcome.status}
        return StowResult(stored, failed, studies)

    def check(self, part: Part, path: Path, study_uid: str | None) -> Arrival | _Outcome:
        """The part's instance (received into `path`), its file being made durable, or why it fails (with its
        SOP Class and Instance UIDs when readable)."""
        media = parse_media_type(part.headers.get("content-type", "application/dicom"))[0]
        if media != "application/dicom":
            return _Outcome(None, None, CANNOT_UNDERSTAND, f"part of type {media}, expected application/dicom")
        size = part.end - part.start
        with open(path, "rb", buffering=0) as file:
            head = file.read(PART_HEAD_BYTES)  # the File Meta; the dataset is read from the file as needed
            try:
                meta = split_part10(head)
            except Exception as exc:  # pydicom raises many types for garbage
                sop_class, sop_uid = _referenced_uids(head, None)
                return _Outcome(sop_class, sop_uid, CANNOT_UNDERSTAND, f"not a DICOM file (PS3.10): {exc}")
            ts, offset = meta.transfer_syntax_uid, meta.dataset_offset
            sop_class, sop_uid = meta.sop_class_uid, meta.sop_instance_uid
            if sop_class is None or sop_uid is None:
                file.seek(offset)
                found = _referenced_uids(file.read(PART_HEAD_BYTES), ts)
                sop_class, sop_uid = sop_class or found[0], sop_uid or found[1]
        if sop_class is None or not self.policy.accepts(sop_class):
            return _Outcome(sop_class, sop_uid, SOP_CLASS_NOT_SUPPORTED,
                            f"SOP class {describe(sop_class) if sop_class else '(none)'} is not stored here")
        if ts not in _ACCEPTED_TS:
            return _Outcome(sop_class, sop_uid, TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts} not accepted")
        try:
            dataset = FileRange(path, offset, size - offset)
            header = parse_header(dataset, ts, sop_uid, self.receiver.max_inflated_bytes)
        except RejectedDataset as exc:
            return _Outcome(sop_class, sop_uid, exc.status, str(exc), audit=True)
        if study_uid is not None and header.study_instance_uid != study_uid:
            mismatch = f"StudyInstanceUID {header.study_instance_uid} differs from the study in the URL {study_uid}"
            return _Outcome(header.sop_class_uid, header.sop_instance_uid, DOES_NOT_MATCH_SOP_CLASS, mismatch,
                            audit=True)
        return self.receiver.adopt(header, FileRange(path, 0, size))


class Upload:
    """One STOW-RS request body, each part written to a file of its own while it arrives (`InstanceStore.incoming`)
    and checked (`Stow.check`) as soon as it is whole, while the rest arrives.  Its instances are stored (given
    their names) only once the whole body is here.

    Close it (a `with` block) in every case: the incoming files go, and the instances not stored with them.
    """

    def __init__(self, stow: Stow, boundary: str, sender: Sender, study_uid: str | None) -> None:
        self.sender = sender
        self.study_uid = study_uid
        self.scanner = MultipartScanner(boundary, sink=self)
        self.stow = stow
        self.store = stow.instance_store
        self._incoming: list[Path] = []  # each part's file, in order
        self._writing: int | None = None  # the file of the part arriving now
        self._checked: list[Arrival | _Outcome] = []  # of the parts found whole so far

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._writing is not None:
            os.close(self._writing)
            self._writing = None
        self.remove_incoming()

    def remove_incoming(self) -> None:
        """Remove the incoming files: a stored instance is a second name of its file, and stays."""
        for path in self._incoming:
            path.unlink(missing_ok=True)
        self._incoming.clear()

    async def receive(self, request: Request, limit: int) -> None:
        """Receive the whole body; 413 past `limit` bytes, whether announced by Content-Length or found while
        reading a chunked body; 507 when the disk cannot hold it above storage.min_free_mb."""
        length = request.headers.get("content-length", "")
        declared = int(length) if re.fullmatch(r"[0-9]{1,19}", length) else 0
        if declared > limit:
            raise HTTPProblem(413, f"request body of {declared} bytes exceeds web.max_request_mb")
        await run_in_threadpool(_check_space, self.store, declared)
        received, pending, pending_bytes = 0, [], 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPProblem(413, "request body exceeds web.max_request_mb")
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= BLOCK_BYTES:
                await run_in_threadpool(self._receive_block, pending, pending_bytes)
                pending, pending_bytes = [], 0
        await run_in_threadpool(self._receive_block, pending, pending_bytes)

    def _receive_block(self, chunks: list[bytes], size: int) -> None:
        """Write the content of the next `size` bytes of the body (`chunks`, as received) to their parts' files
        while the disk keeps its floor, and check the parts they complete."""
        _check_space(self.store, size)
        try:
            parts = self.scanner.feed(*chunks)
        except MultipartError as exc:
            raise HTTPProblem(400, f"malformed multipart body, nothing stored: {exc}") from None
        for part in parts:
            number = len(self._checked)
            self._checked.append(self.stow.check(part, self._incoming[number], self.study_uid))

    def part_started(self, headers: dict[str, str]) -> None:
        try:
            path, self._writing = self.store.incoming()
        except DiskFull:
            raise HTTPProblem(507, "the disk filled up while receiving the request; nothing stored") from None
        self._incoming.append(path)

    def content(self, data: memoryview) -> None:
        assert self._writing is not None, "content before a part's headers"
        try:
            while data:  # a file may take less than all
                data = data[os.write(self._writing, data) :]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HTTPProblem(507, "the disk filled up while receiving the request; nothing stored") from None
            raise

    def part_ended(self) -> None:
        if self._writing is not None:
            os.close(self._writing)
            self._writing = None

    def checked(self) -> list[Arrival | _Outcome]:
        """What the check of each part found; 400 if the body is not a whole multipart body."""
        try:
            self.scanner.close()
        except MultipartError as exc:
            raise HTTPProblem(400, f"malformed multipart body, nothing stored: {exc}") from None
        return self._checked


def _outcome(arrival: Arrival, received: Received) -> _Outcome:
    header = arrival.header
    if not received.ok:
        return _Outcome(header.sop_class_uid, header.sop_instance_uid, received.status, received.reason)
    duplicate = received.outcome is IngestOutcome.DUPLICATE
    return _Outcome(
        header.sop_class_uid,
        header.sop_instance_uid,
        size=0 if duplicate else received.size,
        duplicate=duplicate,
        series_uid=header.series_instance_uid,
        study_uid=header.study_instance_uid,
    )


def _referenced_uids(data: bytes, transfer_syntax: str | None) -> tuple[str | None, str | None]:
    """SOP Class and Instance UID from the start of a dataset that cannot be stored, for its failure item.

    Read leniently: `transfer_syntax` from the File Meta when there is one, else (a bare dataset sent
    as application/dicom) explicit and then implicit VR little endian.
    """
    syntaxes = [UID(transfer_syntax)] if transfer_syntax else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    for syntax in syntaxes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian,
                                  stop_when=lambda tag, vr, length: tag > _SOP_INSTANCE_UID)
            found = (str(ds.get("SOPClassUID", "")).strip() or None, str(ds.get("SOPInstanceUID", "")).strip() or None)
        except Exception:  # pydicom raises many types for garbage
            continue
        if all(found):
            return found
    return None, None


def stow_response(result: StowResult, base_url: str, study_uid: str | None) -> Response:
    """The Store Instances Response Module (PS3.18 Annex I) with the status of PS3.18 Table 10.5.3-1.

    200 when every instance was stored as sent, 202 when some were stored and others failed or carry a
    warning, 409 when none was stored.  The top-level RetrieveURL (Type 2) is the study's: the one in the
    URL, or the one study every stored instance belongs to; empty when they belong to several or none.
    """
    study = study_uid or (next(iter(result.studies)) if len(result.studies) == 1 else None)
    body: dict[str, Any] = dicom_json({"RetrieveURL": f"{base_url}/studies/{study}" if study else None})
    if result.failed:
        body[tag("FailedSOPSequence")] = {"vr": "SQ", "Value": result.failed}
    if result.stored:
        body[tag("ReferencedSOPSequence")] = {"vr": "SQ", "Value": result.stored}
    status = 409 if not result.stored else 202 if result.failed or result.warnings else 200
    headers = {}
    if result.warnings:
        headers["Warning"] = (f'299 dicom-ai-node "{result.warnings} instance(s) were stored before; the first copy '
                              'of each is kept (WarningReason B000)"')
    return JSONResponse(dict(sorted(body.items())), status_code=status, media_type=DICOM_JSON, headers=headers)


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


def _check_space(store: InstanceStore, incoming: int) -> None:
    try:
        store.check_space(incoming)
    except DiskFull as exc:
        raise HTTPProblem(507, f"not enough disk space for this request, nothing stored: {exc.strerror}") from None
