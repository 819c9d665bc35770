"""Study routes: a model that reads several series of one study, each by its role (T1, FLAIR, the CT of a PET).

A series that fills a role opens the study on the route (`collecting`).  The study is complete for the route
once every role has a series and no series of the study is still arriving (the series' own completion signals
apply to each): one job per model then, with the series of every role.  Roles still missing
`study_wait_seconds` after the study's last series completed get the route's `missing_role` rule: skip (the
reason recorded), process without them (when every model can), or wait.  A series that fills a role after the
decision opens the study again; if it changes which series fill the roles, the jobs run again on the new ones
(their results are new objects with new UIDs, never mixed with the earlier ones).

Every change of a study route's state is made here.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from dicom_ai_node.config import Config, RouteConfig
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.routing.facts import series_facts
from dicom_ai_node.routing.jobs import priority_of, queue_jobs, urgency
from dicom_ai_node.routing.rules import preferred, role_mismatch, roles_of
from dicom_ai_node.store.index import insert_event
from dicom_ai_node.store.models import (
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    StudyRoute,
    StudyRouteState,
    utcnow,
)
from dicom_ai_node.values import SeriesFacts

log = logging.getLogger(__name__)

_study_routes = StudyRoute.__table__
_ARRIVED = (SeriesState.ROUTED.value, SeriesState.NOT_ROUTED.value)


@dataclass
class RoleAssignment:
    """Which series of a study fill a study route's roles, which could, and what still holds it up."""

    chosen: dict[str, SeriesFacts] = field(default_factory=dict)  # role -> the series that fills it
    candidates: dict[str, list[SeriesFacts]] = field(default_factory=dict)  # role -> every series that could
    missing: list[str] = field(default_factory=list)
    arrived: list[SeriesFacts] = field(default_factory=list)  # series of the study complete and routed
    arriving: list[str] = field(default_factory=list)  # series of the study not yet complete and routed
    ids: dict[str, int] = field(default_factory=dict)  # SeriesInstanceUID -> series id
    received: dict[str, dt.datetime] = field(default_factory=dict)  # SeriesInstanceUID -> its last instance
    last_completed: dt.datetime | None = None


class StudyRouter:
    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.storage_root = storage_root
        self._facts: dict[int, tuple[dt.datetime, SeriesFacts]] = {}  # series id -> (last received, facts)

    def facts(self, connection: Connection, series_id: int, last_received_at: dt.datetime) -> SeriesFacts:
        """A series' facts, read again only when it received something since."""
        known = self._facts.get(series_id)
        if known is None or known[0] != last_received_at:
            known = self._facts[series_id] = (last_received_at, series_facts(connection, self.storage_root, series_id))
        return known[1]

    def collect(
        self, connection: Connection, study_id: int, study_uid: str, series_uid: str, filled: dict[str, list[str]]
    ) -> list[str]:
        """Open the study on every study route whose roles the series fills (`filled`: route name -> roles, from
        `roles_filled`), again if it was decided; returns what the series is to them, e.g. ["t1 of study route
        'brain'"]."""
        for name, roles in filled.items():
            state = connection.execute(
                select(StudyRoute.state).where(StudyRoute.study_id == study_id, StudyRoute.route == name)
            ).scalar()
            if state is None:
                connection.execute(_study_routes.insert().values(
                    study_id=study_id, route=name, state=StudyRouteState.COLLECTING.value, runs=0,
                    opened_at=utcnow()))
            elif state != StudyRouteState.COLLECTING.value:
                reopened = (f"series {series_uid} ({'/'.join(roles)}) arrived after the study was {state} on route "
                            f"{name!r}: decided again once its series are quiet")
                connection.execute(
                    update(_study_routes)
                    .where(_study_routes.c.study_id == study_id, _study_routes.c.route == name)
                    .values(state=StudyRouteState.COLLECTING.value, opened_at=utcnow(), reason=reopened)
                )
                if state != StudyRouteState.WAITING.value:
                    insert_event(connection, EventKind.STUDY_REOPENED, reopened, study_instance_uid=study_uid,
                                 series_instance_uid=series_uid)
        return [f"{'/'.join(roles)} of study route {name!r}" for name, roles in filled.items()]

    def assign(self, connection: Connection, study_id: int, route: RouteConfig) -> RoleAssignment:
        """The study's series by the route's roles, as things stand."""
        assigned = RoleAssignment()
        rows = connection.execute(
            select(Series.id, Series.series_instance_uid, Series.state, Series.completed_at, Series.last_received_at)
            .where(Series.study_id == study_id)
            .order_by(Series.id)
        ).all()
        for row in rows:
            assigned.ids[row.series_instance_uid] = row.id
            assigned.received[row.series_instance_uid] = row.last_received_at
            if row.state not in _ARRIVED:
                assigned.arriving.append(row.series_instance_uid)
                continue
            if row.completed_at is not None and (
                assigned.last_completed is None or row.completed_at > assigned.last_completed
            ):
                assigned.last_completed = row.completed_at
            facts = self.facts(connection, row.id, row.last_received_at)
            assigned.arrived.append(facts)
            for role in roles_of(route, facts):
                assigned.candidates.setdefault(role, []).append(facts)
        for name, role in route.inputs.items():
            if name in assigned.candidates:
                assigned.chosen[name] = preferred(role, assigned.candidates[name])
            else:
                assigned.missing.append(name)
        return assigned

    def decide(self, config: Config) -> int:
        """Decide every collecting study whose roles are all there and quiet, or whose deadline passed; returns how
        many were decided.  (A waiting study changes only when a series fills a role: `collect` reopens it.)"""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(StudyRoute.id, StudyRoute.study_id, StudyRoute.route, StudyRoute.state,
                       StudyRoute.inputs, StudyRoute.runs, StudyRoute.decided_at, StudyRoute.opened_at,
                       Study.study_instance_uid)
                .join(Study, Study.id == StudyRoute.study_id)
                .where(StudyRoute.state == StudyRouteState.COLLECTING.value)
                .order_by(StudyRoute.id)
            ).all()
        decided = 0
        used: set[int] = set()  # the series whose facts are kept for the next pass
        try:
            for row in rows:
                with self.engine.begin() as connection:
                    decided += self._decide(connection, row, config, used)
        finally:
            self._facts = {series_id: facts for series_id, facts in self._facts.items() if series_id in used}
        return decided

    def _decide(self, connection: Connection, row, config: Config, used: set[int]) -> bool:
        route = config.route(row.route)
        if route is None or route.unit != "study":
            return self._close(connection, row, StudyRouteState.SKIPPED, EventKind.STUDY_SKIPPED,
                               f"route {row.route!r} is no longer a study route in the configuration",
                               Level.WARNING, utcnow())
        now = utcnow()  # before the series are read: what arrives after is newer than the decision
        assigned = self.assign(connection, row.study_id, route)
        used.update(assigned.ids.values())
        if assigned.arriving:
            return False  # not quiet yet: decided once every series of the study is complete and routed
        if not assigned.missing:
            return self._queue(connection, row, route, assigned, "every role arrived and its series went quiet", now)
        waited = (now - (assigned.last_completed or row.opened_at)).total_seconds()
        if waited < route.study_wait_seconds:
            return False
        missing = ", ".join(assigned.missing)
        after = f"no series for {missing} {route.study_wait_seconds:g} s after the study's last series completed"
        if route.missing_role == "wait":
            return self._close(connection, row, StudyRouteState.WAITING, EventKind.STUDY_WAITING,
                               f"{after}: route {route.name!r} waits for them; `dicom-ai-node roles "
                               f"{row.study_instance_uid}` shows why each series does not fill them",
                               Level.WARNING, now)
        if route.missing_role == "process":
            cannot = self._cannot_run_without(config, route, assigned.missing)
            if not cannot:
                return self._queue(connection, row, route, assigned, f"{after}: processed without them", now)
            after += f"; {cannot}"
        return self._close(connection, row, StudyRouteState.SKIPPED, EventKind.STUDY_SKIPPED,
                           f"{after}: skipped on route {route.name!r}", Level.WARNING, now)

    def _cannot_run_without(self, config: Config, route: RouteConfig, missing: list[str]) -> str | None:
        """Why the route's models cannot run without the missing roles; None if they all can."""
        first = next(iter(route.inputs))
        if first in missing:
            return f"its first role {first!r} gives the results their grid"
        for model in route.models:
            optional = getattr(config.models[model], "optional_inputs", [])
            if needed := [role for role in missing if role not in optional]:
                return f"model {model!r} needs {', '.join(needed)} (not in its optional_inputs)"
        return None

    def _queue(self, connection: Connection, row, route: RouteConfig, assigned: RoleAssignment, signal: str,
               now: dt.datetime) -> bool:
        """One job per model with the series of every role found, replacing the previous run's jobs still queued;
        none if they are the series already run, with no instance since."""
        inputs = {role: facts.series_instance_uid for role, facts in assigned.chosen.items()}
        described = "; ".join(f"{role} = {_series_words(facts)}" for role, facts in assigned.chosen.items())
        if row.runs and inputs == row.inputs and all(assigned.received[uid] <= row.decided_at
                                                     for uid in inputs.values()):
            return self._close(connection, row, StudyRouteState.QUEUED, EventKind.STUDY_COMPLETE,
                               f"study complete again on route {route.name!r} ({signal}): the same series fill its "
                               f"roles ({described}); nothing runs again", Level.INFO, now, inputs)
        priority = priority_of(connection, row.study_id, route.priority)
        again = " again" if row.runs else ""
        if not self._close(connection, row, StudyRouteState.QUEUED, EventKind.STUDY_COMPLETE,
                           f"study complete{again} on route {route.name!r} ({signal}): {described}; queued for "
                           f"{', '.join(route.models)}{urgency(priority)}", Level.INFO, now, inputs,
                           runs=row.runs + 1):
            return False
        of_study = select(Series.id).where(Series.study_id == row.study_id)
        connection.execute(
            update(Job).where(Job.series_id.in_(of_study), Job.route == route.name, Job.inputs.is_not(None),
                              Job.state == JobState.QUEUED.value)
            .values(state=JobState.CANCELLED.value, finished_at=now,
                    error="replaced before it ran: the study's roles changed, its route queued the job again")
        )
        queue_jobs(connection, series_id=assigned.ids[inputs[next(iter(route.inputs))]], route=route.name,
                   models=tuple(route.models), destinations=tuple(route.destinations), notify=tuple(route.notify),
                   priority=priority, now=now, inputs=inputs)
        return True

    @staticmethod
    def _close(
        connection: Connection,
        row,
        state: StudyRouteState,
        kind: EventKind,
        message: str,
        level: Level,
        at: dt.datetime,
        inputs: dict[str, str] | None = None,
        runs: int | None = None,
    ) -> bool:
        """Record the decision made `at` (before its series were read), if the study was still as `row` saw it;
        True if it was."""
        values = {"state": state.value, "reason": message, "decided_at": at}
        if inputs is not None:
            values["inputs"] = inputs
        if runs is not None:
            values["runs"] = runs
        changed = connection.execute(
            update(_study_routes).where(_study_routes.c.id == row.id, _study_routes.c.state == row.state)
            .values(**values)
        ).rowcount
        if changed:
            insert_event(connection, kind, message, level=level, study_instance_uid=row.study_instance_uid)
            log.log(level.logging_level, "study %s: %s", row.study_instance_uid, message)
        return bool(changed)


def _series_words(facts: SeriesFacts) -> str:
    number = f"series {facts.series_number}" if facts.series_number is not None else "series"
    return f"{number} {facts.series_description or ''!r} ({facts.series_instance_uid})"


def study_roles(router: StudyRouter, config: Config, study_uid: str) -> list[dict[str, Any]]:
    """For `dicom-ai-node roles`: per study route, what was decided, which series fill its roles, and for a role
    no series fills, why each series of the study does not."""
    shown = []
    with router.engine.connect() as connection:
        study_id = connection.execute(select(Study.id).where(Study.study_instance_uid == study_uid)).scalar()
        if study_id is None:
            return []
        decided = {row.route: row for row in connection.execute(
            select(StudyRoute.route, StudyRoute.state, StudyRoute.reason, StudyRoute.inputs, StudyRoute.runs)
            .where(StudyRoute.study_id == study_id)
        )}
        for route in (route for route in config.routes if route.unit == "study"):
            assigned = router.assign(connection, study_id, route)
            row = decided.get(route.name)
            roles = []
            for name in route.inputs:
                chosen = assigned.chosen.get(name)
                roles.append({
                    "role": name,
                    "series": None if chosen is None else _series_words(chosen),
                    "SeriesInstanceUID": None if chosen is None else chosen.series_instance_uid,
                    "other_candidates": [facts.series_instance_uid for facts in assigned.candidates.get(name, [])
                                         if facts is not chosen],
                    "ran_on": None if row is None or not row.inputs else row.inputs.get(name),
                    "why_not": {} if chosen is not None else {
                        _series_words(facts): role_mismatch(route, route.inputs[name], facts)
                        for facts in assigned.arrived},
                })
            shown.append({
                "route": route.name,
                "state": "not started (no series fills a role)" if row is None else row.state,
                "reason": None if row is None else row.reason,
                "runs": 0 if row is None else row.runs,
                "missing": assigned.missing,
                "arriving": assigned.arriving,
                "roles": roles,
            })
    return shown
