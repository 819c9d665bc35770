"""The routing stage: complete series -> jobs (or not-routed, with the reason)."""

from __future__ import annotations

import logging

from dicom_ai_node.config import RouteConfig
from dicom_ai_node.routing.rules import choose_route
from dicom_ai_node.store.jobs import JobQueue

log = logging.getLogger(__name__)


def route_complete_series(queue: JobQueue, routes: list[RouteConfig]) -> int:
    """Route every series in state `complete`; returns how many were handled."""
    handled = 0
    for series_id, study_uid, facts in queue.complete_series_facts():
        decision = choose_route(facts, routes)
        if not queue.apply_route(series_id, study_uid, facts, decision):
            continue  # re-opened by a late instance meanwhile; routed after its next completion
        handled += 1
        if decision.models:
            log.info("series %s: %s -> %s", facts.series_instance_uid, decision.reason, ", ".join(decision.models))
        else:
            log.warning("series %s not routed: %s", facts.series_instance_uid, decision.reason)
    return handled
