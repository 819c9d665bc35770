"""Results for viewers without SEG: the presentation state (GSPS) and the secondary captures (SC), checked against
the masks and boxes they draw, and by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_findings import NODULES, ct
from test_results import _lab_from_dicom, dciodvfy, phantom_volume

from dicom_ai_node.inference.builtin import BuiltinCTModel
from dicom_ai_node.inference.builtin_findings import BuiltinLungNoduleModel
from dicom_ai_node.phantoms.ct import CTPhantom, oblique_orientation
from dicom_ai_node.results.contours import polygon_area
from dicom_ai_node.results.gsps import build_gsps
from dicom_ai_node.results.marks import detections_drawing, segmentation_drawing
from dicom_ai_node.results.sc import BANNER, build_secondary_captures

COMMON = {"manufacturer": "dicom-ai-node", "software_version": "0.1.0"}


@pytest.fixture(scope="module")
def case():
    volume = phantom_volume(ct(nodules=NODULES))
    return volume, BuiltinCTModel("cpu").predict(volume), BuiltinLungNoduleModel("cpu").predict(volume)


def _gsps(volume, drawing, path: Path) -> pydicom.Dataset:
    gsps = build_gsps(volume, drawing, series_number=9003, series_instance_uid="1.2.3.7",
                      sop_instance_uid="1.2.3.8", device_serial_number="AI_NODE", model_name="builtin-ct-tissue 1.1",
                      **COMMON)
    gsps.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []
    return pydicom.dcmread(path)


def test_gsps_outlines_every_region_of_each_seg_segment_on_its_image_in_its_colour(case, tmp_path):
    volume, segmentation, _ = case
    gsps = _gsps(volume, segmentation_drawing(segmentation, volume), tmp_path / "gsps.dcm")
    assert gsps.Modality == "PR" and gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    drawn = [(segment, mask) for segment, mask in zip(segmentation.segments, segmentation.masks) if segment.in_seg]
    layers = {layer.GraphicLayer: layer for layer in gsps.GraphicLayerSequence}
    assert len(layers) == len(drawn) == 2  # lungs, bone; the body is not drawn
    slice_of = {frame.sop_instance_uid: k for k, frame in enumerate(volume.frames)}
    for (segment, mask), layer_name in zip(drawn, sorted(layers, key=lambda name: layers[name].GraphicLayerOrder)):
        lab = _lab_from_dicom(layers[layer_name].GraphicLayerRecommendedDisplayCIELabValue)
        rgb = hd.color.CIELabColor(*lab).to_rgb()
        assert np.abs(np.array(rgb) - segment.color_rgb).max() <= 1
        annotations = [a for a in gsps.GraphicAnnotationSequence if a.GraphicLayer == layer_name]
        slices = {slice_of[a.ReferencedImageSequence[0].ReferencedSOPInstanceUID] for a in annotations}
        assert slices == set(np.flatnonzero(mask.any(axis=(1, 2))))
        for annotation in annotations:
            k = slice_of[annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID]
            area = sum(polygon_area(np.array(g.GraphicData, float).reshape(-1, 2))
                       for g in annotation.GraphicObjectSequence)
            assert all(g.GraphicAnnotationUnits == "PIXEL" and g.GraphicType == "POLYLINE"
                       for g in annotation.GraphicObjectSequence)
            assert area >= mask[k].sum() - 3 * len(annotation.GraphicObjectSequence)  # specks < 4 pixels left out
    assert float(gsps.SoftcopyVOILUTSequence[0].WindowWidth) == 400.0
    referenced = {item.ReferencedSOPInstanceUID for series in gsps.ReferencedSeriesSequence
                  for item in series.ReferencedImageSequence}
    assert referenced == set(slice_of)


def test_gsps_marks_each_finding_with_its_box_and_label(case, tmp_path):
    volume, _, detections = case
    gsps = _gsps(volume, detections_drawing(detections, volume), tmp_path / "gsps-nodules.dcm")
    (layer,) = gsps.GraphicLayerSequence
    assert layer.GraphicLayerDescription == f"Nodule: {len(NODULES)} found"
    annotations = gsps.GraphicAnnotationSequence
    texts = sorted(text.UnformattedTextValue for a in annotations for text in a.TextObjectSequence)
    assert texts == sorted(f"{d.label} {d.score:.0%}" for d in detections.findings)
    slice_of = {frame.sop_instance_uid: k for k, frame in enumerate(volume.frames)}
    for detection in detections.findings:
        k, j, i = volume.index_of(detection.centre_lps)
        boxes = [np.array(g.GraphicData, float).reshape(-1, 2) for a in annotations for g in a.GraphicObjectSequence
                 if slice_of[a.ReferencedImageSequence[0].ReferencedSOPInstanceUID] == k]
        assert any(box[:, 0].min() <= i + 0.5 <= box[:, 0].max() and box[:, 1].min() <= j + 0.5 <= box[:, 1].max()
                   for box in boxes), f"no box around {detection.label} on slice {k}"


def test_secondary_captures_burn_the_outlines_into_the_key_slices(case, tmp_path):
    volume, segmentation, detections = case
    for name, drawing in (("tissue", segmentation_drawing(segmentation, volume)),
                          ("nodules", detections_drawing(detections, volume))):
        images = build_secondary_captures(volume, drawing, series_number=9004, series_instance_uid="1.2.3.9",
                                          model_name="builtin 1.1", **COMMON)
        assert len(images) == len(set(drawing.key_slices))
        for number, image in enumerate(images, start=1):
            path = tmp_path / f"{name}-{number}.dcm"
            image.save_as(path, enforce_file_format=True)
            assert dciodvfy(path) == []
            read = pydicom.dcmread(path)
            assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and read.BurnedInAnnotation == "YES"
            assert read.ImageComments == BANNER and "not for diagnostic use" in read.SeriesDescription
            (source,) = read.SourceImageSequence
            k = [f.sop_instance_uid for f in volume.frames].index(source.ReferencedSOPInstanceUID)
            assert k in drawing.key_slices and read.InstanceNumber == number
            pixels = read.pixel_array
            scale = pixels.shape[1] // volume.shape[2]
            assert pixels.shape == (volume.shape[1] * scale, volume.shape[2] * scale, 3)
            for mark in (m for m in drawing.marks if m.slice_index == k):
                colour = drawing.layers[mark.layer].colour
                column, row = (mark.polyline[0] * scale).astype(int)
                patch = pixels[max(row - 1, 0):row + 2, max(column - 1, 0):column + 2].reshape(-1, 3)
                assert any(tuple(p) == colour for p in patch), f"{name}: no {colour} line at {column, row}"
            banner = pixels[-10:]
            assert (np.all(banner == (255, 255, 0), axis=-1)).sum() > 50  # the banner's yellow text



def test_secondary_captures_say_the_patient_orientation_of_an_oblique_slice(tmp_path):
    """Patient Orientation of a slice tilted 30 degrees towards the feet: the rows run left and down ("LF"), so a
    reader of the key image knows it is oblique."""
    volume = phantom_volume(CTPhantom(slices=20, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=10.0,
                                      orientation=oblique_orientation(30.0)))
    segmentation = BuiltinCTModel("cpu").predict(volume)
    (image, *_) = build_secondary_captures(volume, segmentation_drawing(segmentation, volume, True),
                                           series_number=9004, series_instance_uid="1.2.3.9",
                                           model_name="builtin 1.1", **COMMON)
    assert list(image.PatientOrientation) == ["LF", "P"]
    image.save_as(tmp_path / "oblique.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "oblique.dcm") == []
