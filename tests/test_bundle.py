"""MONAI bundles and TorchScript models on in-memory volumes: masks land on exactly the source grid."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_ai_node.config import MonaiBundleConfig
from dicom_ai_node.inference.bundle import ANATOMICAL_STRUCTURE, MonaiBundleModel
from dicom_ai_node.inference.model import ModelUnavailable, result_identity
from dicom_ai_node.inference.segmentation import CodedConcept
from dicom_ai_node.inference.torchscript import TorchScriptModel
from dicom_ai_node.inference.volume import load_volume
from dicom_ai_node.phantoms import MRPhantom

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "demo-mr-bundle"
LUNG = CodedConcept("39607008", "SCT", "Lung")
LABELS = {"lungs": "SCT:39607008:Lung"}


def small_phantom(feet_first: bool = False, **kwargs) -> MRPhantom:
    """An MR phantom on a coarse grid unlike the network's 6 mm one, so resampling both ways is exercised."""
    grid = dict(slices=40, rows=96, columns=100, pixel_spacing=(3.75, 3.6), slice_spacing=6.0, seed=7, **kwargs)
    return MRPhantom.feet_first(**grid) if feet_first else MRPhantom(**grid)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def bundle_config(path: Path, **kwargs) -> MonaiBundleConfig:
    return MonaiBundleConfig(path=path, **{"labels": LABELS, **kwargs})


def copy_bundle(tmp_path: Path) -> Path:
    return Path(shutil.copytree(BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns("eval")))


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.fixture(scope="module")
def demo() -> MonaiBundleModel:
    return MonaiBundleModel("demo-mr", bundle_config(BUNDLE))


@pytest.fixture(scope="module")
def phantom_volume():
    phantom = small_phantom()
    volume = phantom.volume()
    return phantom, volume


def test_mr_phantom_files_load_as_the_volume_it_builds_in_memory(tmp_path):
    phantom = small_phantom(feet_first=True, noise_fraction=0.03)
    in_memory = phantom.volume()

    loaded = load_volume(phantom.write(tmp_path / "mr"))

    assert loaded.modality == "MR" and loaded.frames[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert "RescaleSlope" not in loaded.sources[0] and loaded.sources[0].MRAcquisitionType == "3D"
    assert np.array_equal(loaded.pixels, in_memory.pixels)
    assert np.allclose(loaded.affine, in_memory.affine, atol=1e-3)
    lungs = phantom.lung_mask(loaded.affine, loaded.shape)
    assert loaded.pixels[lungs].mean() < 0.2 * loaded.pixels[~lungs & (loaded.pixels > 400)].mean()


@pytest.mark.parametrize("feet_first", [False, True], ids=["HFS", "FFS"])
def test_demo_bundle_segments_lungs_on_the_source_grid(demo, feet_first):
    phantom = small_phantom(feet_first, lung_z_centre=10.0)
    volume = phantom.volume()
    pixels = volume.pixels.copy()

    segmentation = demo.predict(volume)

    assert segmentation.masks.shape == (1, *volume.shape) and segmentation.masks.dtype == bool
    assert dice(segmentation.masks[0], phantom.lung_mask(volume.affine, volume.shape)) >= 0.8
    [segment] = segmentation.segments
    assert (segment.number, segment.label, segment.type, segment.category) == (1, "lungs", LUNG, ANATOMICAL_STRUCTURE)
    assert (segmentation.algorithm_name, segmentation.algorithm_version) == ("demo-mr", "0.1.0")
    assert np.array_equal(volume.pixels, pixels), "the model changed the volume's pixels"


def test_device_auto_is_chosen_at_run_time(demo):
    assert demo.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_empty_channel_def_takes_labels_from_the_config(tmp_path, phantom_volume):
    bundle = copy_bundle(tmp_path)
    edit_json(
        bundle / "configs" / "metadata.json",
        lambda m: m["network_data_format"]["outputs"]["pred"].update(channel_def={}),
    )
    model = MonaiBundleModel("lung-model", bundle_config(bundle, labels={"lung-field": "SCT:39607008:Lung"}))
    phantom, volume = phantom_volume

    segmentation = model.predict(volume)

    assert [(s.label, s.type) for s in segmentation.segments] == [("lung-field", LUNG)]
    assert dice(segmentation.masks[0], phantom.lung_mask(volume.affine, volume.shape)) >= 0.8


def test_a_label_without_a_code_stops_loading():
    with pytest.raises(ModelUnavailable, match="'lungs' has no code"):
        MonaiBundleModel("demo-mr", bundle_config(BUNDLE, labels={"liver": "SCT:10200004:Liver"}))


def test_yaml_config_loads(tmp_path, demo, phantom_volume):
    bundle = copy_bundle(tmp_path)
    configs = bundle / "configs"
    (configs / "inference.yaml").write_text(yaml.safe_dump(json.loads((configs / "inference.json").read_text())))
    (configs / "inference.json").unlink()
    _, volume = phantom_volume

    masks = MonaiBundleModel("demo-mr", bundle_config(bundle)).predict(volume).masks

    assert np.array_equal(masks, demo.predict(volume).masks)


def test_torchscript_is_preferred_over_the_state_dict(tmp_path, demo, phantom_volume):
    bundle = copy_bundle(tmp_path)
    torch.jit.script(demo.network).save(str(bundle / "models" / "model.ts"))
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint: loading it would fail")
    _, volume = phantom_volume

    model = MonaiBundleModel("demo-mr", bundle_config(bundle))

    assert isinstance(model.network, torch.jit.ScriptModule)
    assert np.array_equal(model.predict(volume).masks, demo.predict(volume).masks)


def test_without_invertd_the_prediction_is_resampled_onto_the_source_grid(tmp_path, phantom_volume):
    bundle = copy_bundle(tmp_path)

    def drop_invertd(config: dict) -> None:
        transforms = config["postprocessing"]["transforms"]
        config["postprocessing"]["transforms"] = [t for t in transforms if t["_target_"] != "Invertd"]

    edit_json(bundle / "configs" / "inference.json", drop_invertd)
    phantom, volume = phantom_volume

    masks = MonaiBundleModel("demo-mr", bundle_config(bundle)).predict(volume).masks

    assert masks.shape == (1, *volume.shape)
    assert dice(masks[0], phantom.lung_mask(volume.affine, volume.shape)) >= 0.8


def test_save_imaged_in_the_bundle_writes_no_file(tmp_path, monkeypatch, phantom_volume):
    bundle = copy_bundle(tmp_path)
    assert '"SaveImaged"' in (bundle / "configs" / "inference.json").read_text()
    before = sorted(bundle.rglob("*"))
    workdir, scratch = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    _, volume = phantom_volume

    MonaiBundleModel("demo-mr", bundle_config(bundle)).predict(volume)

    assert sorted(bundle.rglob("*")) == before
    assert list(workdir.iterdir()) == [] and list(scratch.iterdir()) == []


class FirstHalfOfAxis0(torch.nn.Module):
    """Labels the first half of the array's first axis: shows which way the network's array faces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        first = (torch.arange(n, device=x.device) < n // 2).to(x.dtype).view(1, 1, n, 1, 1)
        first = first.expand(x.shape[0], 1, n, x.shape[3], x.shape[4])
        return torch.cat([1 - first, first], dim=1)


@pytest.mark.parametrize("orientation, left", [(None, True), ("RAS", True), ("LPS", False)])
def test_orientation_override_flips_what_the_network_sees(tmp_path, phantom_volume, orientation, left):
    """Axis 0 runs towards R in RAS, so its first half is the patient's left (+x in LPS); in LPS it is the right."""
    bundle = copy_bundle(tmp_path)
    torch.jit.script(FirstHalfOfAxis0()).save(str(bundle / "models" / "model.ts"))
    _, volume = phantom_volume

    mask = MonaiBundleModel("demo-mr", bundle_config(bundle, orientation=orientation)).predict(volume).masks[0]

    k, j, i = np.nonzero(mask)
    x_lps = (volume.affine @ np.stack([i, j, k, np.ones_like(i)]))[0]
    assert 0.4 < mask.mean() < 0.6
    assert np.mean(x_lps > 0) > 0.95 if left else np.mean(x_lps < 0) > 0.95


class Threshold(torch.nn.Module):
    """Channel 1 wins where the windowed intensity is below one half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x - 0.5, 0.5 - x], dim=1)


@pytest.fixture
def threshold_file(tmp_path) -> Path:
    path = tmp_path / "threshold.ts"
    torch.jit.script(Threshold()).save(str(path))
    return path


def test_torchscript_model_round_trips_the_geometry_exactly(threshold_file):
    """No resampling: the reorientation to RAS and back must put every voxel where it was."""
    volume = small_phantom(feet_first=True).volume()
    model = TorchScriptModel(
        "threshold",
        threshold_file,
        "auto",
        target_spacing=None,
        intensity_window=(0.0, 400.0),
        roi_size=(32, 32, 32),
        labels={"dark": "SCT:39607008:Lung"},
    )

    segmentation = model.predict(volume)

    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert segmentation.algorithm_version.startswith("sha256:")
    assert [(s.label, s.type) for s in segmentation.segments] == [("dark", LUNG)]
    assert np.array_equal(segmentation.masks[0], volume.pixels < 200)


def test_torchscript_model_resamples_to_the_target_spacing_and_back(threshold_file):
    volume = small_phantom().volume()
    model = TorchScriptModel(
        "threshold",
        threshold_file,
        "cpu",
        target_spacing=(6.0, 6.0, 6.0),
        intensity_window=(0.0, 400.0),
        roi_size=(32, 32, 32),
        labels={"dark": "SCT:39607008:Lung"},
    )

    masks = model.predict(volume).masks

    assert masks.shape == (1, *volume.shape)
    assert dice(masks[0], volume.pixels < 200) >= 0.9


def test_identity_follows_weights_configs_and_settings_not_the_version(tmp_path, demo):
    """Issue 11.5: a bundle retrained (or reconfigured) under the same metadata version must not write its SEG
    and SR under the UIDs of the first, which a PACS would take for the same objects."""
    moved = MonaiBundleModel("demo-mr", bundle_config(copy_bundle(tmp_path / "moved")))
    assert moved.identity == demo.identity and demo.identity.startswith(f"{demo.version} sha256:")

    retrained = copy_bundle(tmp_path / "retrained")
    state = torch.load(retrained / "models" / "model.pt", weights_only=True)
    state = {key: value + 0.01 if value.is_floating_point() else value for key, value in state.items()}
    torch.save(state, retrained / "models" / "model.pt")
    reconfigured = copy_bundle(tmp_path / "reconfigured")
    edit_json(reconfigured / "configs" / "inference.json",
              lambda config: config.setdefault("_comment", "a threshold changed"))
    identities = {MonaiBundleModel("demo-mr", bundle_config(path)).identity for path in (retrained, reconfigured)}
    assert demo.version == "0.1.0" and len(identities | {demo.identity}) == 3

    settings = [bundle_config(BUNDLE), bundle_config(BUNDLE, device="cpu"), bundle_config(BUNDLE, seg_type="labelmap"),
                bundle_config(BUNDLE, orientation="LPS")]
    results = [result_identity(demo, config) for config in settings]
    assert results[0] == results[1], "where it runs does not change what it writes"
    assert len(set(results)) == 3, "settings that change the objects written change their UIDs"


def test_torchscript_identity_is_its_content(threshold_file, tmp_path):
    copy = tmp_path / "copy.ts"
    copy.write_bytes(threshold_file.read_bytes())
    models = [TorchScriptModel("t", path, "cpu", None, None, (32, 32, 32), LABELS) for path in (threshold_file, copy)]
    assert models[0].identity == models[1].identity == models[0].version
    assert models[0].identity.startswith("sha256:") and len(models[0].identity) == len("sha256:") + 16
