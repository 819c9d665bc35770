"""Study routes: a model that reads several series of one MR study by role (issue 12, items 1 and 2b).

The study is an MR phantom scanned three times in one session (one frame of reference): a T1 without contrast,
a T1 after gadolinium (the aorta bright) and a FLAIR with thicker slices.  The model is a TorchScript network
that marks where the contrast T1 is brighter than the plain T1, so its segment is the enhancing aorta, whose
volume the phantom knows exactly: it is right only if every role reached its channel, on one grid.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import _toml, dciodvfy_errors, storescu
from pydicom.uid import generate_uid

from dicom_ai_node.config import Config, ConfigError, RoleConfig, RouteConfig, load_config
from dicom_ai_node.inference.volume import VolumeError, load_volume, with_roles
from dicom_ai_node.phantoms import MRPhantom
from dicom_ai_node.phantoms.ct import PhantomGeometry
from dicom_ai_node.routing.facts import read_sequence
from dicom_ai_node.routing.rules import preferred, role_mismatch, roles_of
from dicom_ai_node.values import SequenceFacts, SeriesFacts

AORTA = "SCT:15825003:Aorta"
SLICES, SPACING = 12, 5.0


class _Enhancement(torch.nn.Module):
    """Channel 1 (contrast T1) brighter than channel 0 (plain T1) by more than 400: label 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enhanced = (x[:, 1] - x[:, 0] > 400.0).float()
        return torch.stack([1.0 - enhanced, enhanced], dim=1)


@pytest.fixture(scope="module")
def enhancement_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "enhancement.ts"
    torch.jit.script(_Enhancement()).save(str(path))
    return path


def mr_session(**changes) -> dict[str, MRPhantom]:
    """Three sequences of one MR exam: one study, one frame of reference, series numbers in scan order."""
    study_uid, frame_of_reference = generate_uid(), generate_uid()
    common = dict(rows=128, columns=128, pixel_spacing=(2.5, 2.5), slices=SLICES, slice_spacing=SPACING,
                  study_uid=study_uid, frame_of_reference_uid=frame_of_reference, noise_fraction=0.0)
    common.update(changes)
    return {
        "t1": MRPhantom(series_number=1, series_description="T1 axial", **common),
        "flair": MRPhantom(**{**common, "slices": SLICES // 2, "slice_spacing": SPACING * 2}, series_number=2,
                           series_description="FLAIR axial", scanning_sequence="IR", sequence_variant="SK",
                           repetition_time=9000.0, echo_time=90.0, inversion_time=2500.0),
        "t1c": MRPhantom(series_number=3, series_description="T1 axial +C",
                         geometry=PhantomGeometry(contrast=True), **common),
    }


def aorta_ml(phantom: MRPhantom) -> float:
    return math.pi * phantom.geometry.aorta_radius**2 * phantom.scan_length_mm / 1000.0


ROLES = {
    "t1": {"scanning_sequence": ["GR"], "contrast": False},
    "t1c": {"scanning_sequence": ["GR"], "contrast": True},
    "flair": {"scanning_sequence": ["IR"], "inversion_time": [1500, 3000], "echo_time": [60, 200]},
}


def route(**changes) -> dict:
    return {"name": "enhancement", "unit": "study", "modality": "MR", "inputs": ROLES, "models": ["enhancement"],
            "study_wait_seconds": 6, **changes}


def model(path: Path, **changes) -> dict:
    return {"kind": "torchscript", "path": str(path), "labels": {"aorta": AORTA}, "roi_size": [64, 64, 16],
            "inputs": ["t1", "t1c", "flair"], "optional_inputs": ["flair"], **changes}


# --- matching by role ---------------------------------------------------------------------------------------


def _facts(phantom: MRPhantom, tmp_path: Path) -> SeriesFacts:
    path = tmp_path / f"{phantom.series_uid}.dcm"
    phantom.dataset(0).save_as(path, enforce_file_format=True)
    return SeriesFacts(phantom.series_uid, "MR", None, phantom.series_description,
                       frozenset({pydicom.uid.MRImageStorage}), frozenset({"ORIGINAL\\PRIMARY\\OTHER"}),
                       phantom.slices, read_sequence(path), phantom.series_number)


def test_roles_are_told_apart_by_their_mr_sequence_attributes(tmp_path):
    """ScanningSequence, inversion and echo time ranges and the contrast agent each decide a role, and the
    reason a series does not fill a role names the attribute and its value."""
    session = mr_session(slices=2)
    facts = {name: _facts(phantom, tmp_path) for name, phantom in session.items()}
    assert facts["flair"].sequence == SequenceFacts(frozenset({"IR"}), frozenset({"SK"}), 90.0, 9000.0, 2500.0,
                                                    None, 10.0, "20260115103000")
    assert facts["t1c"].sequence.contrast_agent == "Gadobutrol"
    study = RouteConfig(**route())
    assert {name: roles_of(study, each) for name, each in facts.items()} == {
        "t1": ["t1"], "t1c": ["t1c"], "flair": ["flair"]}
    assert role_mismatch(study, study.inputs["flair"], facts["t1"]) == "ScanningSequence GR lacks IR"
    assert role_mismatch(study, study.inputs["t1"], facts["t1c"]) == (
        "ContrastBolusAgent 'Gadobutrol': a contrast-enhanced series")
    assert role_mismatch(study, study.inputs["t1c"], facts["t1"]) == (
        "no ContrastBolusAgent: not a contrast-enhanced series")
    short = RoleConfig(scanning_sequence=["IR"], inversion_time=(100, 300))  # a STIR, not a FLAIR
    assert role_mismatch(study, short, facts["flair"]) == "InversionTime 2500 ms is not within 100-300 ms"
    assert role_mismatch(study, RoleConfig(modality="CT"), facts["t1"]) == "Modality is MR, not CT"


def test_when_several_series_fill_a_role_the_rule_says_which(tmp_path):
    """A repeated sequence (motion): `latest` takes the later one, `most_slices` the longer one, `thinnest_slices`
    the one with the thinnest slices, whatever order they arrived in."""
    first = _facts(MRPhantom(series_number=4, slices=30, slice_spacing=1.0), tmp_path)
    repeat = _facts(MRPhantom(series_number=7, slices=20, slice_spacing=3.0), tmp_path)
    for prefer, wanted in (("latest", repeat), ("most_slices", first), ("thinnest_slices", first)):
        for candidates in ([first, repeat], [repeat, first]):
            assert preferred(RoleConfig(prefer=prefer), candidates) is wanted


def test_study_route_settings_are_checked_at_start_up(tmp_path, enhancement_model):
    """A study route without roles, a model that reads other roles than its route names, a series route to a
    model that reads roles, two routes of one name, a role the results' grid needs declared optional: each
    stops start-up with the key named."""

    def config(routes, **models) -> str:
        path = tmp_path / "config.toml"
        path.write_text(_toml({"models": {"enhancement": model(enhancement_model, **models)}, "routes": routes}))
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        return str(raised.value)

    assert "a study route names the series its models read" in config([route(inputs={})])
    assert "reads the roles ['t1', 't1c'], the route's inputs are ['t1', 't1c', 'flair']" in config(
        [route()], inputs=["t1", "t1c"], optional_inputs=[])
    assert 'its route needs unit = "study"' in config([{"name": "mr", "modality": "MR", "models": ["enhancement"]}])
    assert "enhancement named twice" in config([route(), route()])
    assert "inputs are for study routes" in config([{**route(), "unit": "series"}])
    assert "its first role 't1' gives the results their grid" in config([route()], optional_inputs=["t1"])
    assert 'optional_inputs names none (or use "skip" or "wait")' in config([route(missing_role="process")],
                                                                             optional_inputs=[])
    builtin = tmp_path / "builtin.toml"
    builtin.write_text(_toml({"models": {"tissue": {"kind": "builtin"}}, "routes": [route(models=["tissue"])]}))
    with pytest.raises(ConfigError, match="'tissue' is a built-in model that reads one series"):
        load_config(builtin)
    assert "optional_inputs ['dwi'] are not among its inputs" in config([route()], optional_inputs=["dwi"])
    assert "low first" in config([route(inputs={"t1": {"echo_time": [30, 3]}})])
    good = tmp_path / "good.toml"
    good.write_text(_toml({"models": {"enhancement": model(enhancement_model)}, "routes": [route()]}))
    assert load_config(good).routes[0].inputs["flair"].inversion_time == (1500.0, 3000.0)
    assert Config().route("ct") is not None


# --- one grid for every role ----------------------------------------------------------------------------------


def test_each_role_is_resampled_onto_the_first_roles_grid_and_other_frames_of_reference_are_refused(tmp_path):
    """The FLAIR's 10 mm slices land on the T1's 5 mm grid through patient space (linear interpolation); the
    T1c on the same grid is taken as is; a role missing is zeros; a series of another frame of reference (another
    session) is refused with the reason, not silently misaligned."""
    session = mr_session(rows=64, columns=64, pixel_spacing=(5.0, 5.0))
    volumes = {name: load_volume(phantom.write(tmp_path / name)) for name, phantom in session.items()}
    stacked = with_roles(volumes["t1"], {"t1": volumes["t1"], "t1c": volumes["t1c"], "flair": volumes["flair"],
                                         "dwi": None})
    t1, t1c, flair, dwi = stacked.channels
    assert t1 is volumes["t1"].pixels and t1c is volumes["t1c"].pixels and not dwi.any()
    # A FLAIR whose signal is a linear function of the patient position: linear interpolation reproduces it
    # exactly, so on the T1 grid each voxel must hold the function at that voxel's own position.
    def linear(volume):
        k, j, i = np.indices(volume.shape)
        x, y, z = (volume.affine @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1))[:3]
        return (2 * x + 3 * y + 5 * z + 2000).reshape(volume.shape).astype(np.float32)

    flair = with_roles(volumes["t1"], {"flair": dataclasses.replace(volumes["flair"],
                                                                    pixels=linear(volumes["flair"]))}).channels[0]
    within = slice(1, SLICES - 1)  # the FLAIR's 60 mm cover the T1's slice centres but its first and last
    assert np.allclose(flair[within], linear(volumes["t1"])[within], atol=0.01)
    tensor = stacked.to_metatensor()
    assert tuple(tensor.shape) == (4, 64, 64, SLICES) and tensor.meta["original_channel_dim"] == 0
    elsewhere = MRPhantom(rows=64, columns=64, pixel_spacing=(5.0, 5.0), slices=SLICES, noise_fraction=0.0)
    with pytest.raises(VolumeError, match="another FrameOfReferenceUID .* without a registration"):
        with_roles(volumes["t1"], {"t1": volumes["t1"], "other": load_volume(elsewhere.write(tmp_path / "x"))})


# --- with a node ----------------------------------------------------------------------------------------------


def _send(node, phantom: MRPhantom, folder: Path) -> None:
    assert storescu(node.port, *phantom.write(folder)).returncode == 0


def _events(node, kind: str, study_uid: str) -> list[dict]:
    return [event for event in node.json("events", "--study", study_uid, "--limit", "500") if event["kind"] == kind]


def _series_complete(node, phantom: MRPhantom) -> bool:
    return any(row["SeriesInstanceUID"] == phantom.series_uid and row["state"] == "routed"
               for row in node.json("series", phantom.study_uid))


def _seg_volume_ml(node, job: dict) -> tuple[float, Path]:
    """The volume the job's SEG marks (one voxel per marked pixel of a frame on the T1's 2.5 x 2.5 x 5 mm grid)."""
    (seg,) = [result for result in node.json("job", "show", str(job["id"]))["results"] if result["kind"] == "SEG"]
    path = node.storage / seg["file_path"]
    return float(np.count_nonzero(pydicom.dcmread(path).pixel_array)) * 2.5 * 2.5 * SPACING / 1000, path


def test_a_study_whose_series_arrive_minutes_apart_completes_once_with_every_role(
    node_factory, tmp_path, enhancement_model
):
    """T1, FLAIR and contrast T1 arrive with gaps longer than the quiet period: each series completes on its own,
    the study waits for its roles, then one job reads all three (by role, as channels in the model's order) and
    its SEG is the enhancing aorta the phantom holds (valid for dciodvfy); events name the signal."""
    node = node_factory(workers={"processes": 1}, series={"stable_seconds": 1, "check_interval_seconds": 0.2},
                        models={"enhancement": model(enhancement_model)}, routes=[route()])
    node.start()
    session = mr_session()
    study_uid = session["t1"].study_uid
    for name in ("t1", "flair"):
        _send(node, session[name], tmp_path / name)
        node.wait_for(lambda: _series_complete(node, session[name]), what=f"the {name} series to complete")
    (route_shown,) = node.json("roles", study_uid)
    assert route_shown["state"] == "collecting" and route_shown["missing"] == ["t1c"]
    assert node.json("jobs") == []  # nothing runs with a role missing before the deadline
    shown = node.cli("roles", study_uid[:20]).stdout
    assert "t1c: missing" in shown and "no ContrastBolusAgent: not a contrast-enhanced series" in shown
    _send(node, session["t1c"], tmp_path / "t1c")
    (job,) = node.wait_for(lambda: node.json("jobs", "--state", "done"), timeout=120, what="the study's job")
    (complete,) = _events(node, "study-complete", study_uid)
    assert "every role arrived and its series went quiet" in complete["message"]
    assert all(f"{role} = series {session[role].series_number}" in complete["message"] for role in ROLES)
    volume_ml, seg = _seg_volume_ml(node, job)
    assert volume_ml == pytest.approx(aorta_ml(session["t1"]), rel=0.08)
    assert dciodvfy_errors(seg) == []
    assert pydicom.dcmread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID == session["t1"].series_uid
    (route_shown,) = node.json("roles", study_uid)
    assert route_shown["state"] == "queued" and route_shown["runs"] == 1
    assert {role["role"]: role["SeriesInstanceUID"] for role in route_shown["roles"]} == {
        name: phantom.series_uid for name, phantom in session.items()}
    routed = {event["SeriesInstanceUID"]: event["message"] for event in _events(node, "routed", study_uid)}
    assert routed[session["flair"].series_uid] == "input flair of study route 'enhancement'"


def test_a_role_missing_at_the_deadline_follows_the_route_and_a_late_series_runs_the_job_again(
    node_factory, tmp_path, enhancement_model
):
    """The FLAIR is held back: at the deadline the route that may process without it does (the model lists it
    as optional), the route that needs it skips the study with the reason.  When the FLAIR arrives after all,
    both decide again: the job runs again with it, as new result objects beside the first ones."""
    needs_flair = {**model(enhancement_model), "optional_inputs": ["t1c"]}
    node = node_factory(workers={"processes": 1}, series={"stable_seconds": 1, "check_interval_seconds": 0.2},
                        models={"enhancement": model(enhancement_model), "strict": needs_flair},
                        routes=[route(missing_role="process", study_wait_seconds=3),
                                route(name="strict", models=["strict"], missing_role="process", study_wait_seconds=3)])
    node.start()
    session = mr_session()
    study_uid = session["t1"].study_uid
    _send(node, session["t1"], tmp_path / "t1")
    _send(node, session["t1c"], tmp_path / "t1c")
    (first,) = node.wait_for(lambda: node.json("jobs", "--state", "done"), timeout=120, what="the job without FLAIR")
    (skipped,) = _events(node, "study-skipped", study_uid)
    assert "no series for flair 3 s after the study's last series completed" in skipped["message"]
    assert "model 'strict' needs flair (not in its optional_inputs)" in skipped["message"]
    (processed,) = _events(node, "study-complete", study_uid)
    assert "processed without them" in processed["message"]
    assert _seg_volume_ml(node, first)[0] == pytest.approx(aorta_ml(session["t1"]), rel=0.08)

    _send(node, session["flair"], tmp_path / "flair")
    done = node.wait_for(lambda: len(node.json("jobs", "--state", "done")) == 3 and node.json("jobs", "--state",
                         "done"), timeout=120, what="both routes' jobs with the late FLAIR")
    assert sorted(job["model"] for job in done) == ["enhancement", "enhancement", "strict"]
    assert len(_events(node, "study-reopened", study_uid)) == 2
    results = [node.json("job", "show", str(job["id"]))["results"] for job in done if job["model"] == "enhancement"]
    first_uids, again_uids = ({result["SOPInstanceUID"] for result in each} for each in results)
    assert first_uids and again_uids and not first_uids & again_uids  # new objects, never mixed with the first
    shown = {route["route"]: route for route in node.json("roles", study_uid)}
    assert shown["strict"]["runs"] == 1 and shown["enhancement"]["runs"] == 2


def test_a_route_that_waits_says_so_once_and_a_series_of_another_session_is_a_skipped_job(
    node_factory, tmp_path, enhancement_model
):
    """`missing_role = "wait"` records once that the study waits (and how to see why); a contrast T1 from another
    frame of reference fills its role but cannot share the T1's grid: the job is skipped with that reason."""
    node = node_factory(workers={"processes": 1}, series={"stable_seconds": 1, "check_interval_seconds": 0.2},
                        models={"enhancement": model(enhancement_model, optional_inputs=[])},
                        routes=[route(missing_role="wait", study_wait_seconds=2)])
    node.start()
    session = mr_session()
    study_uid = session["t1"].study_uid
    _send(node, session["t1"], tmp_path / "t1")
    _send(node, session["flair"], tmp_path / "flair")
    (waiting,) = node.wait_for(lambda: _events(node, "study-waiting", study_uid), what="the study to wait for t1c")
    assert f"dicom-ai-node roles {study_uid}" in waiting["message"]
    (route_shown,) = node.json("roles", study_uid)
    assert (route_shown["state"], route_shown["missing"]) == ("waiting", ["t1c"])
    other_session = MRPhantom(**{**vars(session["t1c"]), "frame_of_reference_uid": generate_uid(),
                                 "series_uid": generate_uid()})
    _send(node, other_session, tmp_path / "other")
    (job,) = node.wait_for(lambda: node.json("jobs", "--state", "skipped"), timeout=120, what="the skipped job")
    assert "another FrameOfReferenceUID" in job["error"] and "t1c" in job["error"]
    assert len(_events(node, "study-waiting", study_uid)) == 1


def test_headers_that_lie_about_their_sequence_match_no_role_that_asks_for_it(tmp_path):
    """An EchoTime that is not a number, a ScanningSequence of junk, a file that is not DICOM: routing reads what
    it can and the roles that ask for those attributes do not match (never an exception in the routing stage)."""
    ds = MRPhantom(slices=2).dataset(0)
    ds.EchoTime = "12345.67"  # placeholders of the lying values' lengths, replaced in the written bytes
    ds.InversionTime = "1234.567"
    ds.ScanningSequence = ["IR", "", "  ", "XX"]
    ds.SliceThickness = ""
    path = tmp_path / "liar.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes().replace(b"12345.67", b"abc     ").replace(b"1234.567", b"1e999999")
                     .replace(b"\\XX", b"\\\x00 "))
    sequence = read_sequence(path)
    assert sequence.echo_time is None and sequence.slice_thickness is None
    assert "IR" in sequence.scanning_sequence and "" not in sequence.scanning_sequence
    study = RouteConfig(**route())
    facts = SeriesFacts("1.2.3", "MR", None, "FLAIR", frozenset({pydicom.uid.MRImageStorage}), frozenset(), 2,
                        sequence, 2)
    assert roles_of(study, facts) == []  # the flair role wants an echo time and an inversion time in range
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"\x00" * 10)
    assert read_sequence(not_dicom) == SequenceFacts()
