"""Route matching rules, in isolation (the end-to-end path is in test_pipeline.py)."""

from __future__ import annotations

from pydicom.uid import CTImageStorage, ComprehensiveSRStorage, MRImageStorage, SegmentationStorage

from dicom_ai_node.config import RouteConfig
from dicom_ai_node.routing.rules import choose_route
from dicom_ai_node.values import SeriesFacts

ROUTES = [
    RouteConfig(name="ct-chest", modality="CT", body_part_examined="chest", series_description="lung|thorax",
                image_type_contains="AXIAL", min_slices=20, models=["ct-tissue"]),
    RouteConfig(name="ct-any", modality="CT", min_slices=3, models=["ct-tissue", "other"]),
]


def facts(**overrides) -> SeriesFacts:
    values = dict(
        series_instance_uid="1.2.3",
        modality="CT",
        body_part_examined="CHEST",
        series_description="Thorax 1mm",
        sop_class_uids=frozenset({CTImageStorage}),
        image_types=frozenset({"ORIGINAL\\PRIMARY\\AXIAL"}),
        instances=100,
    )
    values.update(overrides)
    return SeriesFacts(**values)


def test_first_matching_route_wins():
    decision = choose_route(facts(), ROUTES)
    assert decision.route == "ct-chest" and decision.models == ("ct-tissue",)


def test_each_condition_falls_through_to_the_next_route():
    for override in (
        {"body_part_examined": "HEAD"},
        {"series_description": "Brain"},
        {"image_types": frozenset({"DERIVED\\SECONDARY\\MPR"})},
        {"instances": 10},
    ):
        decision = choose_route(facts(**override), ROUTES)
        assert decision.route == "ct-any", override
        assert decision.models == ("ct-tissue", "other")


def test_not_routed_reason_names_each_route():
    decision = choose_route(facts(modality="MR", sop_class_uids=frozenset({MRImageStorage})), ROUTES)
    assert decision.route is None and decision.models == ()
    assert decision.reason == "no route matches (ct-chest: Modality is MR, not CT; ct-any: Modality is MR, not CT)"
    short = choose_route(facts(instances=2), ROUTES)
    assert "ct-any: 2 instance(s), the route needs at least 3" in short.reason


def test_non_image_objects_are_never_routed():
    for sop_class in (ComprehensiveSRStorage, SegmentationStorage, "1.2.840.10008.5.1.4.1.1.104.1"):
        decision = choose_route(facts(sop_class_uids=frozenset({sop_class})), ROUTES)
        assert decision.models == () and "never sent to a model" in decision.reason


def test_sop_class_filter():
    only_enhanced = [RouteConfig(name="enh", modality="CT", sop_class_uids=["1.2.840.10008.5.1.4.1.1.2.1"],
                                 models=["m"])]
    assert choose_route(facts(), only_enhanced).models == ()
    enhanced = facts(sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2.1"}), instances=1)
    assert choose_route(enhanced, only_enhanced).route == "enh"
