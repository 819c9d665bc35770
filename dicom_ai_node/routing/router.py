"""The routing stage: complete series -> jobs (or not-routed, with the reason).

Every change of a series from `complete` to `routed` or `not-routed`, and the
jobs that routing queues, are made here.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, select, update

from dicom_ai_node.config import RouteConfig
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.routing.rules import choose_route
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import Instance, Job, JobState, Priority, Series, SeriesState, Study, utcnow
from dicom_ai_node.values import RouteDecision, SeriesFacts

log = logging.getLogger(__name__)

_jobs = Job.__table__
_series = Series.__table__


class Router:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def route_complete_series(self, routes: list[RouteConfig]) -> int:
        """Route every series in state `complete`; returns how many were handled."""
        handled = 0
        for series_id, study_uid, facts in self.complete_series_facts():
            decision = choose_route(facts, routes)
            if not self.apply_route(series_id, study_uid, facts, decision):
                continue  # re-opened by a late instance meanwhile; routed after its next completion
            handled += 1
            if decision.models:
                log.info("series %s: %s -> %s", facts.series_instance_uid, decision.reason, ", ".join(decision.models))
            else:
                log.warning("series %s not routed: %s", facts.series_instance_uid, decision.reason)
        return handled

    def complete_series_facts(self) -> list[tuple[int, str, SeriesFacts]]:
        """(series id, study UID, facts) of every series waiting to be routed."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Series.id, Series.series_instance_uid, Series.modality, Series.body_part_examined,
                       Series.series_description, Study.study_instance_uid)
                .join(Study, Study.id == Series.study_id)
                .where(Series.state == SeriesState.COMPLETE.value)
                .order_by(Series.completed_at)
            ).all()
            facts = []
            for row in rows:
                instances = connection.execute(
                    select(Instance.sop_class_uid, Instance.image_type).where(Instance.series_id == row.id)
                ).all()
                facts.append(
                    (
                        row.id,
                        row.study_instance_uid,
                        SeriesFacts(
                            series_instance_uid=row.series_instance_uid,
                            modality=row.modality,
                            body_part_examined=row.body_part_examined,
                            series_description=row.series_description,
                            sop_class_uids=frozenset(i.sop_class_uid for i in instances),
                            image_types=frozenset(i.image_type for i in instances if i.image_type),
                            instances=len(instances),
                        ),
                    )
                )
        return facts

    def apply_route(self, series_id: int, study_uid: str, facts: SeriesFacts, decision: RouteDecision) -> bool:
        """Queue the decision's jobs (or mark not-routed); False if the series changed meanwhile."""
        now = utcnow()
        state = SeriesState.ROUTED if decision.models else SeriesState.NOT_ROUTED
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(_series)
                .where(_series.c.id == series_id, _series.c.state == SeriesState.COMPLETE.value)
                .values(
                    state=state.value,
                    state_reason=None if decision.models else decision.reason,
                    reprocess_requested=False,
                )
            ).rowcount
            if not changed:
                return False
            study_priority = connection.execute(
                select(Study.priority).join(Series, Series.study_id == Study.id).where(Series.id == series_id)
            ).scalar()
            priority = Priority[decision.priority.upper()] if study_priority is None else Priority(study_priority)
            for model in decision.models:
                connection.execute(
                    _jobs.insert().values(
                        series_id=series_id,
                        route=decision.route,
                        model=model,
                        destinations=list(decision.destinations),
                        notify=list(decision.notify) or None,
                        state=JobState.QUEUED.value,
                        priority=priority.value,
                        attempts=0,
                        created_at=now,
                    )
                )
            urgency = "" if priority is Priority.ROUTINE else f" ({priority.label})"
            message = (
                f"{decision.reason}: queued for {', '.join(decision.models)}{urgency}"
                if decision.models
                else f"not routed: {decision.reason}"
            )
            insert_event(
                connection,
                EventKind.ROUTED if decision.models else EventKind.NOT_ROUTED,
                message,
                level=Level.INFO if decision.models else Level.WARNING,
                study_instance_uid=study_uid,
                series_instance_uid=facts.series_instance_uid,
            )
        return True
