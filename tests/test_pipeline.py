"""End to end: storescu sends a series, the node routes it, a worker process runs the
model, and SEG + SR land in the node's store, valid for an independent validator."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from conftest import dciodvfy_errors, storescu

from dicom_ai_node.phantoms import CTPhantom, MRPhantom
from dicom_ai_node.phantoms.ct import PhantomGeometry
from dicom_ai_node.results.sr import OHIF_FREEHAND_OUTLINE

REPO = Path(__file__).resolve().parent.parent


def sr_measurements(sr: Dataset) -> dict[str, dict[str, float]]:
    """{tracking identifier: {measurement name: value}} from a TID 1500 report, its segments' outlines left out."""
    found: dict[str, dict[str, float]] = {}

    def walk(items, group: dict[str, float] | None) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "CONTAINER" and name == "Measurement Group":
                label = next(
                    (i.TextValue for i in item.ContentSequence if i.ValueType == "TEXT"
                     and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"),
                    "?",
                )
                if label != OHIF_FREEHAND_OUTLINE:  # outlines: tests/test_results.py and test_ohif.py
                    found[label] = {}
                    walk(item.ContentSequence, found[label])
            elif item.ValueType == "NUM" and group is not None:
                group[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif "ContentSequence" in item:
                walk(item.ContentSequence, group)

    walk(sr.ContentSequence, None)
    return found


@pytest.fixture
def node(node_factory):
    started = node_factory(workers={"processes": 1})
    started.start()
    return started


def _wait_job(node, state: str, count: int = 1) -> list[dict]:
    return node.wait_for(
        lambda: (jobs := node.json("jobs", "--state", state)) and len(jobs) >= count and jobs,
        timeout=180,
        what=f"{count} job(s) {state}",
    )


def test_ct_series_becomes_valid_seg_and_sr(node, tmp_path):
    phantom = CTPhantom(slices=48, rows=160, columns=160, pixel_spacing=(2.5, 2.5), slice_spacing=4.0, noise_hu=10)
    paths = phantom.write(tmp_path / "ct")
    random.Random(7).shuffle(paths)  # the loader must sort by position, not by arrival
    assert storescu(node.port, *paths).returncode == 0

    (job,) = _wait_job(node, "done")
    assert job["model"] == "ct-tissue" and job["device"] == "cpu"
    def models_loaded():
        rows = node.json("models")
        return any(row["loaded"] for row in rows) and {row["name"]: row for row in rows}

    models = node.wait_for(models_loaded, what="a worker reporting its loaded model")
    assert models["ct-tissue"]["loaded"] and "(cpu)" in models["ct-tissue"]["loaded_in"][0]
    detail = node.json("job", "show", str(job["id"]))
    assert all(detail[f"{stage}_seconds"] is not None for stage in ("load", "inference", "write"))
    kinds = {result["kind"]: result for result in detail["results"]}
    assert set(kinds) == {"SEG", "SR"}
    seg_path = node.storage / kinds["SEG"]["file_path"]
    sr_path = node.storage / kinds["SR"]["file_path"]
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []

    seg = pydicom.dcmread(seg_path)
    assert seg.StudyInstanceUID == phantom.study_uid and seg.PatientID == phantom.patient_id
    assert seg.SeriesInstanceUID != phantom.series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lungs", "Bone"]  # the body is measured in the SR
    sr = pydicom.dcmread(sr_path)
    volumes = {label: values["Volume"] for label, values in sr_measurements(sr).items()}
    expected = phantom.geometry.analytic_volumes_ml(phantom.scan_length_mm)
    for label in ("body", "lungs", "bone"):
        assert volumes[label.title()] == pytest.approx(expected[label], rel=0.03), label

    (series,) = node.json("series", phantom.study_uid)
    assert series["state"] == "routed"
    events = [e["kind"] for e in node.json("events", "--study", phantom.study_uid)]
    assert events == ["receiving", "complete", "routed", "job-done"]


def test_mr_series_through_the_demo_monai_bundle(node_factory, tmp_path):
    """The monai_bundle path end to end: the shipped demo bundle segments an MR phantom's lungs."""
    node = node_factory(
        workers={"processes": 1},
        models={"demo-mr": {"kind": "monai_bundle", "path": str(REPO / "models" / "demo-mr-bundle"),
                            "labels": {"lungs": "SCT:39607008:Lung"}}},
        routes=[{"name": "mr", "modality": "MR", "min_slices": 3, "models": ["demo-mr"]}],
    )
    node.start()
    phantom = MRPhantom(slices=48, rows=128, columns=128, pixel_spacing=(2.8, 2.8), slice_spacing=5.0, seed=3)
    assert storescu(node.port, *phantom.write(tmp_path / "mr")).returncode == 0

    (job,) = _wait_job(node, "done")
    assert job["model"] == "demo-mr"
    results = {r["kind"]: r for r in node.json("job", "show", str(job["id"]))["results"]}
    seg_path, sr_path = (node.storage / results[kind]["file_path"] for kind in ("SEG", "SR"))
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert seg.StudyInstanceUID == phantom.study_uid
    volumes = sr_measurements(pydicom.dcmread(sr_path))
    expected = phantom.geometry.analytic_volumes_ml(phantom.scan_length_mm)["lungs"]
    (measured,) = [values["Volume"] for values in volumes.values()]
    assert measured == pytest.approx(expected, rel=0.1)  # a small demo network, not the analytic model


def test_series_that_cannot_form_a_volume_is_skipped_with_reason(node, tmp_path):
    big = CTPhantom(slices=4, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    small = CTPhantom(slices=4, rows=48, columns=48, pixel_spacing=(5.0, 5.0), slice_spacing=5.0,
                      study_uid=big.study_uid, series_uid=big.series_uid)
    paths = big.write(tmp_path / "big") + small.write(tmp_path / "small")
    assert storescu(node.port, *paths).returncode == 0
    (job,) = _wait_job(node, "skipped")
    assert job["error"].startswith("series cannot form a volume")
    assert "48" in job["error"] and "64" in job["error"]


def test_mr_without_route_and_sr_objects_are_not_routed(node, tmp_path):
    mr = CTPhantom(slices=4, rows=32, columns=32, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    datasets = list(mr.datasets())
    for ds in datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    mr_paths = []
    for index, ds in enumerate(datasets):
        mr_paths.append(tmp_path / f"mr{index}.dcm")
        ds.save_as(mr_paths[-1], enforce_file_format=True)
    sr_path = tmp_path / "report.dcm"
    _minimal_sr(mr.study_uid).save_as(sr_path, enforce_file_format=True)
    assert storescu(node.port, *mr_paths, sr_path).returncode == 0

    def states():
        rows = node.json("series", mr.study_uid)
        return len(rows) == 2 and all(row["state"] == "not-routed" for row in rows) and rows

    rows = node.wait_for(states, what="both series not routed")
    reasons = {row["Modality"]: row["state_reason"] for row in rows}
    assert reasons["MR"] == "no route matches (ct: Modality is MR, not CT)"
    assert "never sent to a model" in reasons["SR"]
    assert node.json("jobs") == []


def _minimal_sr(study_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "PHANTOM-001"
    ds.ValueType = "CONTAINER"
    return ds


def test_detection_and_classification_models_report_what_they_found_and_what_they_did_not(node_factory, tmp_path):
    """The built-in demo detector and classifier on two CTs: one with nodules and contrast, one with neither.
    Each job records what its model found; the detector that found nothing says so in its job, its event and its
    SR, and a tissue segmentation sends its SEG while the others send an SR alone."""
    node = node_factory(
        workers={"processes": 1},
        models={"ct-tissue": {"kind": "builtin"},
                "nodules": {"kind": "builtin", "model": "ct-lung-nodules"},
                "contrast": {"kind": "builtin", "model": "ct-contrast"}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue", "nodules", "contrast"]}],
    )
    node.start()
    geometry = {"with": PhantomGeometry(nodules=((-70.0, -5.0, 10.0, 6.0), (75.0, 10.0, -30.0, 4.0)), contrast=True),
                "without": PhantomGeometry()}
    phantoms = {name: CTPhantom(slices=40, rows=128, columns=128, pixel_spacing=(2.5, 2.5), slice_spacing=4.0,
                                noise_hu=10, geometry=shape) for name, shape in geometry.items()}
    for name, phantom in phantoms.items():
        assert storescu(node.port, *phantom.write(tmp_path / name)).returncode == 0
    jobs = _wait_job(node, "done", count=6)
    by_study = {(job["StudyInstanceUID"], job["model"]): node.json("job", "show", str(job["id"])) for job in jobs}
    found = {(name, model): by_study[(phantom.study_uid, model)]
             for name, phantom in phantoms.items() for model in ("ct-tissue", "nodules", "contrast")}

    assert found[("with", "nodules")]["findings"] == 2
    assert found[("with", "nodules")]["summary"].startswith("Nodule 1 (")
    assert (found[("without", "nodules")]["findings"], found[("without", "nodules")]["summary"]) == (
        0, "no findings: Nodule absent")
    assert found[("with", "contrast")]["summary"].startswith("Contrast agent: Present")
    assert found[("without", "contrast")]["summary"].startswith("Contrast agent: Absent")
    assert found[("with", "ct-tissue")]["findings"] == 2  # lungs and bone; the body is context
    for (name, model), detail in found.items():
        kinds = sorted(result["kind"] for result in detail["results"])
        assert kinds == (["SEG", "SR"] if model == "ct-tissue" else ["SR"]), (name, model, kinds)
        for result in detail["results"]:
            assert dciodvfy_errors(node.storage / result["file_path"]) == [], (name, model, result["kind"])
    events = node.json("events", "--study", phantoms["without"].study_uid)
    (nothing,) = [e for e in events if e["kind"] == "job-done" and "(nodules)" in e["message"]]
    assert "no findings: Nodule absent" in nothing["message"]
    assert "no findings: Nodule absent" in node.cli("jobs").stdout
