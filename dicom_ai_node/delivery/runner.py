"""The delivery stage: a few sender threads working through due deliveries.

Network-bound, so threads in the node process are enough.  Each delivery is
one association / request for all its objects; a destination that is down
only delays its own deliveries (they are rescheduled with backoff, not retried
in a loop).  The sender threads are daemon threads: a destination that hangs
must not hold the node past its shutdown grace period (the delivery stays
`sending` and is sent again after the next start).
"""

from __future__ import annotations

import logging
import threading
import time

from dicom_ai_node.config import Config, DestinationConfig
from dicom_ai_node.delivery.outcome import Outcome
from dicom_ai_node.delivery.senders import make_sender
from dicom_ai_node.store.deliveries import ClaimedDelivery, DeliveryQueue

log = logging.getLogger(__name__)

ORIGIN = "origin"


class DeliveryRunner:
    def __init__(self, config: Config, queue: DeliveryQueue) -> None:
        self.config = config
        self.queue = queue
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="delivery-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, deadline: float) -> None:
        """Stop claiming; sends under way may finish until `deadline` (time.monotonic()), the rest are re-sent later."""
        self._stop.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = list(self._running)
        for thread in running:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        unfinished = sum(thread.is_alive() for thread in running)
        if unfinished:
            log.warning("%d delivery(ies) still sending at the end of the grace period: sent again after the next start",
                        unfinished)

    def dispatch_once(self) -> int:
        with self._lock:
            self._running = {thread for thread in self._running if thread.is_alive()}
            free = self.config.delivery.concurrent - len(self._running)
        if free <= 0:
            return 0
        claimed = self.queue.claim_due(free)
        for delivery in claimed:
            thread = threading.Thread(target=self._deliver, args=(delivery,), name=f"delivery-{delivery.id}", daemon=True)
            with self._lock:
                self._running.add(thread)
            thread.start()
        return len(claimed)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.dispatch_once()
            except Exception:
                log.exception("delivery dispatch failed; retrying")

    def _destination(self, delivery: ClaimedDelivery) -> tuple[str, DestinationConfig] | Outcome:
        if delivery.destination != ORIGIN:
            destination = self.config.destinations.get(delivery.destination)
            if destination is None:
                return Outcome(False, True, f"destination {delivery.destination!r} is no longer in [destinations]")
            return delivery.destination, destination
        calling = delivery.calling_ae_title
        peer_name = next((name for name, peer in self.config.peers.items() if peer.ae_title == calling), None)
        if peer_name is None:
            return Outcome(False, True, f"origin: the sender's AE title {calling!r} is not a configured peer")
        peer = self.config.peers[peer_name]
        return f"origin ({peer_name})", DestinationConfig(
            kind="dimse", ae_title=peer.ae_title, host=peer.host, port=peer.port
        )

    def _deliver(self, delivery: ClaimedDelivery) -> None:
        resolved = self._destination(delivery)
        if isinstance(resolved, Outcome):
            outcome = resolved
        else:
            name, destination = resolved
            try:
                outcome = make_sender(name, destination, self.config.node.ae_title).send(delivery.files)
            except Exception as exc:  # a sender bug must not leave the delivery `sending` forever
                log.exception("delivery %d to %s crashed", delivery.id, name)
                outcome = Outcome(False, False, f"{type(exc).__name__}: {exc}")
        state = self.queue.record(delivery, outcome)
        log.log(
            logging.INFO if outcome.delivered else logging.WARNING,
            "delivery %d (%d object(s) of study %s) to %s, attempt %d: %s%s",
            delivery.id,
            len(delivery.files),
            delivery.study_instance_uid,
            delivery.destination,
            delivery.attempt,
            state.value,
            "" if outcome.delivered else f" - {outcome.reason}",
        )
