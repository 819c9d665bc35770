"""Segmentation -> TID 1500 Measurement Report (Comprehensive 3D SR) about the SEG's segments."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..inference.segmentation import Segmentation
from ..inference.volume import Volume
from .seg import coded_concept, segment_tracking_uid, with_patient_and_study
from .uids import name_uid

_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")

# What the rescaled pixel values measure, per modality, as dcmqi and 3D Slicer's
# Quantitative Reporting encode it: (concept name, unit).  A modality not listed
# gets no intensity statistics rather than a guessed quantity or unit.
_INTENSITY: dict[str, tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]] = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}

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
    """A measurement report with one volumetric group per segment of `seg_dataset`.

    Each group references its SEG segment and carries the segment's volume (mL) and,
    for CT and MR, the mean and standard deviation (population, ddof=0) of the source
    intensity inside it.  The observer is this node running `model_name`, a DEVICE.
    The report is complete but PRELIMINARY and UNVERIFIED: nobody has reviewed it.

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
    voxel_ml = volume.voxel_volume_ml
    intensity = _INTENSITY.get(volume.modality)
    groups = []
    for segment, mask in zip(segmentation.segments, segmentation.masks):
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=int(mask.sum()) * voxel_ml, unit=_MILLILITRE)]
        if intensity is not None and mask.any():
            values = volume.pixels[mask]
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            name, unit = intensity
            measurements += [
                hd.sr.Measurement(name=name, value=mean, unit=unit, derivation=codes.SCT.Mean),
                hd.sr.Measurement(name=name, value=std, unit=unit, derivation=codes.SCT.StandardDeviation),
            ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment_tracking_uid(seg_dataset.SOPInstanceUID, segment.number),
                    identifier=segment.label,
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg_dataset.SOPClassUID,
                    sop_instance_uid=seg_dataset.SOPInstanceUID,
                    segment_number=segment.number,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                ),
                finding_category=coded_concept(segment.category),
                finding_type=coded_concept(segment.type),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
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

