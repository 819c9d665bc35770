"""The embedded CT model against the phantom, whose anatomy is known analytically.

Volumes are built directly from `CTPhantom` (no DICOM round trip) with realistic noise, so the
thresholds are tested honestly; volumes are mask voxels x the voxel volume from the affine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_ai_node.inference.builtin import SEGMENTS, BuiltinCTModel
from dicom_ai_node.inference.model import resolve_device
from dicom_ai_node.inference.segmentation import CodedConcept
from dicom_ai_node.inference.volume import SourceFrame, Volume
from dicom_ai_node.phantoms.ct import HU_AIR, CTPhantom

TOLERANCE = 0.03
NAMES = ("body", "lungs", "bone")


def phantom(**overrides) -> CTPhantom:
    """A quick chest phantom: 60 slices of 256x256, 1.4 mm pixels, 4 mm slices, 20 HU noise."""
    settings = {"slices": 60, "rows": 256, "columns": 256, "pixel_spacing": (1.4, 1.4), "slice_spacing": 4.0}
    return CTPhantom(**(settings | {"noise_hu": 20.0} | overrides))


def volume_of(ph: CTPhantom, pixels: np.ndarray | None = None) -> Volume:
    row, column = np.array(ph.orientation[:3]), np.array(ph.orientation[3:])
    affine = np.eye(4)
    affine[:3, 0] = row * ph.pixel_spacing[1]  # column index i steps along the row direction
    affine[:3, 1] = column * ph.pixel_spacing[0]
    affine[:3, 2] = ph.normal * ph.slice_spacing
    affine[:3, 3] = ph.slice_origin(0)
    if pixels is None:
        pixels = np.stack([ph.slice_hu(k) for k in range(ph.slices)]).astype(np.float32)
    frames = [SourceFrame("1.2.840.10008.5.1.4.1.1.2", f"2.25.{k + 1}", None) for k in range(ph.slices)]
    return Volume(pixels, affine, frames, [], "2.25.100", ph.study_uid, ph.series_uid, "CT")


def patient_coordinates(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS x, y, z of every voxel, as arrays broadcasting to the pixel shape."""
    slices, rows, columns = volume.pixels.shape
    k = np.arange(slices)[:, None, None]
    j = np.arange(rows)[None, :, None]
    i = np.arange(columns)[None, None, :]
    a = volume.affine
    return tuple(a[axis, 0] * i + a[axis, 1] * j + a[axis, 2] * k + a[axis, 3] for axis in range(3))


def labels_at(volume: Volume, masks: np.ndarray, lps: tuple[float, float, float]) -> set[str]:
    i, j, k = np.rint(np.linalg.solve(volume.affine, [*lps, 1.0])[:3]).astype(int)
    return {name for name, mask in zip(NAMES, masks) if mask[k, j, i]}


def volumes_ml(volume: Volume, masks: np.ndarray) -> dict[str, float]:
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    return {name: float(mask.sum()) * voxel_ml for name, mask in zip(NAMES, masks)}


def assert_volumes_close(measured: dict[str, float], expected: dict[str, float]) -> None:
    errors = {name: (measured[name] - expected[name]) / expected[name] for name in NAMES}
    assert all(abs(e) <= TOLERANCE for e in errors.values()), {n: f"{100 * e:+.2f}%" for n, e in errors.items()}


@pytest.fixture(scope="module")
def model() -> BuiltinCTModel:
    return BuiltinCTModel("cpu")


@pytest.fixture(scope="module")
def chest(model):
    ph = phantom()
    volume = volume_of(ph)
    return ph, volume, model.predict(volume)


@pytest.mark.parametrize("pixel_spacing", [(1.4, 1.4), (0.9, 1.3)], ids=["square", "anisotropic"])
def test_volumes_match_the_analytic_anatomy(model, pixel_spacing):
    ph = phantom(pixel_spacing=pixel_spacing)
    volume = volume_of(ph)
    seg = model.predict(volume)
    assert_volumes_close(volumes_ml(volume, seg.masks), ph.geometry.analytic_volumes_ml(ph.scan_length_mm))


def test_non_axial_slices(model):
    """Sagittal slices: holes are filled per sagittal slice and the body runs off the top and bottom."""
    ph = phantom(slices=100, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    volume = volume_of(ph)
    seg = model.predict(volume)
    z_extent_mm = ph.rows * ph.pixel_spacing[0]
    assert_volumes_close(volumes_ml(volume, seg.masks), ph.geometry.analytic_volumes_ml(z_extent_mm))


def test_known_points_carry_the_right_labels(chest):
    ph, volume, seg = chest
    geometry = ph.geometry
    right_lung = (geometry.lung_centres_x[0], geometry.lung_centre_y, ph.lung_z_centre)  # LPS: right is -x
    assert labels_at(volume, seg.masks, right_lung) == {"body", "lungs"}
    assert labels_at(volume, seg.masks, (*geometry.spine_centre, 40.0)) == {"body", "bone"}
    assert labels_at(volume, seg.masks, (0.0, -80.0, -20.0)) == {"body"}  # anterior soft tissue
    assert labels_at(volume, seg.masks, (150.0, 100.0, 0.0)) == set()  # air beside the body


def test_segmentation_matches_the_declared_segments(chest, model):
    ph, _, seg = chest
    assert seg.masks.dtype == np.bool_
    assert seg.masks.shape == (3, ph.slices, ph.rows, ph.columns)
    assert (seg.algorithm_name, seg.algorithm_version) == ("builtin-ct-tissue", model.version)
    assert seg.segments == list(SEGMENTS)
    assert [s.number for s in seg.segments] == [1, 2, 3]
    assert [s.label for s in seg.segments] == ["Body", "Lungs", "Bone"]
    anatomy = CodedConcept("91723000", "SCT", "Anatomical Structure")
    assert [(s.category, s.type) for s in seg.segments] == [
        (anatomy, CodedConcept("38266002", "SCT", "Entire body")),
        (anatomy, CodedConcept("39607008", "SCT", "Lung")),
        (CodedConcept("85756007", "SCT", "Tissue"), CodedConcept("272673000", "SCT", "Bone")),
    ]
    assert all(len(s.color_rgb) == 3 and all(0 <= c <= 255 for c in s.color_rgb) for s in seg.segments)


def test_table_open_air_and_small_specks_are_rejected(model):
    """A table below the patient, a tunnel of outside air that is enclosed only in some slices,
    a small air bubble and a small dense speck must not change body, lungs or bone."""
    ph = phantom()
    volume = volume_of(ph)
    x, y, z = patient_coordinates(volume)
    pixels = volume.pixels
    noise = np.random.default_rng(7).normal(0, 20, pixels.shape).astype(np.float32)
    table = np.broadcast_to((y > 125) & (y < 140), pixels.shape)
    pixels[table] = 100 + noise[table]
    tunnel = (x**2 + (y + 85) ** 2 < 8**2) & (z > -110) & (z < -30)
    mouth = (np.abs(x) < 4) & (y < -85) & (z > -110) & (z < -90)  # opens the tunnel's lower end to the air
    bubble = x**2 + (y + 60) ** 2 + (z - 50) ** 2 < 3**2
    for region in (tunnel, mouth, bubble):
        region = np.broadcast_to(region, pixels.shape)
        pixels[region] = HU_AIR + noise[region]
    speck = np.broadcast_to((x + 100) ** 2 + (y - 60) ** 2 + z**2 < 3**2, pixels.shape)
    pixels[speck] = 700 + noise[speck]

    seg = model.predict(volume)
    assert labels_at(volume, seg.masks, (0.0, 132.0, 0.0)) == set()  # table
    assert labels_at(volume, seg.masks, (0.0, -85.0, -60.0)) == {"body"}  # enclosed part of the tunnel
    assert labels_at(volume, seg.masks, (0.0, -85.0, -100.0)) == set()  # open part of the tunnel
    assert labels_at(volume, seg.masks, (0.0, -60.0, 50.0)) == {"body"}  # bubble
    assert labels_at(volume, seg.masks, (-100.0, 60.0, 0.0)) == {"body"}  # speck
    expected = ph.geometry.analytic_volumes_ml(ph.scan_length_mm)
    assert_volumes_close(volumes_ml(volume, seg.masks), expected)


def test_all_air_gives_empty_masks(model):
    ph = phantom(slices=8, rows=64, columns=64)
    pixels = (HU_AIR + np.random.default_rng(0).normal(0, 20, (8, 64, 64))).astype(np.float32)
    seg = model.predict(volume_of(ph, pixels))
    assert seg.masks.shape == (3, 8, 64, 64)
    assert not seg.masks.any()


def test_only_ct_is_segmented(model, chest):
    _, volume, _ = chest
    mr = Volume(volume.pixels, volume.affine, volume.frames, [], "1", "2", "3", "MR")
    with pytest.raises(ValueError, match="CT only"):
        model.predict(mr)


def test_device_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert BuiltinCTModel().device.type == expected
    assert BuiltinCTModel("cpu").device == torch.device("cpu")
    for bad in ("tpu", "gpu0", ""):
        with pytest.raises(ValueError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            BuiltinCTModel("cuda:0")


def test_cpu_threads_are_restored(chest):
    _, volume, _ = chest
    before = torch.get_num_threads()
    BuiltinCTModel("cpu", cpu_threads=1).predict(volume)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        BuiltinCTModel("cpu", cpu_threads=0)


def test_describe_is_honest(model):
    text = model.describe().lower()
    assert "not a learned model" in text and "not for clinical use" in text
