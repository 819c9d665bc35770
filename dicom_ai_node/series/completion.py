"""Series completion: a series is complete once nothing new arrived for `stable_seconds`.

DICOM has no "end of series" message, so like Orthanc's StableAge the node
waits for quiet.  The clock is the `last_received_at` column, not memory, so a
restart in the middle of receiving still completes the series.  Quiet is not
enough when instances of the series were refused for a transient reason: the
series waits for their re-send (up to `series.refused_wait_seconds`).
"""

from __future__ import annotations

import logging

from dicom_ai_node.config import SeriesSection
from dicom_ai_node.store.index import CompletedSeries, Index

log = logging.getLogger(__name__)


def complete_stable_series(index: Index, settings: SeriesSection) -> list[CompletedSeries]:
    completed = index.complete_stable_series(settings.stable_seconds, settings.refused_wait_seconds)
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
