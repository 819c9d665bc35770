"""C-STORE to a DICOM node: all files of one send() over ONE association.

Presentation contexts are proposed for exactly the SOP classes of the files, read
from their File Meta, so SOP classes missing from pynetdicom's default storage list
(Label Map Segmentation Storage) go out as well, and a destination that does not
support one is told apart from one that is down.

Files are read with dcmread() one at a time and sent as datasets, not by path with
pynetdicom's `_config.STORE_SEND_CHUNKED_DATASET`: that switch is process-wide
(it would change every other send_c_store in the node) and it forbids any
conversion, so a file in Explicit VR could not go out over a context the peer
accepted only with Implicit VR.  pydicom re-encodes the elements it read without
decoding them, so pixel data goes out as stored, and only one object (SEG and SR
are a few MB at most) is held in memory at a time.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from ..config import DimseDestination
from ..values import DeliveryOutcome as Outcome

log = logging.getLogger(__name__)

_STATUS_TEXT = {code: text for code, (_, text) in {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS}.items()}
_RESOURCE_LIMITATION = 0x0213  # general status: the peer is busy, like Out of Resources
# SOP classes newer than pydicom's UID dictionary, named so that reasons do not show a bare UID.
_NEWER_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}


@dataclass(frozen=True)
class _Object:
    path: Path
    sop_class: UID
    transfer_syntax: UID


class _Unusable(Exception):
    """A local file or TLS setting that no retry can fix."""


class DimseSender:
    """C-STORE SCU for one destination; a fresh AE and association per send()."""

    def __init__(self, name: str, destination: DimseDestination, our_ae_title: str) -> None:
        self.name = name
        self.destination = destination
        self.our_ae_title = our_ae_title
        self.where = f"{destination.ae_title}@{destination.host}:{destination.port}"

    def send(self, files: list[Path]) -> Outcome:
        try:
            objects = [_read_meta(path) for path in files]
            tls = _tls_context(self.destination) if self.destination.tls else None
        except _Unusable as exc:
            return Outcome(False, True, str(exc))
        if not objects:
            return Outcome(True, False, "nothing to send")

        ae = AE(ae_title=self.our_ae_title)
        timeout = self.destination.timeout_seconds
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        connected: list[bool] = []  # pynetdicom reports no reason when it cannot connect; this tells us it did
        try:
            assoc = ae.associate(
                self.destination.host,
                self.destination.port,
                contexts=_contexts(objects),
                ae_title=self.destination.ae_title,
                tls_args=(tls, self.destination.host) if tls else None,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
            )
        except OSError as exc:  # pynetdicom resolves the host name before it connects
            return Outcome(False, False, f"cannot connect to {self.where}: {(exc.strerror or str(exc)).lower()}")
        if not assoc.is_established:
            return self._not_established(assoc, bool(connected), objects, tls)
        try:
            refused = _refusals(assoc, objects)
            if refused:
                return Outcome(False, True, f"{self.where}: " + "; ".join(refused))
            return self._store(assoc, objects)
        finally:
            if assoc.is_established:
                assoc.release()

    def probe(self, timeout: float) -> bool | None:
        """Does the destination answer?  A TCP connection first (so a PACS that is down costs one refused
        connection and no pynetdicom error in the log), then a C-ECHO in an association made as send()
        makes it (our AE title, TLS).  An association accepted or rejected for good counts as an answer
        (it is up: the send will tell what it thinks of us); a transient rejection, as not answering."""
        try:
            tls = _tls_context(self.destination) if self.destination.tls else None
        except _Unusable:
            return None
        try:
            socket.create_connection((self.destination.host, self.destination.port), timeout=timeout).close()
        except OSError:
            return False
        ae = AE(ae_title=self.our_ae_title)
        ae.add_requested_context(Verification)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        try:
            assoc = ae.associate(
                self.destination.host,
                self.destination.port,
                ae_title=self.destination.ae_title,
                tls_args=(tls, self.destination.host) if tls else None,
            )
        except OSError:
            return False
        if assoc.is_established:
            try:
                assoc.send_c_echo()
            finally:
                assoc.release()
            return True
        answer = assoc.acceptor.primitive
        return answer is not None and answer.result in (0x00, 0x01)  # 0x00: accepted, but not Verification

    def _store(self, assoc: Association, objects: list[_Object]) -> Outcome:
        warnings: list[tuple[int, str]] = []
        for number, item in enumerate(objects, start=1):
            done = f"{number - 1} of {len(objects)} object(s) stored before"
            try:
                dataset = dcmread(item.path)
            except (OSError, InvalidDicomError) as exc:
                return Outcome(False, True, f"cannot read {item.path}: {exc}")
            try:
                status = assoc.send_c_store(dataset, msg_id=number)
            except ValueError as exc:  # cannot be encoded in the agreed transfer syntax
                return Outcome(False, True, f"cannot send {item.path.name} to {self.where}: {exc}")
            if "Status" not in status:  # pynetdicom returns an empty dataset on abort or DIMSE timeout
                return Outcome(
                    False,
                    False,
                    f"no C-STORE response from {self.where} for {item.path.name} "
                    f"(association aborted or no answer within {self.destination.timeout_seconds:g} s); {done}",
                )
            code = int(status.Status)
            text = _status_text(code, status)
            log.debug("%s: C-STORE %s -> 0x%04X %s", self.name, item.path.name, code, text)
            category = code_to_category(code)
            if category == "Success":
                continue
            if category == "Warning":
                warnings.append((code, f"{item.path.name}: 0x{code:04X} {text}"))
                continue
            transient = 0xA700 <= code <= 0xA7FF or code == _RESOURCE_LIMITATION
            return Outcome(
                False,
                not transient,
                f"C-STORE of {item.path.name} refused by {self.where} ({'transient' if transient else 'permanent'}):"
                f" 0x{code:04X} {text}; {done}",
                f"0x{code:04X}",
            )
        reason = f"{len(objects)} object(s) stored on {self.where} in one association"
        if warnings:
            return Outcome(
                True, False, reason + " with warnings: " + "; ".join(w for _, w in warnings), f"0x{warnings[0][0]:04X}"
            )
        return Outcome(True, False, reason, "0x0000")

    def _not_established(
        self, assoc: Association, connected: bool, objects: list[_Object], tls: ssl.SSLContext | None
    ) -> Outcome:
        answer = assoc.acceptor.primitive
        if not connected:
            return Outcome(False, False, f"cannot connect to {self.where}: {self._why_unreachable(tls)}")
        if answer is not None and answer.result in (0x01, 0x02):
            permanent = answer.result == 0x01
            return Outcome(
                False,
                permanent,
                f"association rejected ({'permanent' if permanent else 'transient'}) by {self.where}: "
                f"{answer.reason_str} (source: {answer.source_str})",
                f"A-ASSOCIATE-RJ {answer.result}/{answer.result_source}/{answer.diagnostic}",
            )
        if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
            return Outcome(False, True, f"{self.where}: " + "; ".join(_refusals(assoc, objects)))
        return Outcome(False, False, f"association with {self.where} aborted or timed out before it was established")

    def _why_unreachable(self, tls: ssl.SSLContext | None) -> str:
        """pynetdicom only logs why it could not connect; one more attempt, made the same way, says why.
        Its timeout is capped: the first attempt already waited the full timeout."""
        try:
            with socket.create_connection(
                (self.destination.host, self.destination.port), timeout=min(self.destination.timeout_seconds, 5.0)
            ) as sock:
                if tls is not None:
                    tls.wrap_socket(sock, server_hostname=self.destination.host).close()
        except ssl.SSLError as exc:
            return f"TLS handshake failed: {exc}"
        except TimeoutError:
            return "connection timed out"
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
        return "the connection failed, a second attempt succeeded"


def _read_meta(path: Path) -> _Object:
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        raise _Unusable(f"cannot read the File Meta of {path}: {exc}") from None
    if "MediaStorageSOPClassUID" not in meta or "TransferSyntaxUID" not in meta:
        raise _Unusable(f"{path} has no Media Storage SOP Class UID or Transfer Syntax UID in its File Meta")
    return _Object(path, UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID))


def _contexts(objects: list[_Object]) -> list[PresentationContext]:
    """Per SOP class: one context with its uncompressed syntaxes plus Explicit and Implicit VR Little
    Endian (any of them can be sent after conversion), and one context per compressed syntax, which
    can only go out as it is and must not be crowded out by the peer preferring an uncompressed one."""
    syntaxes: dict[UID, list[UID]] = defaultdict(list)
    for item in objects:
        if item.transfer_syntax not in syntaxes[item.sop_class]:
            syntaxes[item.sop_class].append(item.transfer_syntax)
    contexts = []
    for sop_class, found in syntaxes.items():
        native = [ts for ts in found if not ts.is_compressed]
        contexts.append(
            build_context(sop_class, list(dict.fromkeys([*native, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        )
        contexts.extend(build_context(sop_class, ts) for ts in found if ts.is_compressed)
    return contexts


def _refusals(assoc: Association, objects: list[_Object]) -> list[str]:
    """What the peer's answer rules out: SOP classes with no accepted context, or none usable for a file's syntax."""
    why = {cx.abstract_syntax: cx.status for cx in assoc.rejected_contexts}
    problems: list[str] = []
    for item in objects:
        agreed = [UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class]
        if not agreed:
            problem = (
                f"SOP class {_name(item.sop_class)} not supported by the destination"
                f" (presentation context rejected: {why.get(item.sop_class, 'no answer')})"
            )
        elif not any(_convertible(item.transfer_syntax, ts) for ts in agreed):
            problem = (
                f"{_name(item.sop_class)} accepted only as {', '.join(ts.name for ts in agreed)}, "
                f"which {item.path.name} ({item.transfer_syntax.name}) cannot be sent as without decompressing it"
            )
        else:
            continue
        if problem not in problems:
            problems.append(problem)
    return problems


def _name(sop_class: UID) -> str:
    name = _NEWER_SOP_CLASSES.get(sop_class, sop_class.name)
    return f"{name} ({sop_class})" if name != sop_class else str(sop_class)


def _convertible(have: UID, agreed: UID) -> bool:
    """pynetdicom's rule: the same syntax, or both uncompressed with the same byte order."""
    return have == agreed or (
        not have.is_compressed and not agreed.is_compressed and have.is_little_endian == agreed.is_little_endian
    )


def _tls_context(destination: DimseDestination) -> ssl.SSLContext:
    """Built for every send, so renewed certificate files are picked up without a restart."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None
        )
        if destination.tls_cert_file:
            context.load_cert_chain(destination.tls_cert_file, destination.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise _Unusable(f"cannot load the TLS certificate files: {exc}") from None
    return context


def _status_text(code: int, status: Dataset) -> str:
    text = _STATUS_TEXT.get(code, "unknown status")
    comment = status.get("ErrorComment")
    return f"{text} ({comment})" if comment else text
