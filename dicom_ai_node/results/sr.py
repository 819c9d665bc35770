"""Segmentation -> TID 1500 Measurement Report (Comprehensive 3D SR) about the SEG's segments."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..inference.segmentation import Segmentation
from ..inference.volume import Volume
from .contours import CrossSection, largest_cross_section, polygon_area
from .seg import coded_concept, seg_segment_numbers, segment_tracking_uid, with_patient_and_study
from .uids import name_uid

_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_SQUARE_MILLIMETRE = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")

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
    seg_dataset: Dataset,
    *,
    series_number: int,
    series_instance_uid: str,
    sop_instance_uid: str,
    manufacturer: str,
    software_version: str,
    device_name: str,
    model_name: str,
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
      left out of the SEG (`Segment.in_seg`), a Measurement group (TID 1501).
    An empty segment has its volume (0 mL) and no outline.
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
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=name_uid("device-observer", manufacturer, device_name, model_name),
        name=device_name,
        manufacturer_name=manufacturer,
        model_name=model_name,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=segmentation.algorithm_name, version=segmentation.algorithm_version
    )
    seg_numbers = seg_segment_numbers(segmentation)
    groups: list[hd.sr.ContentSequence] = []
    for segment, mask in zip(segmentation.segments, segmentation.masks):
        tracking_uid = segment_tracking_uid(seg_dataset.SOPInstanceUID, segment.number)
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
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=_PROCEDURE.get(volume.modality, codes.cid100.ImagingProcedure),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[with_patient_and_study(volume.sources[0]), *volume.sources[1:], seg_dataset],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        series_description=f"{segmentation.algorithm_name} measurements"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )



def _volume_and_intensity(volume: Volume, mask: np.ndarray) -> list[hd.sr.Measurement]:
    """The segment's volume (mL) and, for a modality whose pixel values measure something, their mean and SD."""
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=int(mask.sum()) * volume.voxel_volume_ml,
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
    frame = volume.frames[section.slice_index]
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=None if frame.frame_number is None else [frame.frame_number],
    )
    column_mm, row_mm, _ = volume.spacing
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=polygon_area(section.outline) * column_mm * row_mm,
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
