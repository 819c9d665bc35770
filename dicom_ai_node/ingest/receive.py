"""The one durable ingest path, whatever the way in (C-STORE, STOW-RS, Orthanc pull).

Check the header, skip a duplicate, write the file durably, index it: only then
is the instance accepted.  Every refusal carries the DICOM status a C-STORE
would answer (STOW-RS maps it into its FailedSOPSequence) and is written to the
audit trail.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.ingest.contexts import SopClassKind, classify, describe
from dicom_ai_node.ingest.parse import DEFAULT_MAX_INFLATED_BYTES, RejectedDataset, parse_header
from dicom_ai_node.store.files import DiskFull, FileRange, InstanceStore, is_valid_uid
from dicom_ai_node.store.index import Index
from dicom_ai_node.values import IngestOutcome, InstanceHeader, Sender

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110
# Refusals the sender is expected to recover from by sending again: its series waits for them.
TRANSIENT = (OUT_OF_RESOURCES, PROCESSING_FAILURE)


Part10 = bytes | memoryview | FileRange  # a file to store, in memory or received into a file (STOW-RS)


@dataclass(frozen=True)
class Arrival:
    """One instance of a request, its header checked and its file being made durable (`Receiver.adopt`)."""

    header: InstanceHeader
    part10: Part10
    prepared: Future  # of a Prepared file


@dataclass(frozen=True)
class Received:
    status: int  # a C-STORE status: 0x0000 or a failure
    reason: str  # empty on success
    header: InstanceHeader | None
    outcome: IngestOutcome | None  # NEW, DUPLICATE or LATE when stored
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class _KeyedLocks:
    """One lock per key in use (a SOP Instance UID), dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


# Process-wide: C-STORE, STOW-RS and the Orthanc pull each have a Receiver, and may all
# deliver the same instance at once.
_arrivals = _KeyedLocks()


class _Once:
    """The keys seen lately (the last `size`), so a finding is written once per series, not once per instance."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


_reported = _Once()  # process-wide too: one audit line per series whichever way its instances come
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Receiver:
    """The receive path; the file is written and the row committed concurrently.

    Both must be done before the instance counts as received, so they overlap
    (an fsync and a database commit each wait on the disk).  Neither side asks
    first whether the instance is already stored: the INSERT reports a
    duplicate row, and the file is linked into place only if none is there, so
    the first copy is kept and a row whose file was lost gets it back.  If the
    file cannot be written the new row is removed again.  Readers never race
    this window: a series is processed only once it has been quiet for
    `stable_seconds`.

    Two arrivals of one SOP Instance UID (two senders, or a sender and a
    re-send) take turns, so the row and the kept file always describe the same
    copy; different instances never wait for each other.
    """

    def __init__(
        self,
        index: Index,
        store: InstanceStore,
        concurrency: int = 16,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ) -> None:
        self.index = index
        self.store = store
        self.max_inflated_bytes = max_inflated_bytes
        self._files = ThreadPoolExecutor(concurrency, thread_name_prefix="instance-write")

    def receive(
        self,
        dataset: bytes,
        transfer_syntax: str,
        part10: Callable[[], Part10],
        sender: Sender,
        affected_sop_instance_uid: str | None = None,
    ) -> Received:
        """Ingest one instance: `dataset` as sent (no File Meta), `part10()` the file to store."""
        try:
            header = parse_header(dataset, transfer_syntax, affected_sop_instance_uid, self.max_inflated_bytes)
        except RejectedDataset as exc:
            return self._refuse(exc.status, str(exc), sender, None, affected_sop_instance_uid)
        with _arrivals.hold(header.sop_instance_uid):
            return self._receive(header, part10, sender)

    def adopt(self, header: InstanceHeader, incoming: FileRange) -> Arrival:
        """Start making an instance received into an incoming file durable (`InstanceStore.adopt`) for
        `receive_many`, in the background."""
        relative = self.store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        return Arrival(header, incoming, self._files.submit(self.store.adopt, relative, incoming))

    def receive_many(self, arrivals: list[Arrival], sender: Sender) -> list[Received]:
        """Ingest the instances of one request (a STOW-RS body) together, answering for each as `receive` would.

        The same guarantee, paid once per request rather than once per instance: the
        files, fsynced in parallel by `adopt`, are named, their folders
        fsynced once each, and all rows committed in one transaction; none counts as
        received before all of that is done.  A SOP Instance UID sent twice in the
        request is taken once first, then again as the duplicate it is.
        """
        results: list[Received | None] = [None] * len(arrivals)
        first: dict[str, int] = {}
        again: list[int] = []
        for number, arrival in enumerate(arrivals):
            uid = arrival.header.sop_instance_uid
            if uid in first:
                again.append(number)
            else:
                first[uid] = number
        with contextlib.ExitStack() as holding:
            for uid in sorted(first):  # one order for every caller: two requests never wait for each other in turn
                holding.enter_context(_arrivals.hold(uid))
            self._receive_together([(number, arrivals[number]) for number in first.values()], sender, results)
        for number in again:
            arrival = arrivals[number]
            _discard(arrival.prepared)
            with _arrivals.hold(arrival.header.sop_instance_uid):
                results[number] = self._receive(arrival.header, lambda data=arrival.part10: data, sender)
        return [result for result in results if result is not None]

    def _receive_together(
        self, arrivals: list[tuple[int, Arrival]], sender: Sender, results: list[Received | None]
    ) -> None:
        directories: set[Path] = set()
        placed: list[tuple[int, Arrival, str, bool]] = []
        for number, arrival in arrivals:
            try:
                prepared = arrival.prepared.result()
                placed.append((number, arrival, prepared.relative, self.store.place(
                    prepared, replace=False, unsynced_directories=directories
                )))
            except OSError:  # alone, as C-STORE would: a re-send needs no space, a refusal says why
                results[number] = self._receive(arrival.header, lambda data=arrival.part10: data, sender)
        try:
            outcomes = self.index.record_instances(
                [(arrival.header, relative, len(arrival.part10)) for _, arrival, relative, _ in placed], sender
            )
        except Exception as exc:  # database down or broken: the sender must keep its copies
            log.exception("indexing %d instances failed", len(placed))
            for number, arrival, _, _ in placed:  # a file without a row is replaced when the sender tries again
                results[number] = self._refuse(
                    PROCESSING_FAILURE, f"cannot index the instance: {exc}", sender, arrival.header
                )
            return
        unsynced = self.store.sync_directories(directories)
        for (number, arrival, relative, in_place), outcome in zip(placed, outcomes):
            written: Future = Future()
            folder = self.store.absolute(relative).parent
            errors = [unsynced[path] for path in (folder, folder.parent, folder.parent.parent) if path in unsynced]
            if errors:  # the file is written, but its name may not survive a crash: not received
                written.set_exception(errors[0])
            else:
                written.set_result(in_place)
            results[number] = self._conclude(arrival.header, sender, relative, arrival.part10, outcome, written)

    def _receive(self, header: InstanceHeader, part10: Callable[[], Part10], sender: Sender) -> Received:
        try:
            relative = self.store.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            data = part10()
            self.store.check_space(len(data))
        except DiskFull as exc:
            if self._already_stored(header, relative):  # a re-send needs no space
                return Received(SUCCESS, "", header, IngestOutcome.DUPLICATE)
            return self._refuse(OUT_OF_RESOURCES, exc.strerror or str(exc), sender, header)
        except OSError as exc:
            return self._refuse(OUT_OF_RESOURCES, f"cannot write the instance: {exc}", sender, header)
        writing = self._files.submit(self.store.write_instance, relative, data, replace=False)
        try:
            outcome = self.index.record_instance(header, sender, relative, len(data))
        except Exception as exc:  # database down or broken: the sender must keep its copy
            log.exception("indexing %s failed", header.sop_instance_uid)
            _settle(writing)  # a file without a row is replaced when the sender tries again
            return self._refuse(PROCESSING_FAILURE, f"cannot index the instance: {exc}", sender, header)
        return self._conclude(header, sender, relative, data, outcome, writing)

    def _conclude(
        self, header: InstanceHeader, sender: Sender, relative: str, data: Part10, outcome: IngestOutcome,
        writing: Future,
    ) -> Received:
        """The answer for an indexed instance once its file write ended: keep the first copy, undo on failure."""
        try:
            placed = writing.result()
            if not placed and outcome is not IngestOutcome.DUPLICATE:
                # A file no row described (left by a crash or a failed index): never acknowledged,
                # so the copy the new row describes takes its place.
                self.store.write_instance(relative, data)
        except OSError as exc:
            if outcome is IngestOutcome.DUPLICATE and self.store.absolute(relative).exists():
                return Received(SUCCESS, "", header, outcome)  # the first copy is whole and indexed
            if outcome is not IngestOutcome.DUPLICATE:
                self.index.forget_instance(header.sop_instance_uid)
            reason = exc.strerror if isinstance(exc, DiskFull) else f"cannot write the instance: {exc}"
            return self._refuse(OUT_OF_RESOURCES, reason or str(exc), sender, header)
        if outcome is IngestOutcome.DUPLICATE:
            if placed:  # the row's file was missing, or the copy names another study or series
                self._settle_duplicate(header, sender, relative, len(data))
            log.debug("duplicate %s from %s: first copy kept", header.sop_instance_uid, sender)
        else:
            self._report_nonconformance(header, sender, relative)
        return Received(SUCCESS, "", header, outcome, len(data))

    def _report_nonconformance(self, header: InstanceHeader, sender: Sender, relative: str) -> None:
        """Say, once per series, that a retired or unknown SOP class or a UID that is not a UID was stored.

        Both are stored as a PACS would, but whoever reads the series later
        (a viewer, a model, another archive) may stumble on them.
        """
        series = header.series_instance_uid
        uids = {"study_instance_uid": header.study_instance_uid, "series_instance_uid": series,
                "calling_ae_title": sender.ae_title}
        if classify(header.sop_class_uid) in (SopClassKind.RETIRED, SopClassKind.UNKNOWN) and _reported.first(
            (series, header.sop_class_uid)
        ):
            self.index.report(
                EventKind.NONSTANDARD_SOP_CLASS,
                f"series {series} from {sender}: instances of SOP class {describe(header.sop_class_uid)} stored "
                f"(first {header.sop_instance_uid}); viewers and models may not know this class",
                Level.WARNING, logger=log, **uids,
            )
        values = (header.study_instance_uid, series, header.sop_instance_uid)
        invalid = [f"{keyword} {value!r}" for keyword, value in zip(_UID_KEYWORDS, values) if not is_valid_uid(value)]
        if invalid and _reported.first((series, EventKind.INVALID_UID)):
            self.index.report(
                EventKind.INVALID_UID,
                f"series {series!r} from {sender}: stored with {', '.join(invalid)}, not valid UIDs (PS3.5 §9.1); "
                f"kept as sent in the index, the file is named by digest: {relative}",
                Level.WARNING, logger=log, **uids,
            )

    def _settle_duplicate(self, header: InstanceHeader, sender: Sender, relative: str, size: int) -> None:
        """A duplicate whose file went into place: make the row describe it, or take it away again."""
        if self.index.describe_copy(header, sender, relative, size):
            log.warning("instance %s had lost its file; the copy from %s is stored in its place",
                        header.sop_instance_uid, sender)
        else:  # the first copy sits under another study or series: it stays the only one
            self.store.absolute(relative).unlink(missing_ok=True)

    def _already_stored(self, header: InstanceHeader, relative: str) -> bool:
        """True (and counted as a duplicate) if the instance's row and file both exist."""
        series_id = self.index.stored_series_id(header.sop_instance_uid)
        if series_id is None or not self.store.absolute(relative).exists():
            return False
        self.index.record_duplicate(series_id)
        return True

    def refuse(self, code: int, reason: str, sender: Sender, sop_instance_uid: str | None) -> Received:
        """Refuse an instance whose dataset was found wanting before it reached `receive` (audited as there)."""
        return self._refuse(code, reason, sender, None, sop_instance_uid)

    def _refuse(
        self,
        code: int,
        reason: str,
        sender: Sender,
        header: InstanceHeader | None,
        sop_instance_uid: str | None = None,
    ) -> Received:
        sop = header.sop_instance_uid if header else sop_instance_uid
        log.error("instance %s from %s refused (0x%04X): %s", sop or "?", sender, code, reason)
        message = f"instance {sop or '?'} from {sender} refused with status 0x{code:04X}: {reason}"
        try:
            if header is not None and code in TRANSIENT:  # its series waits for the re-send
                self.index.record_refusal(header, sender, code, reason, message)
            else:
                self.index.record(
                    EventKind.STORE_FAILED,
                    message,
                    level=Level.ERROR,
                    study_instance_uid=header.study_instance_uid if header else None,
                    series_instance_uid=header.series_instance_uid if header else None,
                    sop_instance_uid=sop,
                    calling_ae_title=sender.ae_title,
                )
        except Exception:  # the audit trail must not turn a clear refusal into a crash
            log.exception("could not record the refusal in the audit trail")
        return Received(code, reason, header, None)


def _discard(preparing: Future) -> None:
    """Remove a prepared file that will not be used (its write may still be running)."""
    try:
        preparing.result().discard()
    except OSError:
        pass


def _settle(future: Future) -> None:
    """Wait for a write whose outcome no longer matters (its failure is already being reported)."""
    try:
        future.result()
    except OSError:
        pass
