"""pynetdicom's acceptor, tuned for receiving large images over fast links.

pynetdicom's defaults are sized for correctness on any platform, not for
100 MB series on loopback.  Profiling a 200-slice 512x512 CT (storescu sends
128 KiB PDUs) showed five costs that have nothing to do with DICOM:

* every association deep-copies the ~2,400 supported (SOP class, transfer
  syntax) pairs, re-validating each UID against a regex: ~35 ms per association;
* the socket is read 4 KiB at a time: ~130 `recv` calls per image, most of the
  DUL thread's time;
* the association loop polls its message queue every 1 ms, so each C-STORE
  waits ~0.5 ms on average before its handler runs;
* the DUL loop sleeps 1 ms when its socket is idle, which delays every response;
* each C-STORE response goes through a pydicom Dataset and its writer: ~0.3 ms
  for seven fixed elements.

`SharedUIDContext` copies its lists but shares its immutable UIDs,
`BulkReadSocket` reads each PDU with a few `recv_into` calls, `PromptAssociation`
wakes as soon as a message is queued, the DUL idle sleep is 0.1 ms, and
`QuickStoreResponseDIMSE` encodes a plain Success C-STORE response directly
(anything else, with a comment or another status, goes pynetdicom's way).  The
protocol (state machine, PDU and DIMSE decoding, events) is pynetdicom's own:
the request handler builds pynetdicom's objects as usual and then specialises
them, so everything pynetdicom sets up stays as it is.

The same objects also bound what a peer can make the node hold (PS3.15's
concern for a port any host can reach):

* `GuardedDUL` checks each PDU's claimed length before reading it (the
  negotiated maximum once associated, a sane A-ASSOCIATE-RQ size before) and
  answers a longer one with an A-ABORT; `BulkReadSocket` grows its buffer only
  as bytes arrive.  The association request must arrive whole within
  `acse_timeout`; once associated, every PDU must arrive within
  `network_timeout` (plus a second per 64 KiB), so a trickle cannot hold a
  thread.  While a whole DIMSE message waits for the association thread, no
  more is read (TCP pushes back on the sender).  A connection that has been
  quiet for a second is polled every 20 ms instead of every 0.1 ms (and its
  association loop ticks every 20 ms instead of 1 ms), so idle connections
  cost little CPU.
* `QuickStoreResponseDIMSE` also caps a DIMSE message as it accumulates: a
  command set at 64 KiB, a dataset at `dimse.max_dataset_mb`.
* `GuardedServer` does the TLS handshake in the connection's own thread
  (pynetdicom does it in the accept loop, where one silent client stalls every
  other) and hands each connection to `Admission`, which budgets connections
  and association slots and counts every refusal.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_ai_node.events import EventKind
from dicom_ai_node.ingest.admission import Admission, Refusal

log = logging.getLogger(__name__)

# How long the DUL thread sleeps between looks at its socket (pynetdicom: 1 ms): 0.1 ms while
# PDUs come, 20 ms once nothing has arrived for a second (an idle or waiting connection): the first PDU
# after a pause waits at most that long, and 14 quiet connections cost 14% of a core here, not 26% (at 5 ms).
DUL_IDLE_SLEEP_SECONDS = 0.0001
_QUIET_DUL_SLEEP_SECONDS = 0.02
_QUIET_AFTER_SECONDS = 1.0
# Largest A-ASSOCIATE-RQ read before the association exists: 128 presentation contexts with a
# dozen transfer syntaxes each and a user identity token fit; decoding more costs CPU for nothing.
MAX_REQUEST_PDU_BYTES = 128 << 10
# A DIMSE command set is a few hundred bytes; one that grows past this is not a command.
MAX_COMMAND_BYTES = 64 << 10
# Once associated a PDU must arrive within network_timeout, plus this long per byte (64 KiB/s at least).
_SECONDS_PER_BYTE = 1 / (64 << 10)
# A receive buffer starts this big (a typical P-DATA PDU fits) and then doubles, but only
# as bytes arrive: a claimed length costs nothing until the peer really sends it.
_FIRST_BUFFER_BYTES = 256 << 10
# PS3.8 §9.3.8: A-ABORT, source DICOM UL service-provider, reason invalid-PDU-parameter-value.
_ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)
_PDU_TYPES = frozenset(range(0x01, 0x08))
# DUL states before the A-ASSOCIATE-AC has gone out (PS3.8 §9.2): only a request may be read.
_BEFORE_ASSOCIATION = frozenset({"Sta1", "Sta2", "Sta3"})
# How often the association loop checks release, abort and timeouts when no message comes:
# every millisecond while PDUs arrive, every 20 ms once the association has been quiet for a second.
_TICK_SECONDS = 0.001
_QUIET_TICK_SECONDS = 0.02


class SharedUIDContext(PresentationContext):
    def __deepcopy__(self, memo: dict) -> SharedUIDContext:
        """A copy whose lists are new and whose UIDs (immutable strings) are shared."""
        return SharedUIDContext.of(self)

    @staticmethod
    def of(context: PresentationContext) -> SharedUIDContext:
        twin = object.__new__(SharedUIDContext)
        twin.__dict__ = {key: list(value) if isinstance(value, list) else value
                         for key, value in context.__dict__.items()}
        return twin


class BulkReadSocket(AssociationSocket):
    # Every read must end by this time.monotonic(): the request deadline, then one per PDU.
    deadline: float | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes`, or what came before the peer closed the connection.

        Raises TimeoutError when the deadline passes before all bytes are there.
        """
        buffer = bytearray(min(nr_bytes, _FIRST_BUFFER_BYTES))
        read = 0
        while read < nr_bytes:
            if read == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - read)))
            if self.deadline is not None:
                self.socket.settimeout(max(self.deadline - time.monotonic(), 1e-3))
            with memoryview(buffer) as view:
                received = self.socket.recv_into(view[read:])
            if not received:  # connection closed: the caller reports the short PDU
                del buffer[read:]
                return buffer
            read += received
        return buffer


class GuardedDUL(DULServiceProvider):
    _last_received = 0.0  # time.monotonic() of the last PDU read

    @property
    def quiet(self) -> bool:
        """Nothing has arrived for a while: the loops of this connection may look less often."""
        return time.monotonic() - self._last_received > _QUIET_AFTER_SECONDS

    @property
    def _run_loop_delay(self) -> float:
        """pynetdicom sleeps this long between looks at the socket and its queues."""
        return _QUIET_DUL_SLEEP_SECONDS if self.quiet else DUL_IDLE_SLEEP_SECONDS

    @_run_loop_delay.setter
    def _run_loop_delay(self, _value: float) -> None:
        """pynetdicom's constructor sets a fixed delay; the property above decides instead."""

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data, except while a whole DIMSE message waits to be served.

        Not reading then leaves the next PDUs in the socket, and TCP makes a sender
        that does not wait for its responses wait: memory holds one message being
        served, one waiting, and one arriving.
        """
        if self.assoc.dimse.msg_queue.qsize() and self.state_machine.current_state == "Sta6":
            return False
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU reader, except that a PDU's length is checked before it is read.

        Events as in `DULServiceProvider._read_pdu_data`: Evt17 when the
        transport closes (or is closed here), Evt19 for an unknown PDU type, else
        the event of the decoded PDU.
        """
        sock = self.socket
        requesting = self.state_machine.current_state in _BEFORE_ASSOCIATION
        if not requesting:
            sock.deadline = time.monotonic() + self.assoc.network_timeout
        try:
            header = sock.recv(6)
            if len(header) < 6:
                self._closed_by_peer(requesting)
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                self._refuse(EventKind.PDU_INVALID, f"sent an unknown PDU type 0x{pdu_type:02X}: A-ABORT")
                return
            limit = MAX_REQUEST_PDU_BYTES if requesting else self.assoc.acceptor.maximum_length
            if limit and length > limit:
                phase = "any association request" if requesting else "the negotiated maximum"
                self._refuse(EventKind.PDU_TOO_LONG, f"sent a PDU (type 0x{pdu_type:02X}) claiming {length} bytes, more than "
                                             f"{phase} ({limit}): A-ABORT")
                return
            if not requesting:
                sock.deadline += length * _SECONDS_PER_BYTE
            body = sock.recv(length)
        except TimeoutError:
            what = "the association request" if requesting else "a PDU"
            self._refuse(EventKind.STALLED, f"did not send {what} in time: connection closed", abort=False)
            return
        except OSError as exc:
            log.info("connection from %s lost: %s", self._peer(), exc)
            self._closed_by_peer(requesting)
            return
        if len(body) < length:
            log.warning("%s closed the connection in the middle of a PDU (%d of %d bytes)",
                        self._peer(), len(body), length)
            self._closed_by_peer(requesting)
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:  # pynetdicom raises many types for malformed PDUs
            self._refuse(EventKind.PDU_INVALID, f"sent a PDU that cannot be decoded ({exc}): A-ABORT")
            return
        self._last_received = time.monotonic()
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse(self, kind: EventKind, reason: str, abort: bool = True) -> None:
        """End the connection for what the peer sent (an A-ABORT first, unless it stalled), and count it."""
        if abort:
            try:
                self.socket.socket.sendall(_ABORT_INVALID_PARAMETER)
            except OSError:
                pass
        self.socket.close()  # Evt17: the state machine ends the association
        self.assoc.stop_waiting_for_request()
        self.assoc._server.admission.refuse(Refusal(kind, self.assoc.requestor.address, f"{self._peer()} {reason}"))

    def _closed_by_peer(self, requesting: bool) -> None:
        self.event_queue.put("Evt17")
        if requesting:
            self.assoc.stop_waiting_for_request()

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{requestor.ae_title.strip() or '?'}@{requestor.address}"


def store_success_command(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a Success C-STORE-RSP (PS3.7 §9.3.1.2), Implicit VR Little Endian."""

    def element(number: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, number, len(value)) + value

    def uid(value: str) -> bytes:
        encoded = value.encode("ascii")
        return encoded + b"\x00" if len(encoded) % 2 else encoded

    body = b"".join((
        element(0x0002, uid(sop_class_uid)),  # Affected SOP Class UID
        element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        element(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
        element(0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: no dataset
        element(0x0900, struct.pack("<H", 0x0000)),  # Status: Success
        element(0x1000, uid(sop_instance_uid)),  # Affected SOP Instance UID
    ))
    return element(0x0000, struct.pack("<I", len(body))) + body  # Command Group Length


class QuickStoreResponseDIMSE(DIMSEServiceProvider):
    max_dataset_bytes: int = 0  # 0: unlimited
    _command_bytes = 0
    _dataset_bytes = 0

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's, after counting what the message in progress holds: too much ends the association."""
        for _context_id, value in primitive.presentation_data_value_list:
            if value[:1] and value[0] & 0x01:  # message control header: command fragment
                self._command_bytes += len(value) - 1
            else:
                self._dataset_bytes += len(value) - 1
        if self._command_bytes > MAX_COMMAND_BYTES:
            self._refuse(f"sent a DIMSE command set longer than {MAX_COMMAND_BYTES} bytes: A-ABORT")
            return
        if self.max_dataset_bytes and self._dataset_bytes > self.max_dataset_bytes:
            self._refuse(f"sent a dataset longer than {self.max_dataset_bytes >> 20} MiB (dimse.max_dataset_mb): "
                         "A-ABORT")
            return
        super().receive_primitive(primitive)
        if self.message is None:  # the message is whole and queued: the next one starts from nothing
            self._command_bytes = self._dataset_bytes = 0

    def _refuse(self, reason: str) -> None:
        self.message = None  # what accumulated goes now, not when the association ends
        self._command_bytes = self._dataset_bytes = 0
        self.dul._refuse(EventKind.MESSAGE_TOO_LONG, reason)

    def send_msg(self, primitive, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0x0000
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
        ):
            command = store_success_command(
                primitive.MessageIDBeingRespondedTo,
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
            )
            if not self.maximum_pdu_size or len(command) + 7 <= self.maximum_pdu_size:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class PromptAssociation(Association):
    _request_ended = False  # the connection closed (or was closed) before it sent its request
    _abort_requested = False

    def run_reactor(self) -> None:
        """pynetdicom's; afterwards, a connection that never sent its request in time is counted."""
        super().run_reactor()
        if self.requestor.primitive is None and not self._request_ended:
            address = self.requestor.address
            self._server.admission.refuse(Refusal(
                EventKind.REQUEST_TIMEOUT,
                address,
                f"connection from {address} sent no association request within {self.acse_timeout:g} s "
                "(dimse.acse_timeout_seconds): closed",
            ))

    def stop_waiting_for_request(self) -> None:
        """The connection ended before its request: wake the thread waiting for it now, not after acse_timeout."""
        if not self._request_ended and self.dul.state_machine.current_state == "Sta2":
            self._request_ended = True
            self.dul.to_user_queue.put(None)  # what a timed-out wait returns

    def abort_when_idle(self) -> None:
        """A-ABORT as soon as no message is being served (a store in progress finishes first)."""
        self._abort_requested = True

    def _serve_request(self, msg, context_id: int) -> None:
        """pynetdicom's, except that a C-STORE of a class it has no service for (retired, private) is stored too.

        pynetdicom picks the service from the SOP class and knows only current
        storage classes; a C-STORE on a context this node accepted (scp.py decides
        which) is a Storage Service request whatever its class (PS3.4 Annex B).
        """
        context = self._accepted_cx.get(context_id)
        class_uid = getattr(msg, "AffectedSOPClassUID", None)
        if (isinstance(msg, C_STORE) and context is not None and not self._sent_release
                and uid_to_service_class(class_uid) is not StorageServiceClass):
            self.dimse.cancel_req = {}
            self._is_paused = True
            StorageServiceClass(self).SCP(msg, context)
            self._is_paused = False
            return
        super()._serve_request(msg, context_id)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, except that it waits on the message queue instead of sleeping.

        The checks after serving a message (release, abort, DUL alive, network
        timeout) and the pause checkpoint used by the `send_*` methods are the
        same as in `Association._run_reactor`; `abort_when_idle` is checked last.
        """
        self._is_paused = False
        while not self._kill:
            self._wait_for_message(_QUIET_TICK_SECONDS if self.dul.quiet else _TICK_SECONDS)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the A-ABORT
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

            if self._abort_requested:
                self.abort()
                return

    def _wait_for_message(self, timeout: float) -> None:
        """Return once a DIMSE message is queued (without taking it) or after `timeout`."""
        messages = self.dimse.msg_queue
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(timeout)


class _AcceptorRequestHandler(RequestHandler):
    server: GuardedServer

    def handle(self) -> None:
        """Like pynetdicom's, with admission first and the TLS handshake (if any) in this thread."""
        association = self._create_association()
        host = self.client_address[0]
        admission = self.server.admission
        admission.connected(association, host, self.request)
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake(host, association):
                return
            evt.trigger(association, evt.EVT_CONN_OPEN, {"address": self.client_address})
            association.start()
        except BaseException:
            admission.closed(association)
            raise

    def _handshake(self, host: str, association: Association) -> bool:
        self.request.settimeout(self.ae.acse_timeout)
        try:
            self.request.do_handshake()
        except Exception as exc:  # ssl.SSLError, a timeout, or a socket admission closed meanwhile
            _close_quietly(self.request)
            if self.server.admission.closed(association):  # not already counted as evicted
                self.server.admission.refuse(
                    Refusal(EventKind.TLS_HANDSHAKE_FAILED, host, f"TLS handshake with {host} failed: {exc}")
                )
            return False
        return True

    def _create_association(self) -> Association:
        association = super()._create_association()
        # pynetdicom's objects, set up by pynetdicom; only the methods above differ.
        association.__class__ = PromptAssociation
        association.dul.__class__ = GuardedDUL
        association.dul.socket.__class__ = BulkReadSocket
        association.dul.socket.deadline = time.monotonic() + self.ae.acse_timeout
        association.dul._last_received = time.monotonic()
        association.dimse.__class__ = QuickStoreResponseDIMSE
        association.dimse.max_dataset_bytes = self.server.max_dataset_bytes
        return association


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; TLS sockets are handed over before their handshake."""

    admission: Admission
    max_dataset_bytes: int
    # A connection's own thread only sets it up (and does its TLS handshake): never wait for it on close.
    daemon_threads = True
    block_on_close = False
    # Connections the kernel queues before they are accepted (pynetdicom: 5); a burst past the
    # backlog would make scanners wait out TCP retransmissions (1 s, then 3 s...).
    request_queue_size = 128

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def _close_quietly(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP connection, whatever TLS has or has not done
    except OSError:
        pass
    sock.close()


def bind_acceptor(
    ae: AE,
    address: tuple[str, int],
    handlers: Sequence[tuple],
    admission: Admission,
    max_dataset_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> GuardedServer:
    """Like `AE.make_server`, with the tuned and guarded association objects: `bind_acceptor` then
    `serve_acceptor` is `AE.start_server(address, block=False)`.  The socket is bound and listening on return;
    connections wait in the kernel's backlog until `serve_acceptor`.

    Raises OSError if the address cannot be bound.  Close an acceptor never served with
    `server_close()`: `shutdown()` waits for `serve_forever` to end, so it would wait for ever.
    """
    server = ae.make_server(
        address,
        contexts=[SharedUIDContext.of(context) for context in ae.supported_contexts],
        ssl_context=ssl_context,
        evt_handlers=list(handlers),
        server_class=GuardedServer,
        request_handler=_AcceptorRequestHandler,
    )
    server.admission = admission
    server.max_dataset_bytes = max_dataset_bytes
    return server


def serve_acceptor(server: GuardedServer) -> None:
    """Accept connections on a bound acceptor, in a daemon thread, until `server.shutdown()`."""
    server.ae._servers.append(server)  # as start_server does: the server's shutdown() removes it again
    threading.Thread(target=server.serve_forever, name=f"dicom-scp:{server.server_address[1]}", daemon=True).start()
