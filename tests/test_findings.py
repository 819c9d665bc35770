"""Detection and classification results: the built-in demo models against phantoms with exact truth, TorchScript
files and MONAI bundles (a Model Zoo detection bundle against its own pipeline), and the SRs they become, validated
by dciodvfy, read back by dcmqi and highdicom; a model that found nothing says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
import torch
from conftest import dciodvfy_errors, storescu, venv_tool
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from test_results import BONE, LUNGS, MODEL, MODEL_VERSION, dciodvfy, phantom_volume

from dicom_ai_node.config import MonaiBundleConfig
from dicom_ai_node.inference.builtin_findings import (
    ABSENT,
    CONTRAST_AGENT,
    NODULE,
    PRESENT,
    BuiltinContrastModel,
    BuiltinLungNoduleModel,
)
from dicom_ai_node.inference.bundle import MonaiBundleModel, detections_of
from dicom_ai_node.inference.findings import MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Detection, Detections
from dicom_ai_node.inference.model import ModelUnavailable
from dicom_ai_node.inference.segmentation import Segment, Segmentation
from dicom_ai_node.inference.torchscript import TorchScriptModel
from dicom_ai_node.phantoms.ct import CTPhantom, PhantomGeometry
from dicom_ai_node.results.found import what_was_found
from dicom_ai_node.results.marks import detection_region, within_the_series
from dicom_ai_node.results.sr import (
    OHIF_POINT,
    OHIF_RECTANGLE,
    build_classification_sr,
    build_detection_sr,
    build_sr,
)

# (x, y, z from the lungs' centre, radius) in mm: in the left and right lung, 4 to 8 mm across the radius.
NODULES = ((-70.0, -5.0, 10.0, 6.0), (75.0, 10.0, -30.0, 4.0), (60.0, -30.0, 40.0, 8.0))
REPORT = {"series_number": 9002, "series_instance_uid": "1.2.3.5", "sop_instance_uid": "1.2.3.6",
          "manufacturer": "dicom-ai-node", "software_version": "0.1.0", "device_name": "AI_NODE",
          "model_name": MODEL}


def ct(**geometry) -> CTPhantom:
    return CTPhantom(slices=60, rows=160, columns=160, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, noise_hu=10,
                     geometry=PhantomGeometry(**geometry))


@pytest.fixture(scope="module")
def nodules() -> tuple:
    volume = phantom_volume(ct(nodules=NODULES))
    return volume, BuiltinLungNoduleModel("cpu").predict(volume)


def _save(dataset: pydicom.Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    dataset.save_as(path, enforce_file_format=True)
    return path


def _tid1500reader(path: Path) -> dict:
    out = path.with_suffix(".json")
    run = subprocess.run([venv_tool("tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


def _groups(path: Path) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content.get_image_measurement_groups()


def _evaluations(group) -> list:
    """The group's qualitative evaluations (highdicom lists its finding category among them too)."""
    return [e for e in group.get_qualitative_evaluations() if e.name.value != "276214006"]


# --- the demo models ------------------------------------------------------------------------------------------


def test_nodule_candidates_are_found_within_one_voxel_of_the_truth(nodules):
    volume, found = nodules
    assert found.target == NODULE and len(found.findings) == len(NODULES)
    voxel_diagonal = float(np.linalg.norm(volume.spacing))
    for x, y, z, radius in NODULES:
        truth = np.array([x, y, z])  # the lungs are centred on z = 0
        (match,) = [d for d in found.findings if np.linalg.norm(np.array(d.centre_lps) - truth) <= voxel_diagonal]
        low, high = (np.array(corner) for corner in match.box_lps)
        assert np.all(low <= truth - radius + np.array(volume.spacing)) and np.all(
            high >= truth + radius - np.array(volume.spacing)), (match, radius)
        assert np.all(high - low <= 2 * radius + 2 * np.array(volume.spacing))
        assert match.type == NODULE and 0.5 <= match.score <= 1.0
    assert [d.label for d in found.findings] == ["Nodule 1", "Nodule 2", "Nodule 3"]


def test_no_nodule_no_candidate():
    """Lungs, spine, aorta, body wall and noise: nothing for the detector."""
    found = BuiltinLungNoduleModel("cpu").predict(phantom_volume(ct(contrast=True)))
    assert found.findings == []


@pytest.mark.parametrize("contrast", [True, False])
def test_contrast_classifier_tells_enhanced_from_unenhanced(contrast: bool):
    answer = BuiltinContrastModel("cpu").predict(phantom_volume(ct(contrast=contrast, nodules=NODULES)))
    assert answer.name == CONTRAST_AGENT
    assert answer.answer.value == (PRESENT if contrast else ABSENT) and answer.answer.probability > 0.95


# --- what the SRs say ---------------------------------------------------------------------------------------


def test_detection_sr_draws_each_box_on_the_image_nearest_its_centre(nodules, tmp_path):
    volume, found = nodules
    path = _save(build_detection_sr(volume, found, **REPORT), tmp_path, "detections.dcm")
    assert dciodvfy(path) == []
    groups = _groups(path)
    assert len(groups) == len(found.findings)
    slice_of = {frame.sop_instance_uid: k for k, frame in enumerate(volume.frames)}
    for group, detection in zip(groups, found.findings, strict=True):
        assert group.tracking_identifier == OHIF_RECTANGLE and group.finding_type.value == NODULE.value
        (certainty,) = group.get_measurements(name=hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding"))
        assert float(certainty.value) == pytest.approx(detection.score * 100) and certainty.unit.value == "%"
        (scoord,) = certainty.referenced_coordinates
        assert scoord.graphic_type.value == "POLYLINE"
        box = scoord.value
        assert len(box) == 5 and np.array_equal(box[0], box[-1])
        k = slice_of[scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        assert k == volume.index_of(detection.centre_lps)[0]
        # The rectangle encloses exactly the nodule's pixels on that slice (pixel edges, as a SCOORD counts them).
        rows, columns = np.nonzero(volume.pixels[k] > -300)
        centre_k, centre_j, centre_i = volume.index_of(detection.centre_lps)
        near = (np.abs(rows - centre_j) < 8) & (np.abs(columns - centre_i) < 8)
        (c0, r0), (c1, r1) = box.min(axis=0), box.max(axis=0)
        assert c0 <= columns[near].min() and c1 >= columns[near].max() + 1
        assert r0 <= rows[near].min() and r1 >= rows[near].max() + 1
        assert (c1 - c0) <= (columns[near].max() + 1 - columns[near].min()) + 2
    report = _tid1500reader(path)
    assert len(report["Measurements"]) == len(found.findings)


def test_a_detection_without_a_box_is_a_point(nodules, tmp_path):
    volume, found = nodules
    point = Detection("Nodule 1", NODULE, 0.5, found.findings[0].centre_lps)
    detections = Detections([point], found.target, found.category, found.algorithm_name, found.algorithm_version)
    path = _save(build_detection_sr(volume, detections, **REPORT), tmp_path, "point.dcm")
    assert dciodvfy(path) == []
    (group,) = _groups(path)
    assert group.tracking_identifier == OHIF_POINT
    (certainty,) = group.get_measurements()
    (scoord,) = certainty.referenced_coordinates
    k, j, i = volume.index_of(point.centre_lps)
    assert scoord.graphic_type.value == "POINT" and np.allclose(scoord.value, [[i + 0.5, j + 0.5]], atol=0.5)


def test_a_detector_that_found_nothing_says_what_is_absent(nodules, tmp_path):
    volume, found = nodules
    empty = Detections([], found.target, found.category, found.algorithm_name, found.algorithm_version)
    path = _save(build_detection_sr(volume, empty, **REPORT), tmp_path, "nothing.dcm")
    assert dciodvfy(path) == []
    (group,) = _groups(path)
    (evaluation,) = _evaluations(group)
    assert (evaluation.name.meaning, evaluation.value.meaning) == ("Nodule", "Absent")
    assert group.tracking_identifier == "No Nodule"
    _tid1500reader(path)
    assert what_was_found(empty, volume).count == 0
    assert what_was_found(empty, volume).summary == "no findings: Nodule absent"
    assert what_was_found(found, volume).summary == "Nodule 1 (100%), Nodule 2 (100%), Nodule 3 (100%)"


def test_classification_sr_states_the_answer_with_its_probability(tmp_path):
    volume = phantom_volume(ct(contrast=True))
    answer = BuiltinContrastModel("cpu").predict(volume)
    path = _save(build_classification_sr(volume, answer, **REPORT), tmp_path, "classification.dcm")
    assert dciodvfy(path) == []
    (group,) = _groups(path)
    (evaluation,) = _evaluations(group)
    assert (evaluation.name.value, evaluation.value.value) == (CONTRAST_AGENT.value, PRESENT.value)
    (probability,) = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
    assert float(probability.value) == pytest.approx(answer.answer.probability)
    report = _tid1500reader(path)
    (read,) = report["Measurements"]
    assert read["qualitativeEvaluations"][0]["conceptValue"]["CodeMeaning"] == "Present"
    assert what_was_found(answer, volume).summary == "Contrast agent: Present (100%)"


def test_a_segmentation_that_found_nothing_says_each_segment_is_absent(tmp_path):
    """No SEG to reference (the worker writes none for an empty result): the SR alone says it."""
    volume = phantom_volume(CTPhantom(slices=8, rows=32, columns=32, pixel_spacing=(10.0, 10.0), slice_spacing=10.0))
    segments = [replace(LUNGS, number=1), replace(BONE, number=2)]
    empty = Segmentation(np.zeros((2, *volume.shape), bool), segments, MODEL, MODEL_VERSION)
    path = _save(build_sr(volume, empty, None, **REPORT), tmp_path, "empty.dcm")
    assert dciodvfy(path) == []
    evaluations = [evaluation for group in _groups(path) for evaluation in _evaluations(group)]
    assert [(e.name.meaning, e.value.meaning) for e in evaluations] == [("Lung", "Absent"), ("Bone", "Absent")]
    found = what_was_found(empty, volume)
    assert (found.count, found.summary) == (0, "no findings: Lung absent, Bone absent")
    _tid1500reader(path)


# --- classification by a TorchScript file or a MONAI bundle ----------------------------------------------------


class _EnhancedFraction(torch.nn.Module):
    """A stand-in network with fixed weights: the fraction of voxels the window leaves strictly between 0 and 1
    (enhanced blood, 150-300 HU, and the edges of bone that resizing blurs), as logits of (absent, present) around
    8 voxels in 1000."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fraction = ((x > 0.05) & (x < 0.95)).float().mean()
        present = 2000.0 * (fraction - 0.008)
        return torch.stack([-present, present])[None]


CONTRAST_LABELS = {"absent": "SCT:272519000:Absent", "present": "SCT:52101004:Present"}


@pytest.fixture(scope="module")
def contrast_volumes() -> dict[bool, object]:
    return {contrast: phantom_volume(ct(contrast=contrast)) for contrast in (True, False)}


def test_a_torchscript_classifier_answers_for_the_whole_series(contrast_volumes, tmp_path):
    path = tmp_path / "classifier.ts"
    torch.jit.script(_EnhancedFraction()).save(str(path))
    model = TorchScriptModel("contrast-ts", path, "cpu", None, (150.0, 300.0), (64, 64, 32), CONTRAST_LABELS,
                             output="classification", finding="SCT:7140000:Contrast agent")
    for contrast, volume in contrast_volumes.items():
        answer = model.predict(volume)
        assert answer.name == CONTRAST_AGENT and answer.algorithm_version == model.version
        assert [score.value.meaning for score in answer.scores] == ["Absent", "Present"]
        assert answer.answer.value == (PRESENT if contrast else ABSENT), answer.scores
        assert sum(score.probability for score in answer.scores) == pytest.approx(1.0)


def test_a_bundle_whose_metadata_says_classes_is_a_classifier(contrast_volumes, tmp_path):
    """network_data_format.outputs of type "probabilities" and format "classes" make the bundle a classifier of the
    whole series; its channel_def names the classes (channel 0 a class, not background), `labels` codes them."""
    bundle = tmp_path / "contrast-bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    torch.jit.script(_EnhancedFraction()).save(str(bundle / "models" / "model.ts"))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2,
                                 "channel_def": {"0": "absent", "1": "present"}}},
        },
    }))
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 150, "a_max": 300, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "Resized", "keys": "image", "spatial_size": [64, 64, 32], "mode": "area"},
        ]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }))
    config = MonaiBundleConfig(path=bundle, labels=CONTRAST_LABELS, finding="SCT:7140000:Contrast agent")
    model = MonaiBundleModel("contrast-bundle", config)
    for contrast, volume in contrast_volumes.items():
        answer = model.predict(volume)
        assert answer.answer.value == (PRESENT if contrast else ABSENT), answer.scores
        assert answer.answer.probability > 0.95
    with pytest.raises(ModelUnavailable, match="models.contrast-bundle.finding"):
        MonaiBundleModel("contrast-bundle", MonaiBundleConfig(path=bundle, labels=CONTRAST_LABELS))


def test_a_finding_outside_the_series_is_left_out_and_the_rest_reported(nodules, tmp_path):
    """A model's box placed beyond the last slice cannot be drawn on any image: the worker leaves it out (and says
    so in a job-incomplete event) instead of failing the job and losing the findings inside."""
    volume, found = nodules
    beyond = Detection("Nodule 9", NODULE, 0.9, (0.0, 0.0, 1000.0))
    with_outside = Detections([*found.findings, beyond], found.target, found.category, found.algorithm_name,
                              found.algorithm_version)
    kept, outside = within_the_series(with_outside, volume)
    assert outside == [beyond] and kept.findings == found.findings
    path = _save(build_detection_sr(volume, kept, **REPORT), tmp_path, "kept.dcm")
    assert dciodvfy(path) == [] and len(_groups(path)) == len(found.findings)


def test_a_box_past_the_image_edge_is_drawn_to_the_edge_and_a_flat_one_as_a_point(nodules):
    volume, found = nodules
    x, y, z = found.findings[0].centre_lps
    wide = Detection("Nodule 1", NODULE, 0.5, (x, y, z), ((x - 1000.0, y - 2.0, z - 2.0), (x + 2.0, y + 2.0, z + 2.0)))
    k, graphic_type, box = detection_region(volume, wide)
    assert graphic_type == "POLYLINE" and box[:, 0].min() == 0.0 and box.min() >= 0.0
    flat = Detection("Nodule 1", NODULE, 0.5, (x, y, z), ((x, y, z - 2.0), (x, y, z + 2.0)))
    assert detection_region(volume, flat)[1] == "POINT"


def test_nodules_are_found_in_lungs_that_touch_the_edge_of_the_image(nodules):
    """Lung cut by the field of view touches the image's edge: what lies outside the lung is what touches the
    edge apart from the lung itself, so a nodule inside it is still enclosed."""
    volume, _ = nodules
    lungs = np.zeros(volume.shape, bool)
    lungs[20:40, 0:60, 0:60] = True  # a block of lung in the image's corner
    pixels = np.full(volume.shape, -1000.0, np.float32)
    pixels[~lungs] = 40.0
    pixels[28:33, 25:30, 25:30] = 40.0  # a 5-voxel nodule in it
    lungs[28:33, 25:30, 25:30] = False
    cut = replace(volume, pixels=pixels)
    model = BuiltinLungNoduleModel("cpu")
    model.tissue = _FixedTissue(lungs)
    (candidate,) = model.predict(cut).findings
    k, j, i = cut.index_of(candidate.centre_lps)
    assert (k, j, i) == (30, 27, 27)


class _FixedTissue:
    """The tissue model's masks, fixed: (body, lungs, bone) with `lungs` given."""

    def __init__(self, lungs: np.ndarray) -> None:
        self.lungs = lungs

    def predict(self, volume) -> Segmentation:
        empty = np.zeros_like(self.lungs)
        return Segmentation(np.stack([~self.lungs, self.lungs, empty]), [replace(LUNGS, number=n, label=f"s{n}")
                                                                         for n in (1, 2, 3)], MODEL, MODEL_VERSION)



# --- detection by a TorchScript file or a MONAI bundle ----------------------------------------------------------


class _SaturatedBox(torch.nn.Module):
    """A stand-in detector with no weights, so that where it says a finding is can be checked: the box around the
    voxels its input window saturates (class 1, score 0.9), beside what a detector returns and the node must not
    report: a box off the image (score 0.95) and a faint one (class 0, score 0.1)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bright = torch.nonzero(x[0, 0] > 0.5).float()
        found = torch.cat([bright.min(dim=0).values, bright.max(dim=0).values])
        off_image = torch.tensor([-50.0, -50.0, -50.0, -10.0, -10.0, -10.0])
        faint = found + 2.0
        return {"boxes": torch.stack([found, off_image, faint]), "scores": torch.tensor([0.9, 0.95, 0.1]),
                "labels": torch.tensor([1, 1, 0])}


MARKER_HU = 3000.0  # above any tissue of the phantom, so the stand-in detector sees the marker alone
MARKER = (slice(25, 31), slice(70, 80), slice(90, 100))  # (k, j, i): 6 slices, 10 rows, 10 columns


@pytest.fixture(scope="module")
def marked() -> tuple:
    """A CT phantom with a marker of known voxels, and the marker's first and last voxel centres in LPS."""
    volume = phantom_volume(ct())
    pixels = volume.pixels.copy()
    pixels[MARKER] = MARKER_HU
    low, high = ((volume.affine @ [i.start + end * (i.stop - i.start - 1), j.start + end * (j.stop - j.start - 1),
                                   k.start + end * (k.stop - k.start - 1), 1.0])[:3]
                 for k, j, i in [MARKER] for end in (0, 1))
    return replace(volume, pixels=pixels), np.minimum(low, high), np.maximum(low, high)


def test_a_torchscript_detector_finds_the_marker_within_one_voxel(marked, tmp_path):
    """The box comes back from the network's resampled, reoriented grid to the patient within one voxel of that
    grid; the box off the image is clipped away and the faint one left out (min_score)."""
    volume, low, high = marked
    path = tmp_path / "detector.ts"
    torch.jit.script(_SaturatedBox()).save(str(path))
    labels = {"lesion": "SCT:52988006:Lesion", "nodule": "SCT:27925004:Nodule"}
    model = TorchScriptModel("marker-ts", path, "cpu", (3.0, 3.0, 3.0), (2000.0, 3000.0), (64, 64, 64), labels,
                             output="detection", finding="SCT:27925004:Nodule", min_score=0.5)
    found = model.predict(volume)
    assert (found.target, found.algorithm_version) == (NODULE, model.version)
    (finding,) = found.findings
    assert (finding.label, finding.type, finding.score) == ("Nodule 1", NODULE, pytest.approx(0.9))
    box_low, box_high = (np.array(corner) for corner in finding.box_lps)
    assert np.all(np.abs(box_low - low) <= 3.0) and np.all(np.abs(box_high - high) <= 3.0), (finding, low, high)
    assert np.allclose(finding.centre_lps, (box_low + box_high) / 2)
    with pytest.raises(ModelUnavailable, match="models.marker-ts.finding"):  # two classes: which is looked for?
        TorchScriptModel("marker-ts", path, "cpu", None, None, (64, 64, 64), labels, output="detection")


# A bundle in the layout of the Model Zoo's lung_nodule_ct_detection: RetinaNet + RetinaNetDetector, detector_ops,
# its own inferer in scripts/, boxes clipped and mapped to the world by its postprocessing.  The feature extractor
# is the bundle's own small one (scripts/net.py): the Zoo's ResNet-FPN needs torchvision, which has no CPU build
# for this torch; the weights are random (nothing is downloaded).
_DETECTION_INFERENCE = {
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "spatial_dims": 3,
    "num_classes": 1,
    "size_divisible": [16, 16, 8],
    "infer_patch_size": [64, 64, 32],
    "anchor_generator": {"_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
                         "feature_map_scales": [1, 2, 4], "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]]},
    "feature_extractor": {"_target_": "scripts.net.SmallFeatures", "channels": 8},
    "network_def": {"_target_": "RetinaNet", "spatial_dims": "@spatial_dims", "num_classes": "@num_classes",
                    "num_anchors": 3, "feature_extractor": "@feature_extractor", "size_divisible": "@size_divisible",
                    "use_list_output": False},
    "network": "$@network_def.to(@device)",
    "detector": {"_target_": "RetinaNetDetector", "network": "@network", "anchor_generator": "@anchor_generator",
                 "debug": False, "spatial_dims": "@spatial_dims", "num_classes": "@num_classes",
                 "size_divisible": "@size_divisible"},
    "detector_ops": [
        "$@detector.set_target_keys(box_key='box', label_key='label')",
        "$@detector.set_box_selector_parameters(score_thresh=0.0,topk_candidates_per_level=100,nms_thresh=0.22,"
        "detections_per_img=5)",
        "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size,overlap=0.25,sw_batch_size=1,"
        "mode='constant',device='cpu')",
    ],
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [2.5, 2.5, 4.0]},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024.0, "a_max": 300.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "inferer": {"_target_": "scripts.detection_inferer.RetinaNetInferer", "detector": "@detector"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "ClipBoxToImaged", "box_keys": "box", "label_keys": "label", "box_ref_image_keys": "image",
         "remove_empty": True},
        {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "image",
         "affine_lps_to_ras": True},
        {"_target_": "ConvertBoxModed", "box_keys": "box", "src_mode": "xyzxyz", "dst_mode": "cccwhd"},
    ]},
}
_SCRIPTS = {
    "__init__.py": "",
    "net.py": '''
from collections import OrderedDict

import torch


class SmallFeatures(torch.nn.Module):
    """Three feature maps at strides (2, 2, 1), (4, 4, 2) and (8, 8, 4), as RetinaNet's feature extractor gives."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.levels = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv3d(1 if n == 0 else channels, channels, 3, stride=stride, padding=1),
                                torch.nn.ReLU())
            for n, stride in enumerate([(2, 2, 1), 2, 2]))

    def forward(self, x):
        maps = OrderedDict()
        for n, level in enumerate(self.levels):
            x = maps[str(n)] = level(x)
        return maps
''',
    "detection_inferer.py": '''
from monai.inferers import Inferer


class RetinaNetInferer(Inferer):
    """Runs the bundle's RetinaNetDetector with the network it is given."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def __call__(self, inputs, network):
        self.detector.network = network
        self.detector.training = network.training
        return self.detector(inputs, use_inferer=False)
''',
}


def _forget_bundle_scripts() -> None:
    for module in [name for name in sys.modules if name.partition(".")[0] == "scripts"]:
        del sys.modules[module]


@pytest.fixture
def detection_bundle(tmp_path, monkeypatch) -> Path:
    """The bundle, its random weights saved as models/model.pt; its `scripts` importable (as MONAI's own runner
    makes them) for the reference run, and forgotten after."""
    bundle = tmp_path / "nodule-detection"
    for folder in ("configs", "models", "scripts"):
        (bundle / folder).mkdir(parents=True)
    for name, text in _SCRIPTS.items():
        (bundle / "scripts" / name).write_text(text)
    (bundle / "configs" / "inference.json").write_text(json.dumps(_DETECTION_INFERENCE, indent=1))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.6.8",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT", "num_channels": 1}},
            "outputs": {"pred": {"type": "object", "format": "dict", "num_channels": 1}},
        },
    }))
    monkeypatch.syspath_prepend(str(bundle))
    _forget_bundle_scripts()
    parser = _bundle_parser(bundle)
    torch.manual_seed(11)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    yield bundle
    _forget_bundle_scripts()


def _bundle_parser(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    return parser


def _bundle_run_on_a_file(bundle: Path, volume, folder: Path) -> dict:
    """What the bundle itself reports for the volume written as NIfTI: its preprocessing from the file, its
    detector and inferer, its postprocessing (boxes in world coordinates, LPS, as centre and size)."""
    nifti = folder / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.pixels.transpose(2, 1, 0), np.asarray(volume.to_metatensor().affine)),
                 nifti)
    parser = _bundle_parser(bundle)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    parser.get_parsed_content("detector_ops")
    data = parser.get_parsed_content("preprocessing")({"image": str(nifti)})
    with torch.no_grad():
        (pred,) = parser.get_parsed_content("inferer")(data["image"][None], network)
    return parser.get_parsed_content("postprocessing")({**pred, "image": data["image"]})


def test_a_zoo_detection_bundle_reports_what_its_own_pipeline_reports(detection_bundle, tmp_path):
    """Metadata of type "object" makes the bundle a detector; its `scripts` package comes from the bundle; the node
    runs it on the volume in memory and puts each box where the bundle's own run from a file does."""
    volume = phantom_volume(ct(nodules=NODULES))
    reference = _bundle_run_on_a_file(detection_bundle, volume, tmp_path)
    _forget_bundle_scripts()  # the node imports the bundle's own scripts, not what the reference run left loaded
    config = MonaiBundleConfig(path=detection_bundle, labels={"nodule": "SCT:27925004:Nodule"}, min_score=0.0)
    model = MonaiBundleModel("nodules-bundle", config)
    found = model.predict(volume)
    assert model.output == "detection" and found.target == NODULE
    assert len(found.findings) == len(reference["box"]) > 0
    expected = sorted(zip(reference["label_scores"].tolist(), reference["box"].tolist()), reverse=True)
    for finding, (score, (x, y, z, width, height, depth)) in zip(found.findings, expected):
        low, high = (np.array(corner) for corner in finding.box_lps)
        assert finding.score == pytest.approx(score, abs=1e-5)
        assert np.allclose(finding.centre_lps, (x, y, z), atol=1e-2), (finding, (x, y, z))
        assert np.allclose(high - low, (width, height, depth), atol=1e-2)
    assert [finding.label for finding in found.findings][:2] == ["Nodule 1", "Nodule 2"]
    strict = MonaiBundleModel("nodules-bundle", MonaiBundleConfig(path=detection_bundle,
                                                                  labels={"nodule": "SCT:27925004:Nodule"}))
    assert strict.predict(volume).findings == []  # random weights score ~0.02: below the default 0.5


def test_each_bundle_runs_the_scripts_it_ships(detection_bundle, tmp_path):
    """Two bundles that both ship a `scripts` package (every Zoo bundle with code does) each get their own, and
    neither leaves it importable for the next."""
    copy = shutil.copytree(detection_bundle, tmp_path / "copy")
    _forget_bundle_scripts()
    labels = {"nodule": "SCT:27925004:Nodule"}
    models = [MonaiBundleModel(name, MonaiBundleConfig(path=path, labels=labels))
              for name, path in (("first", detection_bundle), ("second", copy))]
    for model in models:
        shipped = Path(type(model.network.feature_extractor).forward.__code__.co_filename)
        assert shipped == model.path / "scripts" / "net.py"
    assert "scripts" not in sys.modules


def test_a_zoo_detection_bundle_end_to_end(detection_bundle, node_factory, tmp_path):
    """As an admin would set it up: the bundle in [models] with its one label coded, a route to it; a worker
    process imports the bundle's scripts, and the job's SR reports each finding, valid for dciodvfy."""
    node = node_factory(
        workers={"processes": 1},
        models={"nodules": {"kind": "monai_bundle", "path": str(detection_bundle), "min_score": 0.0,
                            "labels": {"nodule": "SCT:27925004:Nodule"}}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["nodules"]}],
    )
    node.start()
    phantom = ct(nodules=NODULES)
    assert storescu(node.port, *phantom.write(tmp_path / "ct")).returncode == 0
    (job,) = node.wait_for(lambda: node.json("jobs", "--state", "done"), timeout=180, what="the detection job")
    assert (job["model"], job["findings"]) == ("nodules", 5)  # the bundle's detections_per_img
    (result,) = node.json("job", "show", str(job["id"]))["results"]
    path = node.storage / result["file_path"]
    assert result["kind"] == "SR" and dciodvfy_errors(path) == []
    groups = _groups(path)
    assert [group.finding_type.meaning for group in groups] == ["Nodule"] * 5
    _tid1500reader(path)


def test_a_detector_output_that_holds_nothing_reportable_is_no_finding_and_a_bad_class_an_error():
    """Empty in any shape is "nothing found"; unscored (NaN) and low-scored boxes are not reported, whatever class
    they claim; a reported box of a class the config does not code fails the job with the reason."""
    classes = [Segment(1, "nodule", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NODULE, (255, 0, 0))]
    image = MetaTensor(torch.zeros(1, 10, 10, 10), affine=torch.eye(4))

    def found(output: dict) -> list:
        return detections_of(output, image, classes, NODULE, 0.5, "detector", "1").findings

    assert found({"boxes": torch.zeros(0), "scores": torch.zeros(0)}) == []
    assert found({"box": torch.zeros(0, 6), "label_scores": torch.zeros(0), "label": torch.zeros(0)}) == []
    box = torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0])
    assert found({"boxes": torch.stack([box, box]), "scores": torch.tensor([float("nan"), 0.1]),
                  "labels": torch.tensor([-1, 7])}) == []
    with pytest.raises(ValueError, match="returned class 7; models.detector.labels codes classes 0 to 0"):
        found({"boxes": box[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([7])})
    (point,) = found({"boxes": torch.tensor([[2.0, 3.0, 4.0], [10.0, 0.0, 0.0]]), "scores": torch.tensor([0.8, 0.9])})
    assert point.box_lps is None and point.centre_lps == (-2.0, -3.0, 4.0)  # the other lies past the last voxel
