"""The DICOM Storage SCP: C-ECHO and C-STORE over pynetdicom.

A C-STORE is answered Success only once the instance is fsynced on disk and
its row committed in the index.  Every failure is answered with a specific
status and an Error Comment the sender's log will show, and is recorded in the
node's audit trail; the association stays open for the next instance.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_ai_node.config import Config, DimseTLS
from dicom_ai_node.errors import StartupError
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.ingest.admission import REJECT_CONGESTION, REJECT_LOCAL_LIMIT, Admission, Refusal
from dicom_ai_node.ingest.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    SopClassKind,
    StoragePolicy,
    classify,
)
from dicom_ai_node.ingest.part10 import part10
from dicom_ai_node.ingest.policy import AssociationPolicy, Rejection, certificate_subject, describe_subject
from dicom_ai_node.ingest.receive import SUCCESS, Receiver
from dicom_ai_node.ingest.transport import GuardedServer, bind_acceptor, serve_acceptor
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Arrivals, Index
from dicom_ai_node.tls import apply_bcp195
from dicom_ai_node.values import IngestOutcome, Sender

log = logging.getLogger(__name__)

# Presentation context results, PS3.8 §9.3.3.2.
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
_TRANSFER_SYNTAX_NOT_SUPPORTED = 0x04
# Admission counts association slots itself; pynetdicom's own count includes bare connections.
_PYNETDICOM_LIMIT_OFF = 1 << 30
# After the grace period, aborted associations get this long to close before shutdown goes on.
_ABORT_SECONDS = 1.0


@dataclass
class _AssociationTally:
    sender: Sender
    opened: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    arrivals: Arrivals = field(default_factory=Arrivals)  # per series: a series sent again whole is an event


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # LO: at most 64 characters, no backslash (a value separator) and no control characters.
    status.ErrorComment = re.sub(r"[\\\x00-\x1f\x7f]", "?", comment)[:64]
    return status


class StorageSCP:
    def __init__(self, config: Config, index: Index, store: InstanceStore) -> None:
        self.config = config
        self.index = index
        self.storage_policy = StoragePolicy(
            config.storage.accept_retired_sop_classes, config.storage.accept_unknown_sop_classes
        )
        self.receiver = Receiver(
            index, store, config.dimse.max_associations, config.storage.max_inflated_mb * 2**20
        )
        self.policy = AssociationPolicy(
            our_ae_title=config.node.ae_title,
            require_called_ae_title=config.dimse.require_called_ae_title,
            allowed_callers=tuple(config.dimse.allowed_callers),
        )
        self._tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        dimse = config.dimse
        self.admission = Admission(
            max_pending=dimse.max_pending_connections,
            max_associations=dimse.max_associations,
            max_per_host=dimse.max_associations_per_host,
            record=self._record_refusal,
        )
        self._bound: list[GuardedServer] = []  # listening, not yet served (see `bind`)
        self._servers: list[GuardedServer] = []
        self._stopping = False
        self.ae = self._application_entity()

    def _application_entity(self) -> AE:
        dimse = self.config.dimse
        ae = AE(ae_title=self.config.node.ae_title)
        ae.maximum_associations = _PYNETDICOM_LIMIT_OFF
        ae.maximum_pdu_size = dimse.max_pdu_size
        ae.acse_timeout = dimse.acse_timeout_seconds
        ae.dimse_timeout = dimse.dimse_timeout_seconds
        ae.network_timeout = dimse.network_timeout_seconds
        ae.require_called_aet = False  # checked, with a logged reason, in _on_requested
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in self.storage_policy.negotiated_sop_classes:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def _support_unknown_sop_classes(self, association: Association) -> None:
        """Add the proposed SOP classes no dictionary knows (private, newer) to what this association accepts.

        They cannot be listed in advance, so they are added per request, before
        pynetdicom negotiates; known classes of other services stay refused.
        """
        known = {context.abstract_syntax for context in association.acceptor.supported_contexts}
        proposed = association.requestor.primitive.presentation_context_definition_list
        unknown = {
            context.abstract_syntax for context in proposed
            if context.abstract_syntax not in known and classify(context.abstract_syntax) is SopClassKind.UNKNOWN
        }
        if not unknown:
            return
        added = []
        for sop_class in sorted(unknown):
            context = PresentationContext()
            context.abstract_syntax = sop_class
            context.transfer_syntax = list(ACCEPTED_TRANSFER_SYNTAXES)
            added.append(context)
        association.acceptor.supported_contexts = association.acceptor.supported_contexts + added

    def bind(self) -> None:
        """Bind the listening sockets (plain and TLS); connections wait in the kernel until `start` serves them.

        Raises StartupError naming the port and its setting if one cannot be bound, or
        the TLS certificate cannot be loaded; whatever was bound is closed again.
        """
        if self._bound or self._servers:
            return
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        dimse = self.config.dimse
        listeners: list[tuple[int, str, ssl.SSLContext | None]] = []  # port, its setting, TLS
        if dimse.plain:
            listeners.append((dimse.port, "dimse.port", None))
        if dimse.tls is not None:
            listeners.append((dimse.tls.port, "dimse.tls.port", server_tls_context(dimse.tls)))
        for port, key, tls in listeners:
            try:
                server = bind_acceptor(self.ae, (dimse.bind, port), handlers, self.admission,
                                       dimse.max_dataset_mb << 20, tls)
            except OSError as exc:
                self._close_bound()
                what = "DICOM TLS" if tls else "DICOM"
                raise StartupError.cannot_listen(what, dimse.bind, port, key, "dimse.bind", exc) from exc
            self._bound.append(server)

    def start(self) -> None:
        """Serve the listening sockets (binding them first unless `bind` did); raises StartupError as `bind` does."""
        self.bind()
        dimse = self.config.dimse
        for server in self._bound:
            serve_acceptor(server)
            self._servers.append(server)
            log.info(
                "DICOM SCP %s listening on %s:%d%s (max %d associations)",
                self.config.node.ae_title,
                dimse.bind,
                server.server_address[1],
                " with TLS" if server.ssl_context else "",
                dimse.max_associations,
            )
        self._bound.clear()

    def stop_accepting(self) -> None:
        """Close the listening sockets; open associations go on (see `drain`), new requests are turned away."""
        self._stopping = True
        self._close_bound()
        for server in self._servers:
            server.shutdown()
        self._servers.clear()

    def _close_bound(self) -> None:
        for server in self._bound:  # never served: shutdown() would wait for a serve_forever that never ran
            server.server_close()
        self._bound.clear()

    def drain(self, deadline: float) -> None:
        """Let open associations finish until `deadline` (time.monotonic()), then abort the rest.

        A sender cut off by the A-ABORT sees a failed association and sends the
        rest again later; what it was told Success for is stored and indexed.  A
        store in progress is finished first, unless it takes more than a second.
        """
        waiting, admitted = self.admission.open_connections()
        for connection in waiting:  # connected but never asked: nothing to finish
            connection.dul.socket.close()
        while admitted and time.monotonic() < deadline:
            time.sleep(0.05)
            _, admitted = self.admission.open_connections()
        if not admitted:
            return
        log.warning("%d association(s) still open after the grace period: aborted", len(admitted))
        for association in admitted:
            association.abort_when_idle()
        cut_off = time.monotonic() + _ABORT_SECONDS
        for association in admitted:
            association.join(timeout=max(0.0, cut_off - time.monotonic()))
        for association in admitted:
            if association.is_alive():  # a store that did not finish: its sender never got Success
                association.dul.socket.close()

    def _record_refusal(self, refusal: Refusal, unrecorded: int) -> None:
        """Write a refusal to the audit trail; it is already logged, and a database that fails must not undo it."""
        more = f" ({unrecorded} more like it in the last minute, logged but not recorded)" if unrecorded else ""
        self.index.record(
            refusal.kind, refusal.reason + more, Level.WARNING, calling_ae_title=refusal.calling_ae_title
        )

    def _on_requested(self, event: evt.Event) -> None:
        """Accept, or reject with the reason; the rejection is sent first, then logged and recorded.

        pynetdicom swallows a handler's exceptions and then accepts the
        association, so this handler fails closed: whatever goes wrong in it
        rejects the association.  The audit trail comes last, because writing it
        may wait on (or fail with) the database.
        """
        association = event.assoc
        try:
            refused = self._refusal(association)
            if refused is None and self.storage_policy.accept_unknown:
                self._support_unknown_sop_classes(association)
        except Exception:
            log.exception("association request from %s could not be checked: rejected", association.requestor.address)
            self.admission.closed(association)
            refused = REJECT_LOCAL_LIMIT, None
        if refused is None:
            return
        result_source_diagnostic, refusal = refused
        association.acse.send_reject(*result_source_diagnostic)
        association.kill()  # as pynetdicom's own rejections do: lets the DUL send the A-ASSOCIATE-RJ first
        if refusal is not None:
            self.admission.refuse(refusal)

    def _refusal(self, association: Association) -> tuple[tuple[int, int, int], Refusal] | None:
        """None to accept, else the A-ASSOCIATE-RJ (result, source, reason) to answer and the refusal to report."""
        request = association.requestor.primitive
        calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
        host = association.requestor.address
        sock = association.dul.socket.socket
        subject = certificate_subject(sock.getpeercert()) if isinstance(sock, ssl.SSLSocket) else None
        rejection = self.policy.check(called, calling, host, subject)
        if self._stopping:
            rejection = Rejection("the node is shutting down", REJECT_CONGESTION)
        if rejection is not None:
            self.admission.closed(association)
            reason = f"association from {calling}@{host} rejected: {rejection.reason}"
            return rejection.result_source_diagnostic, Refusal(EventKind.ASSOCIATION_REJECTED, host, reason, calling[:16])
        refusal = self.admission.request(association, host, calling)
        if refusal is not None:
            return REJECT_LOCAL_LIMIT, refusal
        if subject is not None:
            log.info("association from %s@%s: TLS client certificate %s", calling, host, describe_subject(subject))
        return None

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
        kind = classify(sop_class)
        if context.result == _ABSTRACT_SYNTAX_NOT_SUPPORTED and kind is not SopClassKind.NOT_STORAGE:
            setting = {
                SopClassKind.RETIRED: " (retired; storage.accept_retired_sop_classes = true stores it)",
                SopClassKind.UNKNOWN: " (private or unknown; storage.accept_unknown_sop_classes = true stores it)",
            }.get(kind, "")
            reason = (
                f"{sender} proposed SOP class {sop_class} ({sop_class.name}), which this node does not store"
                f"{setting}; its instances cannot be received"
            )
            self.index.report(
                EventKind.UNSUPPORTED_SOP_CLASS, reason, Level.WARNING, logger=log, calling_ae_title=sender.ae_title
            )
        elif context.result == _TRANSFER_SYNTAX_NOT_SUPPORTED:
            offered = ", ".join(UID(ts).name for ts in context.transfer_syntax)
            reason = f"{sender} offered {sop_class.name} only in transfer syntaxes this node does not accept: {offered}"
            self.index.report(
                EventKind.UNSUPPORTED_TRANSFER_SYNTAX, reason, Level.WARNING, logger=log, calling_ae_title=sender.ae_title
            )
        else:
            log.info("%s: presentation context for %s not accepted", sender, sop_class.name)

    def _on_closed(self, event: evt.Event) -> None:
        self.admission.closed(event.assoc)
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
        resent = tally.arrivals.only_duplicates()
        if resent:
            try:
                self.index.record_resent(tally.sender, resent)
            except Exception:  # the stores are done and answered; only the audit line is lost
                log.exception("could not record in the audit trail: %d series sent again by %s", len(resent),
                              tally.sender)

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
        assert received.header is not None  # stored: its header was read
        duplicate = received.outcome is IngestOutcome.DUPLICATE
        tally.arrivals.count(received.header.study_instance_uid, received.header.series_instance_uid, duplicate)
        if duplicate:
            tally.duplicates += 1
        else:
            tally.stored += 1
            tally.bytes += received.size
        return SUCCESS


def server_tls_context(tls: DimseTLS) -> ssl.SSLContext:
    """The TLS listener's context: BCP 195 (TLS 1.2+, forward-secret AEAD), client certificates per the config."""
    context = apply_bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot start: dimse.tls: cannot load cert_file {tls.cert_file} with key_file {tls.key_file}: {exc}"
        ) from None
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot start: dimse.tls: cannot load ca_file {tls.ca_file}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context
