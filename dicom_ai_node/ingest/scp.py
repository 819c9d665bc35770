"""The DICOM Storage SCP: C-ECHO and C-STORE over pynetdicom.

A C-STORE is answered Success only once the instance is fsynced on disk and
its row committed in the index.  Every failure is answered with a specific
status and an Error Comment the sender's log will show, and is recorded in the
node's audit trail; the association stays open for the next instance.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_ai_node.config import Config
from dicom_ai_node.ingest.contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS
from dicom_ai_node.ingest.receive import SUCCESS, Receiver
from dicom_ai_node.ingest.part10 import part10
from dicom_ai_node.ingest.policy import AssociationPolicy
from dicom_ai_node.ingest.transport import start_acceptor
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index, Outcome, Sender

log = logging.getLogger(__name__)

# Presentation context results, PS3.8 §9.3.3.2.
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
_TRANSFER_SYNTAX_NOT_SUPPORTED = 0x04


@dataclass
class _AssociationTally:
    sender: Sender
    opened: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO: at most 64 characters
    return status


class StorageSCP:
    def __init__(self, config: Config, index: Index, store: InstanceStore) -> None:
        self.config = config
        self.index = index
        self.receiver = Receiver(index, store, concurrency=config.dimse.max_associations)
        self.policy = AssociationPolicy(
            our_ae_title=config.node.ae_title,
            require_called_ae_title=config.dimse.require_called_ae_title,
            allowed_callers=tuple(config.dimse.allowed_callers),
        )
        self._tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server = None
        self.ae = self._application_entity()

    def _application_entity(self) -> AE:
        dimse = self.config.dimse
        ae = AE(ae_title=self.config.node.ae_title)
        ae.maximum_associations = dimse.max_associations
        ae.maximum_pdu_size = dimse.max_pdu_size
        ae.acse_timeout = dimse.acse_timeout_seconds
        ae.dimse_timeout = dimse.dimse_timeout_seconds
        ae.network_timeout = dimse.network_timeout_seconds
        ae.require_called_aet = False  # checked, with a logged reason, in _on_requested
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        address = (self.config.dimse.bind, self.config.dimse.port)
        self._server = start_acceptor(self.ae, address, handlers)
        log.info(
            "DICOM SCP %s listening on %s:%d (max %d associations)",
            self.config.node.ae_title,
            *address,
            self.config.dimse.max_associations,
        )

    def stop(self) -> None:
        """Stop accepting associations and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_requested(self, event: evt.Event) -> None:
        request = event.assoc.requestor.primitive
        calling, called = request.calling_ae_title, request.called_ae_title
        host = event.assoc.requestor.address
        rejection = self.policy.check(called, calling, host)
        if rejection is None:
            return
        log.warning("association from %s@%s rejected: %s", calling, host, rejection.reason)
        self.index.record_event(
            "association-rejected", rejection.reason, level="warning", calling_ae_title=calling.strip()[:16]
        )
        event.assoc.acse.send_reject(*rejection.result_source_diagnostic)
        event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL send the A-ASSOCIATE-RJ first

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        sender = Sender(requestor.ae_title.strip(), requestor.address)
        with self._lock:
            self._tallies[event.assoc] = _AssociationTally(sender)
        log.info("association from %s established", sender)
        for context in event.assoc.rejected_contexts:
            self._report_rejected_context(context, sender)

    def _report_rejected_context(self, context, sender: Sender) -> None:
        """Say why a proposed SOP class or transfer syntax was turned down.

        Contexts for known non-storage services (query/retrieve, worklist, ...)
        are routine for multi-purpose SCUs and only logged; a SOP class nobody
        knows (private or newer than this node) is what an admin must hear about.
        """
        sop_class = UID(context.abstract_syntax)
        storage_or_unknown = sop_class.name == str(sop_class) or sop_class.keyword.endswith("Storage")
        if context.result == _ABSTRACT_SYNTAX_NOT_SUPPORTED and storage_or_unknown:
            reason = (
                f"{sender} proposed SOP class {sop_class} ({sop_class.name}), which this node does not store; "
                "its instances cannot be received"
            )
            log.warning("%s", reason)
            self.index.record_event("unsupported-sop-class", reason, level="warning", calling_ae_title=sender.ae_title)
        elif context.result == _TRANSFER_SYNTAX_NOT_SUPPORTED:
            offered = ", ".join(UID(ts).name for ts in context.transfer_syntax)
            reason = f"{sender} offered {sop_class.name} only in transfer syntaxes this node does not accept: {offered}"
            log.warning("%s", reason)
            self.index.record_event(
                "unsupported-transfer-syntax", reason, level="warning", calling_ae_title=sender.ae_title
            )
        else:
            log.info("%s: presentation context for %s not accepted", sender, sop_class.name)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(event.assoc, None)
        if tally is None:
            return
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        log.info(
            "association from %s %s after %.2f s: %d stored (%.1f MB), %d duplicate(s), %d failed",
            tally.sender,
            how,
            time.monotonic() - tally.opened,
            tally.stored,
            tally.bytes / 1e6,
            tally.duplicates,
            tally.failed,
        )

    @staticmethod
    def _on_echo(event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        tally = self._tallies.get(event.assoc)
        if tally is None:
            requestor = event.assoc.requestor
            tally = _AssociationTally(Sender(requestor.ae_title.strip(), requestor.address))
        status = self._store(event, tally)
        code = status if isinstance(status, int) else status.Status
        if code != SUCCESS:
            tally.failed += 1
        return status

    def _store(self, event: evt.Event, tally: _AssociationTally) -> int | Dataset:
        request = event.request
        dataset = request.DataSet.getvalue()
        transfer_syntax = event.context.transfer_syntax
        received = self.receiver.receive(
            dataset,
            transfer_syntax,
            lambda: part10(
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
                transfer_syntax,
                tally.sender.ae_title or "",
                dataset,
            ),
            tally.sender,
            request.AffectedSOPInstanceUID,
        )
        if not received.ok:
            return _status(received.status, received.reason)
        if received.outcome is Outcome.DUPLICATE:
            tally.duplicates += 1
        else:
            tally.stored += 1
            tally.bytes += received.size
        return SUCCESS
