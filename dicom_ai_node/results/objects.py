"""Which result objects a model's prediction becomes: the results stage's policy, one place for every kind.

A segmentation becomes a SEG and an SR, detections and a classification an SR; a presentation state and
secondary captures are added when a destination asks for them.  The worker stores what this returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from pydicom.dataset import Dataset

from ..inference.findings import Classification, Detections
from ..inference.segmentation import Segmentation
from ..inference.volume import Volume
from ..values import Found
from .found import what_was_found
from .gsps import build_gsps
from .marks import Drawing, detections_drawing, segmentation_drawing, within_the_series
from .sc import build_secondary_captures
from .seg import build_seg
from .sr import build_classification_sr, build_detection_sr, build_sr

log = logging.getLogger(__name__)

MANUFACTURER = "dicom-ai-node"
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
GSPS_SERIES_NUMBER = 9003
SC_SERIES_NUMBER = 9004


@dataclass(frozen=True)
class Authorship:
    """Who made a job's result objects and how they are named: a UID per kind of object ("seg", "sr-series"
    ...), derived from the model and the source images so a re-run writes the same objects."""

    uid: Callable[[str], str]
    model_name: str  # "name version", as SEG, SR and presentation states show the model
    software_version: str
    device_serial_number: str  # the node's installation (its AE title)


@dataclass
class ResultObjects:
    objects: list[tuple[str, Dataset]]  # (kind, dataset): SEG, SR, PR, SC, in the order they are stored
    found: Found
    left_out: list[str]  # what could not be made or kept, and why


def result_objects(
    volume: Volume,
    prediction: Segmentation | Detections | Classification,
    authorship: Authorship,
    outputs: Collection[str],
    *,
    labelmap: bool = False,
    seg_when_empty: bool = False,
) -> ResultObjects:
    """The result objects of what a model returned, for destinations that receive `outputs` between them.

    A segmentation that found nothing gets no SEG (an empty overlay tells a reader nothing the SR does not)
    unless `seg_when_empty`; its SR says what is absent.  A finding placed outside the series is left out.  A
    presentation state ("gsps") and secondary captures ("sc") of the outlines and boxes are made when `outputs`
    asks for them and there is something to draw; they are extras for viewers without SEG, so one that cannot
    be made is left out (and said), never the SEG and SR.
    """
    uid = authorship.uid
    report = {
        "series_number": SR_SERIES_NUMBER,
        "series_instance_uid": uid("sr-series"),
        "sop_instance_uid": uid("sr"),
        "manufacturer": MANUFACTURER,
        "software_version": authorship.software_version,
        "device_name": MANUFACTURER,
        "model_name": authorship.model_name,
    }
    left_out: list[str] = []
    if isinstance(prediction, Detections):
        prediction, outside = within_the_series(prediction, volume)
        left_out += [f"{finding.label} lies outside the series (centre {finding.centre_lps} mm): left out"
                     for finding in outside]
    found = what_was_found(prediction, volume)
    drawn = bool({"gsps", "sc"} & set(outputs))
    objects: list[tuple[str, Dataset]] = []
    drawing: Drawing | None = None
    match prediction:
        case Segmentation():
            seg = None
            if (found.count or seg_when_empty) and any(segment.in_seg for segment in prediction.segments):
                seg = build_seg(
                    volume,
                    prediction,
                    series_number=SEG_SERIES_NUMBER,
                    series_instance_uid=uid("seg-series"),
                    sop_instance_uid=uid("seg"),
                    manufacturer=MANUFACTURER,
                    software_version=authorship.software_version,
                    device_serial_number=authorship.device_serial_number,
                    labelmap=labelmap,
                )
                objects.append(("SEG", seg))
            objects.append(("SR", build_sr(volume, prediction, seg, **report)))
            if drawn:
                drawing = segmentation_drawing(prediction, volume, key_slices_only="gsps" not in outputs)
        case Detections():
            objects.append(("SR", build_detection_sr(volume, prediction, **report)))
            if drawn:
                drawing = detections_drawing(prediction, volume)
        case Classification():
            objects.append(("SR", build_classification_sr(volume, prediction, **report)))
    if drawing is not None and drawing.marks:
        extras = {
            "gsps": ("a presentation state", "PR", lambda: [build_gsps(
                volume, drawing, series_number=GSPS_SERIES_NUMBER, series_instance_uid=uid("gsps-series"),
                sop_instance_uid=uid("gsps"), manufacturer=MANUFACTURER,
                software_version=authorship.software_version,
                device_serial_number=authorship.device_serial_number, model_name=authorship.model_name,
            )]),
            "sc": ("secondary captures", "SC", lambda: build_secondary_captures(
                volume, drawing, series_number=SC_SERIES_NUMBER, series_instance_uid=uid("sc-series"),
                manufacturer=MANUFACTURER, software_version=authorship.software_version,
                model_name=authorship.model_name,
            )),
        }
        for output, (what, kind, build) in extras.items():
            if output not in outputs:
                continue
            try:
                objects += [(kind, dataset) for dataset in build()]
            except Exception as exc:  # e.g. images one presentation state cannot cover (rescale differs per image)
                log.exception("%s not made", what)
                left_out.append(f"{what} not made ({output} is in the outputs of a destination): "
                                f"{type(exc).__name__}: {exc}")
    return ResultObjects(objects, found, left_out)
