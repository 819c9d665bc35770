"""The fetch runner: one thread in the node that retrieves queued studies one at a time, within the configured
window and rate."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from dicom_ai_node.config import Config, FetchSection
from dicom_ai_node.fetch.dimse import Moved, move_study
from dicom_ai_node.fetch.queue import FetchQueue
from dicom_ai_node.store.models import utcnow

log = logging.getLogger(__name__)


def waiting_reason(settings: FetchSection, local_now: dt.datetime, started_last_hour: int) -> str | None:
    """Why no study may be fetched now (outside `fetch.window`, or `max_studies_per_hour` reached), or None."""
    if settings.window is not None:
        start, end = (dt.time.fromisoformat(part) for part in settings.window.split("-"))
        now = local_now.time()
        inside = start <= now < end if start <= end else (now >= start or now < end)
        if not inside:
            return f"outside fetch.window {settings.window} (the node's local time is {now:%H:%M})"
    if settings.max_studies_per_hour and started_last_hour >= settings.max_studies_per_hour:
        return f"fetch.max_studies_per_hour ({settings.max_studies_per_hour}) reached"
    return None


class FetchRunner:
    def __init__(self, config: Config, queue: FetchQueue, interval_seconds: float = 1.0) -> None:
        self.config = config
        self.queue = queue
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fetch", daemon=True)

    def start(self) -> None:
        if self.config.peers:  # nothing to fetch from without peers
            self._thread.start()

    def stop(self, deadline: float) -> None:
        """Abort the C-MOVE under way at its next answer (queued again at the next start) and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def run_once(self) -> bool:
        """Fetch the next queued study if the window and the rate allow; True if one was fetched."""
        started = self.queue.started_since(utcnow() - dt.timedelta(hours=1))
        if waiting_reason(self.config.fetch, dt.datetime.now(), started) is not None:
            return False
        fetch = self.queue.claim()
        if fetch is None:
            return False
        peer = self.config.peers.get(fetch.peer)
        if peer is None:
            moved: Moved | None = Moved(False, 0, 0, f"peer {fetch.peer} is no longer in [peers]")
        else:
            try:
                moved = move_study(self.config.node.ae_title, fetch.peer, peer, fetch.study_instance_uid,
                                   self.config.fetch.timeout_seconds, stopping=self._stop.is_set)
            except Exception as exc:  # pynetdicom raises when the peer aborts between associating and the request
                log.exception("fetch F%d: the C-MOVE failed", fetch.id)
                moved = Moved(False, 0, 0, f"peer {fetch.peer}: the C-MOVE failed: {exc!r}", transient=True)
        if moved is None:  # aborted because the node stops: left `fetching`, queued again at the next start
            return False
        self.queue.record(fetch, moved)
        log.info("fetch F%d of %s from %s: %s", fetch.id, fetch.study_instance_uid, fetch.peer,
                 "done" if moved.ok else f"failed: {moved.reason}")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                while self.run_once() and not self._stop.is_set():
                    pass
            except Exception:  # a database hiccup must not stop fetching for good
                log.exception("fetching failed; retrying")
