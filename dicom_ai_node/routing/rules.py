"""Route matching: the first route in config order whose every condition holds wins.

A series that matches none is `not-routed`, with a reason that tells the admin,
route by route, the first condition that failed.
"""

from __future__ import annotations

import re

from dicom_ai_node.config import RoleConfig, RouteConfig, SeriesRule
from dicom_ai_node.values import RouteDecision, SequenceFacts, SeriesFacts

# Objects that are never images for a model, even when they carry Rows/Columns.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured Reports, Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation States
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF / CDA / STL ...
    "1.2.840.10008.5.1.4.1.1.66",  # Raw data, Spatial registration, SEG, Surface SEG, Label Map SEG
    "1.2.840.10008.5.1.4.1.1.9.",  # Waveforms
)


def is_non_image(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(_NON_IMAGE_PREFIXES)


def _mismatch(rule: SeriesRule, modality: str, facts: SeriesFacts) -> str | None:
    """The first condition of `rule` the series fails, in words; None if it meets them all."""
    if (facts.modality or "").upper() != modality.upper():
        return f"Modality is {facts.modality or 'empty'}, not {modality}"
    if rule.body_part_examined and (facts.body_part_examined or "").upper() != rule.body_part_examined.upper():
        return f"BodyPartExamined is {facts.body_part_examined or 'empty'}, not {rule.body_part_examined}"
    if rule.series_description and not re.search(
        rule.series_description, facts.series_description or "", re.IGNORECASE
    ):
        return f"SeriesDescription {facts.series_description or ''!r} does not match /{rule.series_description}/"
    if rule.image_type_contains and not any(
        rule.image_type_contains.upper() in image_type.upper().split("\\") for image_type in facts.image_types
    ):
        return f"ImageType does not contain {rule.image_type_contains}"
    if rule.sop_class_uids and not facts.sop_class_uids & set(rule.sop_class_uids):
        return "SOP Class UID is not one of the route's sop_class_uids"
    if facts.instances < rule.min_slices:
        return f"{facts.instances} instance(s), the route needs at least {rule.min_slices}"
    return _sequence_mismatch(rule, facts.sequence)


def _sequence_mismatch(rule: SeriesRule, sequence: SequenceFacts) -> str | None:
    for keyword, wanted, held in (("ScanningSequence", rule.scanning_sequence, sequence.scanning_sequence),
                                  ("SequenceVariant", rule.sequence_variant, sequence.sequence_variant)):
        if missing := [code for code in wanted if code not in held]:
            return f"{keyword} {'/'.join(sorted(held)) or 'empty'} lacks {'/'.join(missing)}"
    for keyword, bounds, value in (("EchoTime", rule.echo_time, sequence.echo_time),
                                   ("RepetitionTime", rule.repetition_time, sequence.repetition_time),
                                   ("InversionTime", rule.inversion_time, sequence.inversion_time)):
        if bounds is not None and (value is None or not bounds[0] <= value <= bounds[1]):
            shown = "absent" if value is None else f"{value:g} ms"
            return f"{keyword} {shown} is not within {bounds[0]:g}-{bounds[1]:g} ms"
    if rule.contrast is True and not sequence.contrast_agent:
        return "no ContrastBolusAgent: not a contrast-enhanced series"
    if rule.contrast is False and sequence.contrast_agent:
        return f"ContrastBolusAgent {sequence.contrast_agent!r}: a contrast-enhanced series"
    return None


def role_mismatch(route: RouteConfig, role: RoleConfig, facts: SeriesFacts) -> str | None:
    """Why a series is not the `role` of a study route (the route's conditions, then the role's); None if it is."""
    return _mismatch(route, role.modality or route.modality, facts) or _mismatch(
        role, role.modality or route.modality, facts
    )


def roles_of(route: RouteConfig, facts: SeriesFacts) -> list[str]:
    """The roles of a study route that a series can fill."""
    if non_image_classes(facts):
        return []
    return [name for name, role in route.inputs.items() if role_mismatch(route, role, facts) is None]


def roles_filled(facts: SeriesFacts, routes: list[RouteConfig]) -> dict[str, list[str]]:
    """Study route name -> the roles of it the series can fill, for the study routes it fills any of."""
    return {route.name: roles for route in routes if route.unit == "study" and (roles := roles_of(route, facts))}


def preferred(role: RoleConfig, candidates: list[SeriesFacts]) -> SeriesFacts:
    """The series that fills a role several series match, by the role's `prefer` (ties: the latest)."""

    def latest(facts: SeriesFacts) -> tuple:
        return facts.sequence.acquired, facts.series_number or 0

    def thinnest(facts: SeriesFacts) -> float:
        thickness = facts.sequence.slice_thickness
        return -thickness if thickness else float("-inf")

    keys = {"latest": latest, "most_slices": lambda facts: (facts.instances, latest(facts)),
            "thinnest_slices": lambda facts: (thinnest(facts), latest(facts))}
    return max(candidates, key=keys[role.prefer])


def non_image_classes(facts: SeriesFacts) -> list[str]:
    """The SOP classes of the series that are never images for a model, sorted."""
    return sorted(uid for uid in facts.sop_class_uids if is_non_image(uid))


def choose_route(facts: SeriesFacts, routes: list[RouteConfig]) -> RouteDecision:
    if non_image := non_image_classes(facts):
        return RouteDecision(None, (), (), f"non-image objects ({', '.join(non_image)}) are never sent to a model")
    if not any(route.unit == "series" for route in routes):
        return RouteDecision(None, (), (), "no series routes are configured")
    mismatches = []
    for route in (route for route in routes if route.unit == "series"):
        why = _mismatch(route, route.modality, facts)
        if why is None:
            return RouteDecision(route.name, tuple(route.models), tuple(route.destinations),
                                 f"matched route {route.name!r}", route.priority, tuple(route.notify))
        mismatches.append(f"{route.name}: {why}")
    return RouteDecision(None, (), (), "no route matches (" + "; ".join(mismatches) + ")")
