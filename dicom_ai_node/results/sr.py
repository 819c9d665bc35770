"""Model results -> TID 1500 Measurement Reports (Comprehensive 3D SR): about a segmentation's segments, a
detector's findings, or a classifier's answer; a model that found nothing says so."""

from __future__ import annotations

from typing import TypedDict, Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..inference.findings import Classification, Detection, Detections
from ..inference.segmentation import CodedConcept, Segmentation
from ..inference.volume import Volume
from .contours import CrossSection, largest_cross_section
from .marks import detection_region
from .seg import coded_concept, seg_segment_numbers, segment_tracking_uid, with_patient_and_study
from .uids import name_uid

_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_SQUARE_MILLIMETRE = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
_ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")

# What the rescaled pixel values measure, per modality, as dcmqi and 3D Slicer's
# Quantitative Reporting encode it: (concept name, unit).  A modality not listed
# gets no intensity statistics rather than a guessed quantity or unit.
_INTENSITY: dict[str, tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]] = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}

# The Tracking Identifier of an outline group: how OHIF's own reports name a freehand outline, and the one name
# by which OHIF 3 takes a polyline of many points into its measurement panel (it recognises other polylines only
# as rectangles of 4 or 5 points).  The finding type ("Lung") names what is outlined.
OHIF_FREEHAND_OUTLINE = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
# Likewise for a detection's box (a closed polyline of 5 points) and for a detection given as a point.
OHIF_RECTANGLE = "Cornerstone3DTools@^0.1.0:RectangleROI"
OHIF_POINT = "Cornerstone3DTools@^0.1.0:Probe"

class ReportHeader(TypedDict):
    """What every report of the node says about itself and where it is filed: the keyword arguments every
    `build_*_sr` takes."""

    series_number: int
    series_instance_uid: str
    sop_instance_uid: str
    manufacturer: str
    software_version: str
    device_name: str
    model_name: str


# CID 100 Quantitative Diagnostic Imaging Procedures.
_PROCEDURE = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}


def build_sr(
    volume: Volume,
    segmentation: Segmentation,
    seg_dataset: Dataset | None,
    **header: Unpack[ReportHeader],
) -> hd.sr.Comprehensive3DSR:
    """A measurement report about each segment: its numbers, and where it is, drawn on its source image.

    Per segment, two measurement groups with the segment's Tracking UID (the one the SEG gives it), so readers
    that track findings (OHIF merges groups by it) show them as one finding:
    - its outline on its largest cross-section (`contours.largest_cross_section`): a Measurement group
      (TID 1501) with the area enclosed, inferred from that closed polyline (SCOORD) on the source image.
      It comes first and is named `OHIF_FREEHAND_OUTLINE`: OHIF draws it with the numbers of both groups,
      lists it in its measurement panel under the finding type, and jumps to its slice;
    - its volume (mL) and, for CT and MR, the mean and standard deviation (population, ddof=0) of the source
      intensity inside it: a Volumetric ROI group (TID 1411) referencing its SEG segment, or, for a segment
      left out of the SEG (`Segment.in_seg`, or no SEG: `seg_dataset` None), a Measurement group (TID 1501).
    An empty segment has its volume (0 mL) and no outline; when every segment a SEG would hold is empty, the
    report says that each of them is absent (`_absent`).
    The observer is this node running `model_name`, a DEVICE.  The report is complete but PRELIMINARY and
    UNVERIFIED: nobody has reviewed it.

    Referencing a LABELMAP SEG works (dcmqi reads it), but dciodvfy (2026-09 snapshot)
    flags its Referenced Segment Number: its rule knows only the Segmentation and
    Surface Segmentation SOP classes, not Label Map Segmentation.
    """
    if segmentation.masks.shape[1:] != volume.pixels.shape:
        raise ValueError(
            f"masks of shape {segmentation.masks.shape[1:]} are not on the volume's grid {volume.pixels.shape}"
        )
    algorithm = hd.sr.AlgorithmIdentification(
        name=segmentation.algorithm_name, version=segmentation.algorithm_version
    )
    seg_numbers = seg_segment_numbers(segmentation) if seg_dataset is not None else {}
    groups: list[hd.sr.ContentSequence] = []
    for segment, mask in zip(segmentation.segments, segmentation.masks):
        tracking_uid = segment_tracking_uid(seg_dataset.SOPInstanceUID if seg_dataset is not None
                                            else header["sop_instance_uid"], segment.number)
        about = {
            "finding_category": coded_concept(segment.category),
            "finding_type": coded_concept(segment.type),
            "algorithm_id": algorithm,
        }
        section = largest_cross_section(mask)
        if section is not None:
            groups.append(_outline_group(volume, section, tracking_uid, about))
        about["tracking_identifier"] = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=segment.label)
        measurements = _volume_and_intensity(volume, mask)
        if segment.number in seg_numbers:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg_dataset.SOPClassUID,
                        sop_instance_uid=seg_dataset.SOPInstanceUID,
                        segment_number=seg_numbers[segment.number],
                        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                    ),
                    measurements=measurements,
                    **about,
                )
            )
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(measurements=measurements, **about))
    drawn = [(segment, mask) for segment, mask in zip(segmentation.segments, segmentation.masks) if segment.in_seg]
    if not any(mask.any() for _, mask in drawn):
        groups += [_absent(segment.type, segment.category, algorithm, header["sop_instance_uid"], segment.label)
                   for segment, _ in drawn]
    evidence = [] if seg_dataset is None else [seg_dataset]
    return _report(volume, groups, evidence, f"{segmentation.algorithm_name} measurements", header)


def build_detection_sr(
    volume: Volume,
    detections: Detections,
    **header: Unpack[ReportHeader],
) -> hd.sr.Comprehensive3DSR:
    """A measurement report with one group (TID 1501) per finding: its type, and the model's certainty (DCM
    111012 "Certainty of Finding", in percent, as CAD reports give it) inferred from where it is on the source
    image nearest its centre: its box (a closed POLYLINE) or its centre (a POINT).  Named `OHIF_RECTANGLE` or
    `OHIF_POINT`, OHIF lists each finding in its measurement panel and jumps to it.  No finding: the report says
    the target (e.g. "Nodule") is absent.
    """
    algorithm = hd.sr.AlgorithmIdentification(name=detections.algorithm_name, version=detections.algorithm_version)
    groups: list[hd.sr.ContentSequence] = [
        _detection_group(volume, detection, number, detections, algorithm, header["sop_instance_uid"])
        for number, detection in enumerate(detections.findings, start=1)
    ]
    if not detections.findings:
        groups.append(
            _absent(detections.target, detections.category, algorithm, header["sop_instance_uid"], "detections")
        )
    return _report(volume, groups, [], f"{detections.algorithm_name} findings", header)


def build_classification_sr(
    volume: Volume,
    classification: Classification,
    **header: Unpack[ReportHeader],
) -> hd.sr.Comprehensive3DSR:
    """A measurement report with the model's answer about the series: a group (TID 1501) whose qualitative
    evaluation is the question and its most probable answer (e.g. "Contrast agent: Present"), with that answer's
    probability (DCM 122157 "Probability", 0..1) as its measurement."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=classification.algorithm_name, version=classification.algorithm_version
    )
    answer = classification.answer
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=name_uid("classification", header["sop_instance_uid"]), identifier=classification.name.meaning[:64]
        ),
        finding_type=coded_concept(classification.name),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(coded_concept(classification.name), coded_concept(answer.value))
        ],
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=answer.probability,
                                        unit=codes.UCUM.NoUnits)],
    )
    return _report(volume, [group], [], f"{classification.algorithm_name} classification", header)


def _report(
    volume: Volume,
    groups: list[hd.sr.ContentSequence],
    evidence: list[Dataset],
    description: str,
    header: ReportHeader,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR around `groups`: this node running the model is the observing DEVICE; the report is
    complete but PRELIMINARY and UNVERIFIED (nobody has reviewed it); the source images (and `evidence`, e.g. the
    SEG) are its evidence."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=name_uid("device-observer", header["manufacturer"], header["device_name"], header["model_name"]),
        name=header["device_name"],
        manufacturer_name=header["manufacturer"],
        model_name=header["model_name"],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=_PROCEDURE.get(volume.modality, codes.cid100.ImagingProcedure),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[with_patient_and_study(volume.sources[0]), *volume.sources[1:], *evidence],
        content=report,
        series_instance_uid=header["series_instance_uid"],
        series_number=header["series_number"],
        sop_instance_uid=header["sop_instance_uid"],
        instance_number=1,
        manufacturer=header["manufacturer"],
        manufacturer_model_name=header["model_name"],
        software_versions=header["software_version"],
        series_description=description[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def _absent(
    target: CodedConcept,
    category: CodedConcept,
    algorithm: hd.sr.AlgorithmIdentification,
    report_uid: str,
    what: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """"No findings", said: a group (TID 1501) about what the model looks for, evaluated as absent (SCT 272519000),
    so a reader sees "Nodule: Absent" rather than an empty report they cannot tell from a failed one."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=name_uid("absent", report_uid, what), identifier=f"No {target.meaning}"[:64]
        ),
        finding_category=coded_concept(category),
        finding_type=coded_concept(target),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(coded_concept(target), _ABSENT)],
    )


def _detection_group(
    volume: Volume,
    detection: Detection,
    number: int,
    detections: Detections,
    algorithm: hd.sr.AlgorithmIdentification,
    report_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one finding; its location drawn on the source image of the slice nearest its centre."""
    k, graphic_type, graphic = detection_region(volume, detection)
    source = _source_image(volume, k)
    identifier = OHIF_POINT if graphic_type == "POINT" else OHIF_RECTANGLE
    certainty = hd.sr.Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=round(detection.score * 100.0, 3),
        unit=_PERCENT,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(hd.sr.GraphicTypeValues(graphic_type), graphic, source)
        ],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=name_uid("detection", report_uid, str(number)), identifier=identifier
        ),
        finding_category=coded_concept(detections.category),
        finding_type=coded_concept(detection.type),
        algorithm_id=algorithm,
        measurements=[certainty],
    )


def _volume_and_intensity(volume: Volume, mask: np.ndarray) -> list[hd.sr.Measurement]:
    """The segment's volume (mL) and, for a modality whose pixel values measure something, their mean and SD."""
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=np.count_nonzero(mask) * volume.voxel_volume_ml,
                                      unit=_MILLILITRE)]
    intensity = _INTENSITY.get(volume.modality)
    if intensity is not None and mask.any():
        values = volume.pixels[mask]
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        name, unit = intensity
        measurements += [
            hd.sr.Measurement(name=name, value=mean, unit=unit, derivation=codes.SCT.Mean),
            hd.sr.Measurement(name=name, value=std, unit=unit, derivation=codes.SCT.StandardDeviation),
        ]
    return measurements


def _outline_group(
    volume: Volume, section: CrossSection, tracking_uid: str, about: dict
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the area enclosed by the outline on the source image of slice `section.slice_index`, inferred
    from that outline (TID 300 row "Source of Measurement", TID 320 SCOORD).

    Not a Planar ROI group (TID 1410), whose region sits beside its measurements: OHIF draws such a region but
    cannot list it, as it reads the coordinates of a listed measurement from under its first numeric item.
    """
    source = _source_image(volume, section.slice_index)
    column_mm, row_mm, _ = volume.spacing
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=section.pixels * column_mm * row_mm,  # the outline encloses exactly these pixels
        unit=_SQUARE_MILLIMETRE,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE, section.outline, source)
        ],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=OHIF_FREEHAND_OUTLINE),
        measurements=[area],
        **about,
    )


def _source_image(volume: Volume, slice_index: int) -> hd.sr.SourceImageForRegion:
    """The image (and frame, of a multi-frame image) that slice `slice_index` of the volume came from."""
    frame = volume.frames[slice_index]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=None if frame.frame_number is None else [frame.frame_number],
    )
