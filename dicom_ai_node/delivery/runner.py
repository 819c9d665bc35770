"""The delivery stage: a few sender threads working through due deliveries.

Network-bound, so threads in the node process are enough.  Each delivery is
one association / request for all its objects; a destination that is down
only delays its own deliveries (they are rescheduled with backoff, not retried
in a loop).  The sender threads are daemon threads: a destination that hangs
must not hold the node past its shutdown grace period (the delivery stays
`sending` and is sent again after the next start).

While a destination fails, one probe thread per destination (never one per
delivery) asks it every `delivery.probe_seconds` whether it answers (C-ECHO,
HTTP HEAD of a DICOMweb root, GET /system of Orthanc).  Once a probe that did
not answer is followed by one that does, the destination is back: its waiting
deliveries are made due now instead of sleeping out their backoff (up to
`max_backoff_seconds`).  A probe that answers right after a failed send tells
nothing (the destination is up and refused something, e.g. Out of Resources),
so it stops there and backoff alone decides.  Probes only ever bring attempts
forward; they never hold any back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from dicom_ai_node.config import Config, DestinationConfig, DimseDestination
from dicom_ai_node.delivery.queue import ORIGIN, ClaimedDelivery, DeliveryQueue
from dicom_ai_node.delivery.senders import make_sender
from dicom_ai_node.store.models import DeliveryState
from dicom_ai_node.values import DeliveryOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    """Where a delivery goes, resolved: `name` ("pacs", "origin (ct1)") keys the probe of that destination."""

    name: str
    destination: DestinationConfig
    stored: str  # deliveries.destination
    calling_ae_title: str | None = None  # `origin`: the sender sent back to


class DeliveryRunner:
    def __init__(self, config: Config, queue: DeliveryQueue) -> None:
        self.config = config
        self.queue = queue
        self._running: set[threading.Thread] = set()
        self._probes: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="delivery-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        # Deliveries a previous run left waiting: if their destination answers now, they go now.
        try:
            waiting = self.queue.waiting_destinations()
        except Exception:
            log.exception("cannot list the destinations of waiting deliveries; they wait out their backoff")
            waiting = []
        for stored, calling in waiting:
            target = self._resolve(stored, calling)
            if isinstance(target, _Target):
                self._watch(target, resume_if_answering=True)

    def stop(self, deadline: float) -> None:
        """Stop claiming and probing; sends under way may finish until `deadline` (time.monotonic()), the rest
        are re-sent later."""
        self._stop.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = list(self._running)
            probes = list(self._probes.values())
        for thread in running:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for thread in probes:  # a probe waits at most its own timeout; daemon threads, never waited past the deadline
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

    def _resolve(self, stored: str, calling: str | None) -> _Target | DeliveryOutcome:
        if stored != ORIGIN:
            destination = self.config.destinations.get(stored)
            if destination is None:
                return DeliveryOutcome(False, True, f"destination {stored!r} is no longer in [destinations]")
            return _Target(stored, destination, stored)
        peer_name = next((name for name, peer in self.config.peers.items() if peer.ae_title == calling), None)
        if peer_name is None:
            return DeliveryOutcome(False, True, f"origin: the sender's AE title {calling!r} is not a configured peer")
        peer = self.config.peers[peer_name]
        destination = DimseDestination(ae_title=peer.ae_title, host=peer.host, port=peer.port)
        return _Target(f"origin ({peer_name})", destination, ORIGIN, calling)

    def _deliver(self, delivery: ClaimedDelivery) -> None:
        target = self._resolve(delivery.destination, delivery.calling_ae_title)
        if isinstance(target, DeliveryOutcome):
            outcome = target
        elif not delivery.files:  # never report "delivered 0 object(s)": the result files are gone
            outcome = DeliveryOutcome(False, True, "no result objects on file to send: purged, kept by an earlier job "
                                                   "with the same results, or none of the kinds in the destination's "
                                                   "outputs (changed since the delivery was queued)")
        else:
            try:
                outcome = make_sender(target.name, target.destination, self.config.node.ae_title).send(delivery.files)
            except Exception as exc:  # a sender bug must not leave the delivery `sending` forever
                log.exception("delivery %d to %s crashed", delivery.id, target.name)
                outcome = DeliveryOutcome(False, False, f"{type(exc).__name__}: {exc}")
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
        if state is DeliveryState.FAILED and isinstance(target, _Target):
            self._watch(target, resume_if_answering=False)

    # Probing a destination that fails ---------------------------------------------------

    def _watch(self, target: _Target, resume_if_answering: bool) -> None:
        """Probe `target` until it answers again, unless a probe of it already runs."""
        with self._lock:
            if self._stop.is_set() or target.name in self._probes:
                return
            thread = threading.Thread(
                target=self._probe_loop, args=(target, resume_if_answering), name=f"delivery-probe-{target.name}",
                daemon=True,
            )
            self._probes[target.name] = thread
        thread.start()

    def _probe_loop(self, target: _Target, resume_if_answering: bool) -> None:
        """`resume_if_answering`: no failure was just seen (start-up), so an answer at once means "back" too."""
        settings = self.config.delivery
        timeout = min(target.destination.timeout_seconds, max(settings.probe_seconds, 2.0))
        sender = make_sender(target.name, target.destination, self.config.node.ae_title)
        was_down = resume_if_answering
        probes = 0
        try:
            while not self._stop.is_set():
                if not self.queue.undelivered(target.stored, target.calling_ae_title):
                    return  # delivered or dead meanwhile
                answers = sender.probe(timeout)
                probes += 1
                if answers is None:
                    return  # cannot be probed (credentials, TLS files): backoff alone decides
                if answers:
                    if was_down:
                        self._resume(target, probes)
                    return
                if not was_down:
                    log.info("destination %s does not answer; probing it every %g s so that its deliveries go "
                             "as soon as it is back", target.name, settings.probe_seconds)
                was_down = True
                self._stop.wait(settings.probe_seconds)
        except Exception:
            log.exception("probing destination %s failed; its deliveries wait out their backoff", target.name)
        finally:
            with self._lock:
                self._probes.pop(target.name, None)

    def _resume(self, target: _Target, probes: int) -> None:
        resumed = self.queue.due_now(target.stored, target.calling_ae_title)
        if resumed:
            log.info("destination %s answers again (probe %d): %d waiting delivery(ies) sent now",
                     target.name, probes, resumed)
            self.queue.note_resumed(target.name, resumed)
