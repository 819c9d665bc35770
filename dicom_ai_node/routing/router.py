"""The routing stage: complete series -> jobs (or not-routed, with the reason); study routes in study.py.

Every change of a series from `complete` to `routed` or `not-routed`, and the
jobs that routing queues, are made here and in study.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, select, update

from dicom_ai_node.config import Config, RouteConfig
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.routing.jobs import priority_of, queue_jobs, urgency
from dicom_ai_node.routing.rules import choose_route, roles_filled
from dicom_ai_node.routing.study import StudyRouter
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Series, SeriesState, Study, utcnow
from dicom_ai_node.values import RouteDecision, SeriesFacts

log = logging.getLogger(__name__)

_series = Series.__table__


class Router:
    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.studies = StudyRouter(engine, storage_root)

    def advance(self, config: Config) -> int:
        """Route every complete series, then decide the studies on study routes that are ready."""
        return self.route_complete_series(config.routes) + self.studies.decide(config)

    def route_complete_series(self, routes: list[RouteConfig]) -> int:
        """Route every series in state `complete`; returns how many were handled."""
        handled = 0
        for series_id, study_id, study_uid, facts in self.complete_series_facts():
            decision = choose_route(facts, routes)
            filled = self.apply_route(series_id, study_id, study_uid, facts, decision, routes)
            if filled is None:
                continue  # re-opened by a late instance meanwhile; routed after its next completion
            handled += 1
            if decision.models:
                log.info("series %s: %s -> %s", facts.series_instance_uid, decision.reason, ", ".join(decision.models))
            elif filled:
                log.info("series %s: %s", facts.series_instance_uid, "; ".join(filled))
            else:
                log.warning("series %s not routed: %s", facts.series_instance_uid, decision.reason)
        return handled

    def complete_series_facts(self) -> list[tuple[int, int, str, SeriesFacts]]:
        """(series id, study id, study UID, facts) of every series waiting to be routed."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Series.id, Series.study_id, Series.last_received_at, Study.study_instance_uid)
                .join(Study, Study.id == Series.study_id)
                .where(Series.state == SeriesState.COMPLETE.value)
                .order_by(Series.completed_at)
            ).all()
            return [(row.id, row.study_id, row.study_instance_uid,
                     self.studies.facts(connection, row.id, row.last_received_at)) for row in rows]

    def apply_route(
        self,
        series_id: int,
        study_id: int,
        study_uid: str,
        facts: SeriesFacts,
        decision: RouteDecision,
        routes: list[RouteConfig],
    ) -> list[str] | None:
        """Queue the decision's jobs and open the study on the study routes whose roles the series fills (or mark
        it not-routed); returns what it is to study routes, None if the series changed meanwhile."""
        now = utcnow()
        fills = roles_filled(facts, routes)
        routed = bool(decision.models or fills)
        state = SeriesState.ROUTED if routed else SeriesState.NOT_ROUTED
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(_series)
                .where(_series.c.id == series_id, _series.c.state == SeriesState.COMPLETE.value)
                .values(state=state.value, state_reason=None if routed else decision.reason,
                        reprocess_requested=False)
            ).rowcount
            if not changed:
                return None
            filled = self.studies.collect(connection, study_id, study_uid, facts.series_instance_uid, fills)
            priority = priority_of(connection, study_id, decision.priority)
            queue_jobs(connection, series_id=series_id, route=decision.route or "", models=decision.models,
                       destinations=decision.destinations, notify=decision.notify, priority=priority, now=now)
            if decision.models:
                message = f"{decision.reason}: queued for {', '.join(decision.models)}{urgency(priority)}"
                message += "".join(f"; {words}" for words in filled)
            elif filled:
                message = "input " + "; ".join(filled)
            else:
                message = f"not routed: {decision.reason}"
                if any(route.unit == "study" for route in routes):
                    message += f" (nor does it fill a study route's role: dicom-ai-node roles {study_uid})"
            insert_event(
                connection,
                EventKind.ROUTED if routed else EventKind.NOT_ROUTED,
                message,
                level=Level.INFO if routed else Level.WARNING,
                study_instance_uid=study_uid,
                series_instance_uid=facts.series_instance_uid,
            )
        return filled
