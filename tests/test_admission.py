"""The admission rules (ingest/admission.py) on their own; on the wire they are in test_hostile_network."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from dicom_ai_node.ingest.admission import Admission, Refusal


@dataclass(eq=False)
class FakeConnection:
    """An association thread as admission sees it; `sock` is one end of a real socket pair (the other stays open)."""

    alive: bool = True
    ident: int | None = 1
    pair: tuple[socket.socket, socket.socket] = field(default_factory=socket.socketpair)

    @property
    def sock(self) -> socket.socket:
        return self.pair[0]

    def is_alive(self) -> bool:
        return self.alive


def _admission(max_pending: int = 3, max_associations: int = 2, max_per_host: int = 0):
    recorded: list[tuple[Refusal, int]] = []
    admission = Admission(max_pending, max_associations, max_per_host, lambda refusal, more: recorded.append(
        (refusal, more)))
    return admission, recorded


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_full_budget_closes_the_oldest_waiting_connection_of_the_busiest_host():
    admission, recorded = _admission(max_pending=3)
    flood = [FakeConnection() for _ in range(2)]
    scanner = FakeConnection()
    admission.connected(flood[0], "10.0.0.66", flood[0].sock)
    admission.connected(scanner, "10.0.0.5", scanner.sock)
    admission.connected(flood[1], "10.0.0.66", flood[1].sock)

    newcomer = FakeConnection()
    admission.connected(newcomer, "10.0.0.66", newcomer.sock)
    assert _closed(flood[0].sock) and not _closed(scanner.sock) and not _closed(flood[1].sock)
    waiting, admitted = admission.open_connections()
    assert set(waiting) == {scanner, flood[1], newcomer} and admitted == []
    assert [refusal.kind for refusal, _ in recorded] == ["connection-evicted"]


def test_slots_are_taken_by_requests_and_freed_at_close():
    admission, _ = _admission(max_pending=10, max_associations=2)
    first, second, third = FakeConnection(), FakeConnection(), FakeConnection()
    for connection in (first, second, third):
        admission.connected(connection, "127.0.0.1", connection.sock)
    assert admission.request(first, "127.0.0.1", "A") is None
    assert admission.request(second, "127.0.0.1", "B") is None
    refusal = admission.request(third, "127.0.0.1", "C")
    assert refusal is not None and "all 2 association slots are in use" in refusal.reason

    admission.closed(first)
    assert admission.request(third, "127.0.0.1", "C") is None
    second.alive = False  # a transport that dropped without a release: its thread ended
    late = FakeConnection()
    assert admission.request(late, "127.0.0.1", "D") is None


def test_per_host_limit_and_one_record_per_kind_and_host_per_minute():
    admission, recorded = _admission(max_pending=10, max_associations=10, max_per_host=1)
    assert admission.request(FakeConnection(), "10.0.0.1", "CT1") is None
    for _ in range(5):
        refusal = admission.request(FakeConnection(), "10.0.0.1", "CT1")
        assert refusal is not None
        admission.refuse(refusal)  # as the SCP does once it has rejected the association
    assert admission.request(FakeConnection(), "10.0.0.2", "CT2") is None
    assert admission.refused["association-limit"] == 5
    assert len(recorded) == 1 and "10.0.0.1 already has 1 associations open" in recorded[0][0].reason
