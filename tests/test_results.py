"""SEG and SR result objects: validated by dciodvfy, read back by dcmqi, checked voxel for voxel."""

from __future__ import annotations

import gzip
import json
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import venv_tool
from pydicom.uid import UID

from dicom_ai_node.inference.segmentation import CodedConcept, Segment, Segmentation
from dicom_ai_node.inference.volume import SourceFrame, Volume
from dicom_ai_node.phantoms.ct import HU_BONE, CTPhantom
from dicom_ai_node.results.contours import largest_region
from dicom_ai_node.results.seg import build_seg, segment_tracking_uid
from dicom_ai_node.results.sr import OHIF_FREEHAND_OUTLINE, build_sr
from dicom_ai_node.results.uids import derive_uid

MODEL = "PhantomThreshold"
MODEL_VERSION = "1.0"
ANATOMY = CodedConcept("91723000", "SCT", "Anatomical structure")
BODY = Segment(1, "Body", ANATOMY, CodedConcept("38266002", "SCT", "Entire body"), (177, 122, 101))
LUNGS = Segment(2, "Lungs", ANATOMY, CodedConcept("39607008", "SCT", "Lung"), (197, 165, 145))
BONE = Segment(3, "Bone", ANATOMY, CodedConcept("272673000", "SCT", "Bone"), (241, 214, 145))


def phantom_volume(phantom: CTPhantom) -> Volume:
    """The phantom as load_volume() would return it: slices ascending along the normal."""
    datasets = list(phantom.datasets())
    pixels = np.stack([phantom.slice_hu(k) for k in range(phantom.slices)]).astype(np.float32)
    first, last = datasets[0], datasets[-1]
    row_cosines = np.array(first.ImageOrientationPatient[:3], dtype=float)
    column_cosines = np.array(first.ImageOrientationPatient[3:], dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.array(first.ImagePositionPatient, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = row_cosines * column_spacing
    affine[:3, 1] = column_cosines * row_spacing
    affine[:3, 2] = (np.array(last.ImagePositionPatient, dtype=float) - origin) / (len(datasets) - 1)
    affine[:3, 3] = origin
    for ds in datasets:
        del ds.PixelData
    return Volume(
        pixels=pixels,
        affine=affine,
        frames=[SourceFrame(ds.SOPClassUID, ds.SOPInstanceUID, None) for ds in datasets],
        sources=datasets,
        frame_of_reference_uid=first.FrameOfReferenceUID,
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        modality=first.Modality,
    )


def threshold_masks(pixels: np.ndarray) -> np.ndarray:
    """Body (outline filled row by row, so it contains the lungs), lungs, bone."""
    above = pixels > -500
    body = np.maximum.accumulate(above, axis=-1) & np.maximum.accumulate(above[..., ::-1], axis=-1)[..., ::-1]
    return np.stack([body, (pixels < -500) & body, pixels > 300])


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as (slices, rows, columns) and the LPS affine of a 3-D NRRD as dcmqi writes it."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    fields = dict(line.split(": ", 1) for line in raw[:end].decode().splitlines()[1:] if not line.startswith("#"))
    assert fields["space"] == "left-posterior-superior" and fields["dimension"] == "3"
    dtype = {"unsigned char": "u1", "short": "i2", "unsigned short": "u2"}[fields["type"]]
    byte_order = ">" if fields.get("endian") == "big" else "<"
    data = raw[end + 2 :]
    if fields["encoding"] == "gzip":
        data = gzip.decompress(data)
    else:
        assert fields["encoding"] == "raw"
    sizes = [int(v) for v in fields["sizes"].split()]
    voxels = np.frombuffer(data, byte_order + dtype).reshape(sizes[::-1])  # NRRD's first axis varies fastest
    affine = np.eye(4)
    directions = fields["space directions"].replace("(", "").split(")")[:3]
    affine[:3, :3] = np.array([[float(v) for v in d.split(",")] for d in directions]).T
    affine[:3, 3] = [float(v) for v in fields["space origin"].strip("()").split(",")]
    return voxels, affine


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report; its warnings are printed (pytest -s shows them), errors returned."""
    result = subprocess.run([venv_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


@dataclass
class Results:
    volume: Volume
    segmentation: Segmentation
    folder: Path
    seg: Path
    sr: Path
    labelmap: Path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Results:
    # 10 mm slices over 200 mm: the lungs (z within +-80 mm) are absent from the end slices.
    phantom = CTPhantom(slices=20, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=10.0)
    volume = phantom_volume(phantom)
    masks = threshold_masks(volume.pixels)
    segmentation = Segmentation(masks, [BODY, LUNGS, BONE], MODEL, MODEL_VERSION)
    sources = [frame.sop_instance_uid for frame in volume.frames]
    folder = tmp_path_factory.mktemp("results")

    seg = build_seg(
        volume,
        segmentation,
        series_number=901,
        series_instance_uid=derive_uid("seg-series", MODEL, MODEL_VERSION, sources),
        sop_instance_uid=derive_uid("seg-instance", MODEL, MODEL_VERSION, sources),
        manufacturer="dicom-ai-node",
        software_version="0.1.0",
    )
    seg.save_as(folder / "seg.dcm")
    sr = build_sr(
        volume,
        segmentation,
        seg,
        series_number=902,
        series_instance_uid=derive_uid("sr-series", MODEL, MODEL_VERSION, sources),
        sop_instance_uid=derive_uid("sr-instance", MODEL, MODEL_VERSION, sources),
        manufacturer="dicom-ai-node",
        software_version="0.1.0",
        device_name="AI_NODE",
        model_name=MODEL,
    )
    sr.save_as(folder / "sr.dcm")
    # Lungs and bone do not overlap, so they fit a label map.
    labelmap = build_seg(
        volume,
        Segmentation(masks[1:], [replace(LUNGS, number=1), replace(BONE, number=2)], MODEL, MODEL_VERSION),
        series_number=903,
        series_instance_uid=derive_uid("seg-series", MODEL, MODEL_VERSION, sources, extra="labelmap"),
        sop_instance_uid=derive_uid("seg-instance", MODEL, MODEL_VERSION, sources, extra="labelmap"),
        manufacturer="dicom-ai-node",
        software_version="0.1.0",
        labelmap=True,
    )
    labelmap.save_as(folder / "labelmap.dcm")
    return Results(volume, segmentation, folder, folder / "seg.dcm", folder / "sr.dcm", folder / "labelmap.dcm")


# --- UIDs ---------------------------------------------------------------------------------------


def test_derived_uids_are_deterministic_and_valid():
    sources = [f"1.2.826.0.1.3680043.10.1447.9.{n}" for n in range(50)]
    uid = derive_uid("seg-instance", MODEL, MODEL_VERSION, sources)
    assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25.")
    assert derive_uid("seg-instance", MODEL, MODEL_VERSION, reversed(sources)) == uid
    assert derive_uid("seg-instance", MODEL, MODEL_VERSION, iter(sources + sources[:3])) == uid
    others = {
        derive_uid("seg-instance", MODEL, "1.1", sources),
        derive_uid("seg-instance", MODEL, MODEL_VERSION, sources[:-1]),
        derive_uid("seg-instance", MODEL, MODEL_VERSION, [*sources, "1.2.3"]),
        derive_uid("seg-instance", "OtherModel", MODEL_VERSION, sources),
        derive_uid("seg-series", MODEL, MODEL_VERSION, sources),
        derive_uid("seg-instance", MODEL, MODEL_VERSION, sources, extra="labelmap"),
    }
    assert len(others) == 6 and uid not in others
    with pytest.raises(ValueError):
        derive_uid("seg-instance", MODEL, MODEL_VERSION, [])


# --- SEG ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seg", "labelmap", "sr"])
def test_dciodvfy_reports_no_errors(results: Results, name: str):
    assert dciodvfy(getattr(results, name)) == []


def test_seg_header_describes_study_series_and_segments(results: Results):
    seg = pydicom.dcmread(results.seg)
    source = results.volume.sources[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "FrameOfReferenceUID"):
        assert seg[keyword].value == source[keyword].value
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.Modality == "SEG"
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {frame.sop_instance_uid for frame in results.volume.frames}
    for item, segment in zip(seg.SegmentSequence, results.segmentation.segments, strict=True):
        assert (item.SegmentNumber, item.SegmentLabel, item.SegmentAlgorithmType) == (
            segment.number,
            segment.label,
            "AUTOMATIC",
        )
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment.type.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == segment.category.value
        rgb = hd.color.CIELabColor(*_lab_from_dicom(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.array(rgb) - segment.color_rgb).max() <= 1
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL, MODEL_VERSION)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert item.TrackingUID == segment_tracking_uid(seg.SOPInstanceUID, segment.number)


def _lab_from_dicom(value) -> tuple[float, float, float]:
    """PS3.3 C.10.7.1.1 scaled CIELab (0..65535) back to L*, a*, b*."""
    lightness, a, b = (int(v) for v in value)
    return lightness * 100.0 / 65535.0, a * 255.0 / 65535.0 - 128.0, b * 255.0 / 65535.0 - 128.0


def test_seg_frames_reference_their_source_slice_and_empty_frames_are_omitted(results: Results):
    seg = pydicom.dcmread(results.seg)
    volume, masks = results.volume, results.segmentation.masks
    slice_of = {frame.sop_instance_uid: k for k, frame in enumerate(volume.frames)}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    stored = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        k = slice_of[source.ReferencedSOPInstanceUID]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, volume.affine[:3, :] @ [0, 0, k, 1])
        assert np.array_equal(frame.astype(bool), masks[number - 1, k])
        stored.add((number, k))
    non_empty = {(n + 1, k) for n, k in zip(*np.nonzero(masks.any(axis=(2, 3))))}
    assert stored == non_empty
    assert len(stored) < masks.shape[0] * masks.shape[1]  # the lung-free end slices were omitted


def test_dcmqi_reads_seg_back_voxel_identical(results: Results):
    out = results.folder / "dcmqi-seg"
    out.mkdir()
    run = subprocess.run(
        [venv_tool("segimage2itkimage"), "--inputDICOM", str(results.seg), "--outputDirectory", str(out),
         "--outputType", "nrrd"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    groups = json.loads((out / "meta.json").read_text())["segmentAttributes"]
    assert len(groups) == 3  # overlapping segments: dcmqi writes one file per segment
    for index, group in enumerate(groups, start=1):
        voxels, affine = read_nrrd(out / f"{index}.nrrd")
        assert np.allclose(affine, results.volume.affine)
        (attributes,) = group
        number = attributes["labelID"]
        assert attributes["SegmentLabel"] == results.segmentation.segments[number - 1].label
        assert np.array_equal(voxels == number, results.segmentation.masks[number - 1])
        assert set(np.unique(voxels)) <= {0, number}


def test_labelmap_seg_is_read_back_voxel_identical(results: Results):
    seg = pydicom.dcmread(results.labelmap)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and seg.SegmentationType == "LABELMAP"
    out = results.folder / "dcmqi-labelmap"
    out.mkdir()
    run = subprocess.run(
        [venv_tool("segimage2itkimage"), "--inputDICOM", str(results.labelmap), "--outputDirectory", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    voxels, affine = read_nrrd(out / "1.nrrd")
    assert np.allclose(affine, results.volume.affine)
    masks = results.segmentation.masks
    assert np.array_equal(voxels == 1, masks[1]) and np.array_equal(voxels == 2, masks[2])
    assert not (voxels > 2).any()


def test_labelmap_rejects_overlapping_segments(results: Results):
    with pytest.raises(ValueError, match=r"segment 'Lungs' overlaps \['Body'\]"):
        build_seg(
            results.volume,
            results.segmentation,
            series_number=1,
            series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4",
            manufacturer="dicom-ai-node",
            software_version="0.1.0",
            labelmap=True,
        )


def test_seg_from_a_multiframe_source_maps_slices_to_its_frames(tmp_path: Path):
    phantom = CTPhantom(slices=12, rows=32, columns=32, pixel_spacing=(10.0, 10.0), slice_spacing=15.0)
    singles = list(phantom.datasets())
    position_of = {ds.SOPInstanceUID: k for k, ds in enumerate(singles)}
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles, series_instance_uid=pydicom.uid.generate_uid(), series_number=5,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
    )  # fmt: skip
    frame_of_slice = {}
    for number, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence, start=1):
        uid = item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
        frame_of_slice[position_of[uid]] = number
    assert [frame_of_slice[k] for k in range(12)] != list(range(1, 13))  # the converter reorders frames
    header = phantom_volume(phantom)
    del enhanced.PixelData
    volume = Volume(
        pixels=header.pixels,
        affine=header.affine,
        frames=[SourceFrame(enhanced.SOPClassUID, enhanced.SOPInstanceUID, frame_of_slice[k]) for k in range(12)],
        sources=[enhanced],
        frame_of_reference_uid=enhanced.FrameOfReferenceUID,
        study_instance_uid=enhanced.StudyInstanceUID,
        series_instance_uid=enhanced.SeriesInstanceUID,
        modality="CT",
    )
    masks = threshold_masks(volume.pixels)
    seg = build_seg(
        volume, Segmentation(masks, [BODY, LUNGS, BONE], MODEL, MODEL_VERSION), series_number=1,
        series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4", manufacturer="dicom-ai-node", software_version="0.1.0",
    )  # fmt: skip
    seg.save_as(tmp_path / "seg.dcm")
    assert dciodvfy(tmp_path / "seg.dcm") == []
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    slice_of_frame = {number: k for k, number in frame_of_slice.items()}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        k = slice_of_frame[int(source.ReferencedFrameNumber)]
        assert np.array_equal(frame.astype(bool), masks[number - 1, k])


def test_sources_missing_type2_patient_and_study_attributes_still_give_valid_results(tmp_path: Path):
    volume = phantom_volume(CTPhantom(slices=4, rows=32, columns=32, pixel_spacing=(10.0, 10.0), slice_spacing=10.0))
    for source in volume.sources:
        del source.PatientBirthDate, source.PatientSex, source.StudyID, source.ReferringPhysicianName
    segmentation = Segmentation(threshold_masks(volume.pixels), [BODY, LUNGS, BONE], MODEL, MODEL_VERSION)
    common = {"manufacturer": "dicom-ai-node", "software_version": "0.1.0"}
    seg = build_seg(
        volume, segmentation, series_number=1, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4", **common
    )
    sr = build_sr(
        volume, segmentation, seg, series_number=2, series_instance_uid="1.2.3.5", sop_instance_uid="1.2.3.6",
        device_name="AI_NODE", model_name=MODEL, **common,
    )  # fmt: skip
    assert "PatientBirthDate" not in volume.sources[0]  # the caller's headers are left alone
    for name, dataset in (("seg.dcm", seg), ("sr.dcm", sr)):
        assert dataset.PatientBirthDate is None and dataset.PatientSex is None
        dataset.save_as(tmp_path / name)
        assert dciodvfy(tmp_path / name) == []


# --- SR -----------------------------------------------------------------------------------------


_CONCEPTS = {"Volume": ("118565006", "SCT", "Volume"), "HU": ("112031", "DCM", "Attenuation Coefficient")}


def _groups(path: Path) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    return sr.content.get_volumetric_roi_measurement_groups()


def _value(group, name: str, derivation: str | None = None) -> float:
    (measurement,) = [
        m
        for m in group.get_measurements(name=hd.sr.CodedConcept(*_CONCEPTS[name]))
        if (m.derivation.meaning if m.derivation else None) == derivation
    ]
    return float(measurement.value)


def test_sr_volumes_and_intensities(results: Results):
    voxel_ml = 5.0 * 5.0 * 10.0 / 1000.0
    masks, pixels = results.segmentation.masks, results.volume.pixels
    groups = _groups(results.sr)
    assert len(groups) == 3
    for group, segment, mask in zip(groups, results.segmentation.segments, masks, strict=True):
        assert _value(group, "Volume") == pytest.approx(mask.sum() * voxel_ml, rel=1e-12)
        assert _value(group, "HU", "Mean") == pytest.approx(pixels[mask].mean(), abs=1e-6)
        assert _value(group, "HU", "Standard Deviation") == pytest.approx(pixels[mask].std(), abs=1e-6)
        assert group.finding_type.value == segment.type.value
    bone = groups[2]
    assert _value(bone, "HU", "Mean") == pytest.approx(HU_BONE, abs=1.0)


def test_sr_references_the_seg_segments_and_names_the_device(results: Results):
    seg = pydicom.dcmread(results.seg)
    sr = pydicom.dcmread(results.sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.Modality == "SR"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    for group, segment in zip(_groups(results.sr), results.segmentation.segments, strict=True):
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        assert reference.referenced_segment_numbers == [segment.number]
        assert group.tracking_uid == seg.SegmentSequence[segment.number - 1].TrackingUID
    evidence = {item.ReferencedSOPInstanceUID for item in _evidence(sr)}
    assert evidence == {seg.SOPInstanceUID} | {f.sop_instance_uid for f in results.volume.frames}
    dump = str(sr)
    assert "AI_NODE" in dump and MODEL in dump and "Device" in dump


def _evidence(sr: pydicom.Dataset):
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            yield from series.ReferencedSOPSequence


def test_dcmqi_tid1500reader_reads_the_sr(results: Results):
    out = results.folder / "sr.json"
    run = subprocess.run(
        [venv_tool("tid1500reader"), "--inputDICOM", str(results.sr), "--outputMetadata", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    voxel_ml = 5.0 * 5.0 * 10.0 / 1000.0
    volumetric = [group for group in report["Measurements"] if "ReferencedSegment" in group]
    outlines = [group for group in report["Measurements"] if group["TrackingIdentifier"] == OHIF_FREEHAND_OUTLINE]
    assert len(volumetric) == len(outlines) == 3 and len(report["Measurements"]) == 6
    for group in outlines:
        (area,) = group["measurementItems"]
        assert area["quantity"]["CodeMeaning"] == "Area" and area["units"]["CodeValue"] == "mm2"
    for group, segment, mask in zip(volumetric, results.segmentation.segments, results.segmentation.masks,
                                    strict=True):
        assert group["ReferencedSegment"] == segment.number
        assert group["TrackingIdentifier"] == segment.label
        (volume,) = [item for item in group["measurementItems"] if item["quantity"]["CodeValue"] == "118565006"]
        assert volume["units"]["CodeValue"] == "ml"
        assert float(volume["value"]) == pytest.approx(mask.sum() * voxel_ml, rel=1e-9)


def _outline_groups(path: Path) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    return [group for group in sr.content.get_image_measurement_groups()
            if group.tracking_identifier == OHIF_FREEHAND_OUTLINE]


def _pixels_inside(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which pixel centres a closed (column, row) polyline encloses (even-odd rule), independently of how it
    was traced."""
    rows, columns = np.mgrid[: shape[0], : shape[1]] + 0.5
    inside = np.zeros(shape, bool)
    for (x0, y0), (x1, y1) in zip(outline[:-1], outline[1:]):
        if y0 == y1:
            continue
        crosses = (rows >= min(y0, y1)) & (rows < max(y0, y1))
        x_at_row = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (columns < x_at_row)
    return inside


def test_sr_outlines_each_segment_on_its_largest_cross_section(results: Results):
    """The outline a viewer draws and lists: on the slice where the segment is largest, around exactly the pixels
    of its largest region, on the source image of that slice, with the area it encloses."""
    volume, masks = results.volume, results.segmentation.masks
    groups = _outline_groups(results.sr)
    assert len(groups) == 3
    for group, segment, mask in zip(groups, results.segmentation.segments, masks, strict=True):
        assert group.finding_type.value == segment.type.value
        assert group.tracking_uid == segment_tracking_uid(pydicom.dcmread(results.seg).SOPInstanceUID, segment.number)
        (area,) = group.get_measurements(name=hd.sr.CodedConcept("42798000", "SCT", "Area"))
        (scoord,) = area.referenced_coordinates
        assert scoord.value_type == hd.sr.ValueTypeValues.SCOORD and scoord.graphic_type.value == "POLYLINE"
        outline = scoord.value
        assert np.array_equal(outline[0], outline[-1])
        source = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        k = [frame.sop_instance_uid for frame in volume.frames].index(source.ReferencedSOPInstanceUID)
        assert mask[k].sum() == mask.reshape(len(mask), -1).sum(axis=1).max()
        region = largest_region(mask[k])
        assert np.array_equal(_pixels_inside(outline, region.shape), region)
        assert float(area.value) == pytest.approx(region.sum() * 5.0 * 5.0, rel=1e-12)
        assert area.unit.value == "mm2"
    lungs = groups[1]  # two lungs: the outline is around one of them
    k_lungs = int(np.argmax(masks[1].sum(axis=(1, 2))))
    assert 0 < largest_region(masks[1][k_lungs]).sum() < masks[1][k_lungs].sum()
    assert lungs.tracking_identifier == OHIF_FREEHAND_OUTLINE


def test_context_segments_are_measured_and_outlined_in_the_sr_but_not_drawn_in_the_seg(results: Results,
                                                                                       tmp_path: Path):
    """A whole-body segment painted over every slice washes out what lies beneath: a segment with
    in_seg=False stays out of the SEG (which numbers the others 1, 2, ...) and keeps its volume and
    outline in the SR, whose references follow the SEG's numbers."""
    volume = results.volume
    segments = [replace(BODY, in_seg=False), LUNGS, BONE]
    segmentation = Segmentation(results.segmentation.masks, segments, MODEL, MODEL_VERSION)
    common = {"manufacturer": "dicom-ai-node", "software_version": "0.1.0"}
    seg = build_seg(volume, segmentation, series_number=1, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4",
                    **common)
    sr = build_sr(volume, segmentation, seg, series_number=2, series_instance_uid="1.2.3.5",
                  sop_instance_uid="1.2.3.6", device_name="AI_NODE", model_name=MODEL, **common)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy(tmp_path / "seg.dcm") == [] and dciodvfy(tmp_path / "sr.dcm") == []
    assert [(item.SegmentNumber, item.SegmentLabel) for item in seg.SegmentSequence] == [(1, "Lungs"), (2, "Bone")]
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    slice_of = {frame.sop_instance_uid: k for k, frame in enumerate(volume.frames)}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        k = slice_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.array_equal(frame.astype(bool), segmentation.masks[number, k])  # SEG 1 is mask 1 (lungs)
    assert [group.referenced_segment.referenced_segment_numbers for group in _groups(tmp_path / "sr.dcm")] == [
        [1], [2]]
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "sr.dcm")).content
    (body,) = [group for group in report.get_image_measurement_groups() if group.tracking_identifier == "Body"]
    voxel_ml = 5.0 * 5.0 * 10.0 / 1000.0
    assert _value(body, "Volume") == pytest.approx(segmentation.masks[0].sum() * voxel_ml, rel=1e-12)
    assert len(_outline_groups(tmp_path / "sr.dcm")) == 3
