"""Who gets a connection and an association slot when the DICOM port is busy or attacked.

Anyone who can reach the port can open TCP connections; only a peer that sends
an A-ASSOCIATE-RQ the policy accepts is a sender.  So the two are budgeted
apart, in the spirit of PS3.15's advice to bound what an unauthenticated peer
can take:

* **Connections that have not associated yet** share a small budget
  (`dimse.max_pending_connections`).  A new connection always gets in: when the
  budget is full, the oldest waiting connection of the host that holds the most
  of them is closed.  Idle or garbage connections therefore never lock out a
  scanner, even one on the same host, and one noisy host cannot push out the
  others.  Each must send its request within `dimse.acse_timeout_seconds`.
* **Associations** take one of `dimse.max_associations` slots, counted from the
  A-ASSOCIATE-RQ on (never from the bare connection), and at most
  `dimse.max_associations_per_host` per host when set.  Past either limit the
  request is rejected transient (local limit exceeded), which senders retry.

Every refusal is logged and counted (for /metrics); the audit trail gets one
event per kind, host and calling AE title per minute, saying how many more
there were, so a flood cannot turn into a flood of database writes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dicom_ai_node.events import EventKind

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ rejected-transient, DICOM UL service-provider (presentation), local-limit-exceeded (PS3.8 §9.3.4).
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # temporary congestion: the node is shutting down
_RECORD_EVERY_SECONDS = 60.0


class Connection(Protocol):
    """What admission needs of an association: whether its thread has started (`ident`) and still runs."""

    ident: int | None

    def is_alive(self) -> bool: ...


@dataclass
class _Waiting:
    host: str
    since: float
    sock: socket.socket


@dataclass(frozen=True)
class Refusal:
    kind: EventKind  # the event kind and the metric label (see the README's security section for the list)
    host: str
    reason: str
    calling_ae_title: str | None = None


# Record(refusal, unrecorded): write it to the audit trail; `unrecorded` more of its kind and host came
# since the last one recorded.
Record = Callable[[Refusal, int], None]


@dataclass
class Admission:
    max_pending: int
    max_associations: int
    max_per_host: int  # 0: no per-host limit
    record: Record
    _waiting: dict[Connection, _Waiting] = field(default_factory=dict)
    _admitted: dict[Connection, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    refused: Counter[str] = field(default_factory=Counter)
    # Keyed by (kind, host, calling AE title): one like another is a repeat, not news.
    _last_recorded: dict[tuple[str, str, str | None], float] = field(default_factory=dict)
    _unrecorded: Counter[tuple[str, str, str | None]] = field(default_factory=Counter)

    def connected(self, connection: Connection, host: str, sock: socket.socket) -> None:
        """A new TCP connection (its association not started yet); makes room by closing the stalest waiting one."""
        with self._lock:
            self._prune()
            evicted = None
            if len(self._waiting) >= self.max_pending:
                evicted = self._stalest()
                del self._waiting[evicted[0]]
            self._waiting[connection] = _Waiting(host, time.monotonic(), sock)
        if evicted is not None:
            _, waiting = evicted
            _close(waiting.sock)
            self.refuse(Refusal(
                EventKind.CONNECTION_EVICTED,
                waiting.host,
                f"connection from {waiting.host} closed after {time.monotonic() - waiting.since:.1f} s without an "
                f"association request: {self.max_pending} connections were waiting (dimse.max_pending_connections)",
            ))

    def request(self, connection: Connection, host: str, calling_ae_title: str) -> Refusal | None:
        """The connection sent its A-ASSOCIATE-RQ: take a slot, or say why there is none.

        The caller rejects the association, then reports the refusal with `refuse`:
        acting comes before recording, which may wait on the database.
        """
        with self._lock:
            self._waiting.pop(connection, None)
            self._prune()
            from_host = sum(1 for admitted_host in self._admitted.values() if admitted_host == host)
            if len(self._admitted) >= self.max_associations:
                refusal = Refusal(
                    EventKind.ASSOCIATION_LIMIT,
                    host,
                    f"association from {calling_ae_title!r}@{host} rejected: all {self.max_associations} "
                    "association slots are in use (dimse.max_associations)",
                )
            elif self.max_per_host and from_host >= self.max_per_host:
                refusal = Refusal(
                    EventKind.ASSOCIATION_LIMIT,
                    host,
                    f"association from {calling_ae_title!r}@{host} rejected: {host} already has {from_host} "
                    "associations open (dimse.max_associations_per_host)",
                )
            else:
                self._admitted[connection] = host
                return None
        return refusal

    def closed(self, connection: Connection) -> bool:
        """The association was released, aborted or rejected: its slot is free at once.

        False if admission had already let go of it (an evicted connection).
        """
        with self._lock:
            admitted = self._admitted.pop(connection, None)
            waiting = self._waiting.pop(connection, None)
        return admitted is not None or waiting is not None

    def counts(self) -> dict[str, int]:
        """Refusals since start, by kind (for /metrics)."""
        with self._lock:
            return dict(self.refused)

    def open_connections(self) -> tuple[list[Connection], list[Connection]]:
        """(connections waiting for their request, admitted associations)."""
        with self._lock:
            self._prune()
            return list(self._waiting), list(self._admitted)

    def _prune(self) -> None:
        """Forget connections whose threads ended without a close event (a transport that just dropped)."""
        for table in (self._waiting, self._admitted):
            ended = [connection for connection in table if connection.ident is not None and not connection.is_alive()]
            for connection in ended:
                del table[connection]

    def _stalest(self) -> tuple[Connection, _Waiting]:
        per_host = Counter(waiting.host for waiting in self._waiting.values())
        busiest = max(per_host.values())
        return min(
            ((connection, waiting) for connection, waiting in self._waiting.items()
             if per_host[waiting.host] == busiest),
            key=lambda item: item[1].since,
        )

    def refuse(self, refusal: Refusal) -> None:
        """Log and count a refusal; record it in the audit trail unless one like it was recorded lately."""
        log.warning("%s", refusal.reason)
        key = (refusal.kind, refusal.host, refusal.calling_ae_title)
        now = time.monotonic()
        with self._lock:
            self.refused[refusal.kind] += 1
            if now - self._last_recorded.get(key, -_RECORD_EVERY_SECONDS) < _RECORD_EVERY_SECONDS:
                self._unrecorded[key] += 1
                return
            self._last_recorded[key] = now
            unrecorded = self._unrecorded.pop(key, 0)
        self.record(refusal, unrecorded)


def _close(sock: socket.socket) -> None:
    """End a connection from another thread: its reader sees the end of the stream and stops.

    `socket.socket.shutdown` also for a TLS socket: its own would drop its TLS state under the
    thread that may be doing the handshake.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already gone
        pass
