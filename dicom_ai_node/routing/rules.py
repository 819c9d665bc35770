"""Route matching: the first route in config order whose every condition holds wins.

A series that matches none is `not-routed`, with a reason that tells the admin,
route by route, the first condition that failed.
"""

from __future__ import annotations

import re

from dicom_ai_node.config import RouteConfig
from dicom_ai_node.values import RouteDecision, SeriesFacts

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


def _mismatch(route: RouteConfig, facts: SeriesFacts) -> str | None:
    """The first condition of `route` the series fails, in words; None if it matches."""
    if (facts.modality or "").upper() != route.modality.upper():
        return f"Modality is {facts.modality or 'empty'}, not {route.modality}"
    if route.body_part_examined and (facts.body_part_examined or "").upper() != route.body_part_examined.upper():
        return f"BodyPartExamined is {facts.body_part_examined or 'empty'}, not {route.body_part_examined}"
    if route.series_description and not re.search(
        route.series_description, facts.series_description or "", re.IGNORECASE
    ):
        return f"SeriesDescription {facts.series_description or ''!r} does not match /{route.series_description}/"
    if route.image_type_contains and not any(
        route.image_type_contains.upper() in image_type.upper().split("\\") for image_type in facts.image_types
    ):
        return f"ImageType does not contain {route.image_type_contains}"
    if route.sop_class_uids and not facts.sop_class_uids & set(route.sop_class_uids):
        return "SOP Class UID is not one of the route's sop_class_uids"
    if facts.instances < route.min_slices:
        return f"{facts.instances} instance(s), the route needs at least {route.min_slices}"
    return None


def choose_route(facts: SeriesFacts, routes: list[RouteConfig]) -> RouteDecision:
    non_image = sorted(uid for uid in facts.sop_class_uids if is_non_image(uid))
    if non_image:
        return RouteDecision(None, (), (), f"non-image objects ({', '.join(non_image)}) are never sent to a model")
    if not routes:
        return RouteDecision(None, (), (), "no routes are configured")
    mismatches = []
    for route in routes:
        why = _mismatch(route, facts)
        if why is None:
            return RouteDecision(route.name, tuple(route.models), tuple(route.destinations),
                                 f"matched route {route.name!r}", route.priority, tuple(route.notify))
        mismatches.append(f"{route.name}: {why}")
    return RouteDecision(None, (), (), "no route matches (" + "; ".join(mismatches) + ")")
