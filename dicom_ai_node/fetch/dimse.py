"""C-FIND and C-MOVE as an SCU (Study Root), against a configured peer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_ai_node.config import Peer
from dicom_ai_node.errors import NodeError

_PENDING = (0xFF00, 0xFF01)
MAX_MATCHES = 10_000  # answers kept from one C-FIND: memory stays bounded whatever a peer sends
# PS3.4 C.4.2.1.5: the C-MOVE failures an admin can act on, in their words.
_MOVE_FAILURES = {
    0xA801: "does not know the node's AE title {ours} as a move destination: add it, with the node's host and "
            "DICOM port, to the peer's modalities",
    0xA701: "is out of resources (cannot calculate the number of matches)",
    0xA702: "is out of resources (cannot perform the sub-operations)",
    0xA900: "says the identifier does not match the SOP class",
    0xFE00: "cancelled the retrieval",
}


class PeerError(NodeError):
    """A peer cannot be reached, refuses the association, or answers a query with a failure."""


@dataclass(frozen=True)
class StudyQuery:
    """Study-level matching keys (PS3.4 C.6.2.1.2); empty ones are not matched."""

    study_instance_uids: tuple[str, ...] = ()
    accession_number: str = ""
    patient_id: str = ""
    study_date: str = ""  # "YYYYMMDD", or a range "YYYYMMDD-YYYYMMDD" (either end may be open)
    modality: str = ""  # matched against ModalitiesInStudy

    def describe(self) -> str:
        parts = [f"{key} {value}" for key, value in (
            ("study", ", ".join(self.study_instance_uids)), ("accession", self.accession_number),
            ("patient", self.patient_id), ("dates", self.study_date), ("modality", self.modality)) if value]
        return "; ".join(parts) or "every study"


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    modalities: str | None
    instances: int | None  # NumberOfStudyRelatedInstances, if the peer says


@dataclass(frozen=True)
class Moved:
    """How a C-MOVE ended: done, worth trying again later (`transient`), or not; with the peer's counts."""

    ok: bool
    completed: int
    failed: int
    reason: str | None  # why not ok
    transient: bool = False  # the peer was unreachable, busy, or cut off: the same request may succeed later


def _associate(our_ae_title: str, name: str, peer: Peer, context: str, timeout: float, connect_seconds: float = 30):
    ae = AE(ae_title=our_ae_title)
    ae.add_requested_context(context)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = connect_seconds
    ae.dimse_timeout = timeout
    where = f"peer {name} ({peer.ae_title}@{peer.host}:{peer.port})"
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except OSError as exc:
        raise PeerError(f"{where} is unreachable: {exc}") from None
    if assoc.is_rejected:
        raise PeerError(f"{where} rejected the association (does it know the AE title {our_ae_title}?)")
    if not assoc.is_established:
        raise PeerError(f"{where} is unreachable or did not answer")
    if not assoc.accepted_contexts:
        assoc.release()
        raise PeerError(f"{where} does not offer Study Root query/retrieve")
    return assoc, where


def find_studies(our_ae_title: str, name: str, peer: Peer, query: StudyQuery, timeout: float = 60,
                 limit: int = MAX_MATCHES) -> list[FoundStudy]:
    """The studies the peer holds that match `query` (C-FIND, Study Root, STUDY level); more than `limit` is an
    error that asks for a narrower query (a PACS answers a wide date range with its whole archive)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "\\".join(query.study_instance_uids)
    identifier.AccessionNumber = query.accession_number
    identifier.PatientID = query.patient_id
    identifier.StudyDate = query.study_date
    identifier.ModalitiesInStudy = query.modality
    identifier.NumberOfStudyRelatedInstances = ""
    assoc, where = _associate(our_ae_title, name, peer, StudyRootQueryRetrieveInformationModelFind, timeout)
    found = []
    try:
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PeerError(f"{where} aborted the C-FIND, or did not answer it within {timeout:g} s (does it "
                                f"let {our_ae_title} query? Orthanc needs it in DicomModalities)")
            if code in _PENDING and answer is not None and answer.get("StudyInstanceUID"):
                modalities = answer.get("ModalitiesInStudy")
                modalities = [modalities] if isinstance(modalities, str) else list(modalities or [])
                if query.modality and modalities and query.modality not in modalities:
                    continue  # ModalitiesInStudy is an optional matching key: a peer may ignore it
                if len(found) == limit:
                    assoc.abort()
                    raise PeerError(f"{where} has more than {limit} studies matching {query.describe()}: narrow the "
                                    "query (a shorter --dates range, --modality)")
                found.append(FoundStudy(
                    str(answer.StudyInstanceUID), str(answer.get("AccessionNumber") or "") or None,
                    str(answer.get("StudyDate") or "") or None, "\\".join(modalities) or None,
                    _number(answer, "NumberOfStudyRelatedInstances")))
            elif code not in _PENDING and code != 0x0000:
                raise PeerError(f"{where} answered the C-FIND with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def series_counts(our_ae_title: str, name: str, peer: Peer, study_instance_uid: str,
                  timeout: float = 10) -> dict[str, int]:
    """Series Instance UID -> how many instances the peer holds of it, for every series of the study it holds
    (C-FIND, SERIES level, NumberOfSeriesRelatedInstances); series it gives no count for are left out."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_instance_uid
    identifier.SeriesInstanceUID = ""
    identifier.NumberOfSeriesRelatedInstances = ""
    assoc, where = _associate(our_ae_title, name, peer, StudyRootQueryRetrieveInformationModelFind, timeout,
                              connect_seconds=timeout)
    counts = {}
    try:
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PeerError(f"{where} aborted the C-FIND, or did not answer it within {timeout:g} s")
            if code in _PENDING and answer is not None and answer.get("SeriesInstanceUID"):
                number = _number(answer, "NumberOfSeriesRelatedInstances")
                if number is not None and len(counts) < MAX_MATCHES:  # a study of more series is no study
                    counts[str(answer.SeriesInstanceUID)] = number
            elif code not in _PENDING and code != 0x0000:
                raise PeerError(f"{where} answered the C-FIND with status 0x{code:04X}")
    finally:
        assoc.release()
    return counts


def move_study(our_ae_title: str, name: str, peer: Peer, study_instance_uid: str, timeout: float,
               stopping: Callable[[], bool] = lambda: False) -> Moved | None:
    """Ask the peer to C-MOVE the study to the node's own AE title; the instances arrive at the node's SCP.

    Done only when the peer moved something and nothing failed; a study the peer moved none of (gone since the
    C-FIND?) or some of (refused by the node's own SCP?) is not.  `timeout` bounds the whole move, not each
    answer.  None: `stopping()` became true and the move was aborted (the node is stopping; it runs again later).
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    try:
        assoc, where = _associate(our_ae_title, name, peer, StudyRootQueryRetrieveInformationModelMove, timeout)
    except PeerError as exc:
        return Moved(False, 0, 0, str(exc), transient=True)
    # The whole move is bounded: past `timeout` the association is aborted, whatever the peer is doing.
    out_of_time = threading.Timer(timeout, assoc.abort)
    out_of_time.daemon = True
    out_of_time.start()
    completed = failed = warned = 0
    try:
        for status, _ in assoc.send_c_move(identifier, our_ae_title, StudyRootQueryRetrieveInformationModelMove):
            if stopping():
                assoc.abort()
                return None
            code = getattr(status, "Status", None)
            if code is None and out_of_time.finished.is_set():
                return Moved(False, completed, failed, f"{where} had moved {completed} instance(s) when "
                                                       f"fetch.timeout_seconds ({timeout:g} s) ran out",
                             transient=True)
            if code is None:  # pynetdicom's empty status: the association was aborted, or an answer did not come
                hint = (f": does it know the node's AE title {our_ae_title} as a move destination, with the node's "
                        "host and DICOM port? (Orthanc aborts when it does not)" if completed == 0 else "")
                return Moved(False, completed, failed, f"{where} aborted the C-MOVE or stopped answering after "
                                                       f"{completed} instance(s){hint}", transient=completed > 0)
            completed = _count(status, "NumberOfCompletedSuboperations", completed)
            failed = _count(status, "NumberOfFailedSuboperations", failed)
            warned = _count(status, "NumberOfWarningSuboperations", warned)
            if code in _PENDING:
                continue
            moved = completed + warned
            if code in (0x0000, 0xB000) and moved and not failed:
                return Moved(True, moved, 0, None)
            if code in (0x0000, 0xB000) and not failed:
                return Moved(False, 0, 0, f"{where} moved nothing: the study may be gone from it since the C-FIND")
            if code in (0x0000, 0xB000):
                return Moved(False, moved, failed, f"{where} moved {moved} instance(s) and failed {failed} (refused "
                                                   "by this node? see: dicom-ai-node events)", transient=True)
            words = _MOVE_FAILURES.get(code, "answered with status 0x{code:04X}").format(ours=our_ae_title, code=code)
            counts = f" after moving {completed} instance(s) and failing {failed}" if completed or failed else ""
            # Out of resources, or "unable to process" (Orthanc's answer when this node refused its C-STOREs: a
            # full disk here passes, a refused AE title needs the config fixed; both are tried again a few times).
            transient = code in (0xA701, 0xA702) or 0xC000 <= code <= 0xCFFF
            refused = " (refused by this node? see: dicom-ai-node events)" if 0xC000 <= code <= 0xCFFF else ""
            return Moved(False, completed, failed, f"{where} {words}{counts}{refused}", transient=transient)
        return Moved(False, completed, failed, f"{where} ended the C-MOVE without a final status", transient=True)
    finally:
        out_of_time.cancel()
        if assoc.is_established:
            assoc.release()


def _number(dataset: Dataset, keyword: str) -> int | None:
    """An IS or US value the peer sent, or None if it sent none or nonsense."""
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _count(status: Dataset, keyword: str, previous: int) -> int:
    """A sub-operation count from a C-MOVE response; the last one seen if this response has none."""
    number = _number(status, keyword)
    return previous if number is None else number
