"""The running node: wires the stages together and owns start-up and shutdown."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

from dicom_ai_node.config import Config
from dicom_ai_node.delivery.queue import DeliveryQueue
from dicom_ai_node.delivery.runner import DeliveryRunner
from dicom_ai_node.errors import StartupError
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.fetch.queue import FetchQueue
from dicom_ai_node.fetch.runner import FetchRunner
from dicom_ai_node.inference.queue import JobQueue
from dicom_ai_node.ingest.orthanc_pull import OrthancPuller
from dicom_ai_node.ingest.receive import Receiver
from dicom_ai_node.ingest.scp import StorageSCP
from dicom_ai_node.notify.queue import NotificationQueue
from dicom_ai_node.notify.runner import NotificationRunner
from dicom_ai_node.routing.router import Router
from dicom_ai_node.series.completion import SeriesCompletion
from dicom_ai_node.store.backfill import backfill_query_attributes
from dicom_ai_node.store.db import make_engine, require_current_schema
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index
from dicom_ai_node.store.reconcile import reconcile
from dicom_ai_node.web.server import WebServer

log = logging.getLogger(__name__)

# A start that failed stops what it had started within this long: nothing was served yet.
_FAILED_START_STOP_SECONDS = 5.0


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = make_engine(config.database.url)
        require_current_schema(self.engine, config.source)
        self.index = Index(self.engine)
        self.completion = SeriesCompletion(self.index, config.peers, config.node.ae_title,
                                           config.series.sender_count_wait_seconds, config.fetch.timeout_seconds)
        self.router = Router(self.engine, config.storage.path)
        self.store = InstanceStore(
            config.storage.path, config.storage.min_free_mb * 2**20, config.storage.results_floor_mb * 2**20
        )
        self.queue = JobQueue(self.engine, config.storage.path)
        self.deliveries = DeliveryQueue(self.engine, config.storage.path, config.delivery, config.outputs_of)
        self.delivery = DeliveryRunner(config, self.deliveries)
        patient_id_for = {name for name, webhook in config.webhooks.items() if webhook.include_patient_id}
        self.notifications = NotificationQueue(self.engine, config.delivery, config.node.ae_title, patient_id_for)
        self.notifier = NotificationRunner(config, self.notifications)
        self.fetches = FetchQueue(self.engine)
        self.fetcher = FetchRunner(config, self.fetches)
        self.scp = StorageSCP(config, self.index, self.store)
        self.web = WebServer(config, self.engine, self.index, self.store, self.scp.admission.counts)
        self.pullers = [
            OrthancPuller(name, source, config, self.engine,
                          Receiver(self.index, self.store, max_inflated_bytes=config.storage.max_inflated_mb * 2**20))
            for name, source in config.sources.items()
        ]
        self._stop = threading.Event()
        self._completion_resumes = 0.0  # time.monotonic() before which no series completes
        self._stages = threading.Thread(target=self._advance_forever, name="series-stages", daemon=True)
        self._workers: list[multiprocessing.process.BaseProcess] = []

    def advance(self) -> None:
        """One pass of the stages that follow receiving: completion, then routing."""
        if time.monotonic() >= self._completion_resumes:
            self.completion.complete_stable_series(
                self.config.series.stable_seconds, self.config.series.refused_wait_seconds
            )
        self.router.advance(self.config)

    def _advance_forever(self) -> None:
        interval = self.config.series.check_interval_seconds
        while not self._stop.wait(interval):
            try:
                self.advance()
            except Exception:  # a database hiccup must not stop the pipeline for good
                log.exception("series stages failed; retrying in %.1f s", interval)

    def start(self) -> None:
        """Listen, repair, serve, then start workers, pullers, delivery and the series stages.

        The listening sockets (DICOM plain and TLS, DICOMweb) are bound first, so a port
        in use (another node on this database, perhaps) stops start-up before it touches
        the database or the storage; they are served only once the start-up repair is
        done.  If any part cannot start, what had started is stopped again and a
        StartupError (any NodeError) says what failed; nothing is left running.
        """
        started: list[Callable[[float], object]] = []  # stop paths of what has started, each given a deadline
        try:
            started.append(self._stop_listeners)  # also closes what a failing bind() got to bind
            self.scp.bind()
            self.web.bind()
            reconcile(self.engine, self.config.storage.path, self._max_in_flight())  # before anyone is served
            backfill_query_attributes(self.engine, self.config.storage.path)  # rows indexed before migration 0008
            requeued = self.queue.requeue_interrupted()
            if requeued:
                log.warning("%d job(s) interrupted by the last shutdown are queued again", requeued)
            resent = self.deliveries.requeue_interrupted()
            if resent:
                log.warning("%d delivery(ies) interrupted by the last shutdown will be sent again", resent)
            if called := self.notifications.requeue_interrupted():
                log.warning("%d webhook call(s) interrupted by the last shutdown will be made again", called)
            if fetching := self.fetches.requeue_interrupted():
                log.warning("%d fetch(es) interrupted by the last shutdown are queued again", fetching)
            self._hold_interrupted_series()
            self.advance()  # series a previous run left complete but not yet routed
            self.scp.start()
            self.web.start()
            if self.config.workers.processes:
                started.append(self._stop_started_workers)
                self._start_workers()
            started.append(self._stop_pullers)
            for puller in self.pullers:
                puller.start()
            self.delivery.start()
            started.append(self.delivery.stop)
            self.notifier.start()
            started.append(self.notifier.stop)
            self.fetcher.start()  # after the SCP: the studies it moves arrive there
            started.append(self.fetcher.stop)
            self._stages.start()
        except BaseException as exc:
            self._stop_after_failed_start(started)
            if isinstance(exc, OSError):  # e.g. the storage cannot be written: the admin's to fix
                raise StartupError(f"cannot start: {exc}") from exc
            raise

    def _stop_after_failed_start(self, started: list[Callable[[float], object]]) -> None:
        """Stop, newest first, what a failed `start` had started, within _FAILED_START_STOP_SECONDS."""
        deadline = time.monotonic() + _FAILED_START_STOP_SECONDS
        self._stop.set()
        for stop in reversed(started):
            try:
                stop(deadline)
            except Exception:  # the start-up failure is what the admin must see; this goes to the log
                log.warning("while stopping after a failed start", exc_info=True)
        self.engine.dispose()

    def _stop_listeners(self, deadline: float) -> None:
        self.scp.stop_accepting()
        self.web.stop(deadline)
        self.scp.drain(deadline)

    def _stop_pullers(self, deadline: float) -> None:
        for puller in self.pullers:
            puller.stop(timeout=max(0.0, deadline - time.monotonic()))

    def _stop_started_workers(self, deadline: float) -> None:
        for process in self._workers:
            process.terminate()
        for process in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()

    def _max_in_flight(self) -> int:
        """How many instances can be being written at once: one per association, per source, per STOW thread."""
        stow_threads = 40 if self.config.web.enabled else 0  # anyio's default worker threads, which STOW-RS uses
        return self.config.dimse.max_associations + len(self.config.sources) + stow_threads

    def _hold_interrupted_series(self) -> None:
        """Give series the last run was still receiving a fresh `stable_seconds` from now.

        A sender whose transfer the shutdown cut off sends again once the node is
        back; had its series completed meanwhile from the instances that came
        before, the re-send would arrive late and the PACS would get two result sets.
        Series that start arriving after start-up cannot complete sooner anyway.
        """
        interrupted = self.index.receiving_series()
        if not interrupted:
            return
        stable = self.config.series.stable_seconds
        self._completion_resumes = time.monotonic() + stable
        log.warning("%d series were still receiving when the node last stopped: they complete no sooner "
                    "than %.0f s (series.stable_seconds) from now, so their senders can resume",
                    len(interrupted), stable)
        for study_uid, series_uid in interrupted:
            self.index.record(
                EventKind.RECEIVING_INTERRUPTED,
                f"series {series_uid} was still receiving when the node stopped; it completes no sooner than "
                f"{stable:g} s after the restart, so the sender can send the rest",
                level=Level.WARNING,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
            )

    def _start_workers(self) -> None:
        from dicom_ai_node.worker import worker_main  # torch & co. load in the workers, not here

        context = multiprocessing.get_context("spawn")
        for number in range(self.config.workers.processes):
            process = context.Process(
                target=worker_main, args=(self.config.source, os.getpid()), name=f"worker-{number}"
            )
            process.start()
            self._workers.append(process)

    def stop(self) -> None:
        """Drain within `node.shutdown_grace_seconds`, all of it: then whatever still runs is cut off.

        No new connections; open associations, running jobs and sends share the
        grace period; then associations are aborted (senders send again),
        workers killed (their jobs re-run at the next start) and sends left
        `sending` (sent again at the next start, with the same UIDs).
        """
        grace = self.config.node.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        log.info("stopping: no new associations; up to %.0f s for open associations, jobs and deliveries", grace)
        # First the fetch: a C-MOVE still running would have its instances refused by the closed SCP.
        self.fetcher.stop(min(deadline, time.monotonic() + _FAILED_START_STOP_SECONDS))
        self.scp.stop_accepting()
        self._stop.set()
        self.web.stop(deadline)
        for puller in self.pullers:
            puller.stop(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._workers:
            process.terminate()  # a worker finishes its current job, then exits
        self.delivery.stop(deadline)
        self.notifier.stop(deadline)
        self.scp.drain(deadline)
        for process in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s still running after %.0f s: killed; its job is re-run at next start",
                            process.name, grace)
                process.kill()
                process.join()
        self._stages.join(timeout=max(0.0, deadline - time.monotonic()))
        self.engine.dispose()
        log.info("stopped")


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; if the node cannot start, a NodeError (e.g. StartupError), nothing left running."""
    try:
        node = Node(config)
    except OSError as exc:  # e.g. the storage folder cannot be made: the admin's to fix
        raise StartupError(f"cannot start: {exc}") from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node.start()
    log.info(
        "dicom-ai-node ready: AE %s on port %d, storage %s, database %s, %d worker process(es)",
        config.node.ae_title,
        config.dimse.port,
        config.storage.path,
        node.engine.url.render_as_string(hide_password=True),
        config.workers.processes,
    )
    stop.wait()
    node.stop()
    _exit_now_if_threads_linger()


def _exit_now_if_threads_linger() -> None:
    """End the process even if a thread outlives the grace period.

    pynetdicom's association threads are not daemon threads, so an association
    to a destination that never answers would otherwise hold the interpreter
    until its own timeout.  Everything it was doing is recorded as unfinished
    in the database and is done again after the next start.
    """
    lingering = [thread.name for thread in threading.enumerate()
                 if thread is not threading.main_thread() and thread.is_alive() and not thread.daemon]
    if lingering:
        log.warning("exiting with %d thread(s) still running, cut off: %s", len(lingering), ", ".join(lingering))
        logging.shutdown()
        os._exit(0)
