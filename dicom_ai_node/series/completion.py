"""Series completion: a series is complete once nothing new arrived for `stable_seconds`.

DICOM has no "end of series" message, so like Orthanc's StableAge the node
waits for quiet.  The clock is the `last_received_at` column, not memory, so a
restart in the middle of receiving still completes the series.
"""

from __future__ import annotations

import logging
import threading

from dicom_ai_node.store.index import CompletedSeries, Index

log = logging.getLogger(__name__)


class CompletionMonitor:
    def __init__(self, index: Index, stable_seconds: float, interval_seconds: float) -> None:
        self.index = index
        self.stable_seconds = stable_seconds
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="series-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check_once(self) -> list[CompletedSeries]:
        completed = self.index.complete_stable_series(self.stable_seconds)
        for series in completed:
            log.info(
                "series %s of study %s complete: %d instance(s) (%s)%s",
                series.series_instance_uid,
                series.study_instance_uid,
                series.instances,
                series.modality or "?",
                ", re-processing requested" if series.reprocess else "",
            )
        return completed

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.check_once()
            except Exception:  # a database hiccup must not stop completion for good
                log.exception("series completion check failed; retrying in %.0f s", self.interval_seconds)
