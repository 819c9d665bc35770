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
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

# How long the DUL thread sleeps when its socket is idle (pynetdicom: 1 ms).
DUL_IDLE_SLEEP_SECONDS = 0.0001
# How often the association loop checks release, abort and timeouts when no message comes.
_TICK_SECONDS = 0.001


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
    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes`, or what came before the peer closed the connection."""
        buffer = bytearray(nr_bytes)
        read = 0
        with memoryview(buffer) as view:
            while read < nr_bytes:
                received = self.socket.recv_into(view[read:], nr_bytes - read)
                if not received:  # connection closed: pynetdicom's caller reports the short PDU
                    return buffer[:read]
                read += received
        return buffer


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
    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, except that it waits on the message queue instead of sleeping.

        The checks after serving a message (release, abort, DUL alive, network
        timeout) and the pause checkpoint used by the `send_*` methods are the
        same as in `Association._run_reactor`.
        """
        self._is_paused = False
        while not self._kill:
            self._wait_for_message(_TICK_SECONDS)
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

    def _wait_for_message(self, timeout: float) -> None:
        """Return once a DIMSE message is queued (without taking it) or after `timeout`."""
        messages = self.dimse.msg_queue
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(timeout)


class _AcceptorRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        association = super()._create_association()
        # pynetdicom's objects, set up by pynetdicom; only the methods above differ.
        association.__class__ = PromptAssociation
        association.dul.socket.__class__ = BulkReadSocket
        association.dul._run_loop_delay = DUL_IDLE_SLEEP_SECONDS
        association.dimse.__class__ = QuickStoreResponseDIMSE
        return association


def start_acceptor(ae: AE, address: tuple[str, int], handlers: Sequence[tuple]) -> ThreadedAssociationServer:
    """Like `AE.start_server(address, block=False)`, with the tuned association objects."""
    server = ae.make_server(
        address,
        contexts=[SharedUIDContext.of(context) for context in ae.supported_contexts],
        evt_handlers=list(handlers),
        server_class=ThreadedAssociationServer,
        request_handler=_AcceptorRequestHandler,
    )
    ae._servers.append(server)  # as start_server does: the server's shutdown() removes it again
    threading.Thread(target=server.serve_forever, name=f"dicom-scp:{address[1]}", daemon=True).start()
    return server
