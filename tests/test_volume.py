"""load_volume: slices on their exact patient-space grid, checked against the phantom's known anatomy.

The phantom is made asymmetric (lungs off-centre in x and z) so that a flipped axis or a reversed
slice order cannot pass: every voxel of a loaded volume must show what the phantom has at that
voxel's patient coordinate.
"""

from __future__ import annotations

import copy
import random
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import dcmtk, venv_tool
from pydicom.uid import BasicTextSRStorage, EnhancedCTImageStorage, JPEGLSLossless, RLELossless, generate_uid

from dicom_ai_node.inference.volume import Volume, VolumeError, load_volume
from dicom_ai_node.phantoms.ct import (
    HU_AIR,
    HU_BONE,
    HU_LUNG,
    HU_SOFT_TISSUE,
    CTPhantom,
    PhantomGeometry,
    oblique_orientation,
)

# Right lung centred at x = -75, left at x = +60, both at z = +15: no mirror symmetry in x or z.
ASYMMETRIC = {"geometry": PhantomGeometry(lung_centres_x=(-75.0, 60.0)), "lung_z_centre": 15.0}
# Non-square pixels (1.0 mm between rows, 1.6 mm between columns), rows != columns; covers the whole body
# and, over 44 x 5 mm, both lungs.
GRID = {"slices": 44, "rows": 240, "columns": 210, "pixel_spacing": (1.0, 1.6), "slice_spacing": 5.0}

# Patient points (LPS mm) well inside one structure, with the HU a correct loader shows there.
PROBES = [
    ((0.0, 75.0, 0.0), HU_BONE),  # centre of the spine
    ((0.0, 75.0, 80.0), HU_BONE),
    ((-75.0, -5.0, 15.0), HU_LUNG),  # centre of the right lung
    ((-110.0, -5.0, 15.0), HU_LUNG),  # lateral right lung ...
    ((110.0, -5.0, 15.0), HU_SOFT_TISSUE),  # ... whose mirror image is not lung
    ((-75.0, -5.0, 85.0), HU_LUNG),  # top of the lungs ...
    ((-75.0, -5.0, -85.0), HU_SOFT_TISSUE),  # ... whose mirror image in z is below them
    ((0.0, -40.0, 0.0), HU_SOFT_TISSUE),
    ((0.0, -116.0, 0.0), HU_AIR),  # in front of the body
    ((150.0, 90.0, -50.0), HU_AIR),  # outside the ellipse, inside the field of view
]


def _phantom(**kwargs) -> CTPhantom:
    return CTPhantom(**{**GRID, **ASYMMETRIC, **kwargs})


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[CTPhantom, list[Path]]]:
    """The series every geometry test loads: written once per module."""
    root = tmp_path_factory.mktemp("volumes")
    phantoms = {
        "head-first": _phantom(),
        "feet-first": CTPhantom.feet_first(**GRID, **ASYMMETRIC),
        "oblique": _phantom(orientation=oblique_orientation(20.0)),
    }
    return {name: (phantom, phantom.write(root / name)) for name, phantom in phantoms.items()}


def _shuffled(paths: list[Path], seed: int = 7) -> list[Path]:
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _voxel_centres(volume: Volume) -> np.ndarray:
    """Patient coordinates of every voxel, shape (slices, rows, columns, 3), from the volume's own affine."""
    k, j, i = np.indices(volume.shape)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ volume.affine.T)[..., :3]


def assert_matches_phantom(volume: Volume, phantom: CTPhantom) -> None:
    """Every voxel holds the phantom's HU at its patient coordinate, and the probe points map right."""
    truth = phantom.hu_at(_voxel_centres(volume))
    mismatched = np.count_nonzero(truth != volume.pixels)
    assert mismatched <= volume.pixels.size * 1e-4, f"{mismatched} of {volume.pixels.size} voxels differ"
    half_diagonal = np.linalg.norm(volume.spacing) / 2
    for point, hu in PROBES:
        k, j, i = volume.index_of(point)
        centre = (volume.affine @ [i, j, k, 1])[:3]
        assert np.linalg.norm(centre - point) <= half_diagonal + 1e-9, point
        assert volume.pixels[k, j, i] == hu, f"{point}: {volume.pixels[k, j, i]} HU, expected {hu}"


def assert_analytic_volumes(volume: Volume, phantom: CTPhantom) -> None:
    """Structure volumes from thresholds match the exact ones: validates all three spacings."""
    expected = phantom.geometry.analytic_volumes_ml(phantom.scan_length_mm)
    body = volume.pixels > -950  # all but air (-1000): the lungs (-850) are inside the body
    measured = {
        "body": np.count_nonzero(body),
        "lungs": np.count_nonzero(body & (volume.pixels < -500)),
        "bone": np.count_nonzero(volume.pixels > 300),
    }
    for name, count in measured.items():
        ml = count * volume.voxel_volume_ml
        assert ml == pytest.approx(expected[name], rel=0.03), f"{name}: {ml:.1f} mL, expected {expected[name]:.1f}"


def _normal_distances(volume: Volume) -> np.ndarray:
    normal = np.cross(volume.affine[:3, 0], volume.affine[:3, 1])
    normal /= np.linalg.norm(normal)
    return np.array([np.dot(ds.ImagePositionPatient, normal) for ds in volume.sources])


def test_shuffled_files_and_instance_numbers_load_in_position_order(tmp_path):
    phantom = _phantom(slices=12, rows=40, columns=36, pixel_spacing=(6.0, 9.0), slice_spacing=20.0)
    paths = phantom.write(tmp_path)
    instance_numbers = _shuffled(list(range(1, 13)))
    for path, number in zip(paths, instance_numbers, strict=True):  # InstanceNumber no longer follows position
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(path)

    volume = load_volume(_shuffled(paths))

    distances = _normal_distances(volume)
    assert np.all(np.diff(distances) > 0)
    assert np.allclose(distances, [np.dot(phantom.slice_origin(i), phantom.normal) for i in range(12)], atol=1e-3)
    assert np.allclose(volume.affine[:3, 3], volume.sources[0].ImagePositionPatient)
    assert [frame.sop_instance_uid for frame in volume.frames] == [ds.SOPInstanceUID for ds in volume.sources]
    assert all(frame.frame_number is None for frame in volume.frames)
    assert all("PixelData" not in ds for ds in volume.sources)
    assert (volume.study_instance_uid, volume.series_instance_uid, volume.modality) == (
        phantom.study_uid,
        phantom.series_uid,
        "CT",
    )
    assert volume.frame_of_reference_uid == volume.sources[0].FrameOfReferenceUID
    assert volume.pixels.dtype == np.float32
    assert_matches_phantom(volume, phantom)


def test_non_square_pixels(written):
    phantom, paths = written["head-first"]
    volume = load_volume(_shuffled(paths))

    assert volume.shape == (44, 240, 210)
    assert volume.spacing == pytest.approx((1.6, 1.0, 5.0))  # (column, row, slice) spacing
    assert volume.voxel_volume_ml == pytest.approx(1.6 * 1.0 * 5.0 / 1000)
    assert np.allclose(volume.affine[:3, :3], np.diag([1.6, 1.0, 5.0]))
    assert_matches_phantom(volume, phantom)
    assert_analytic_volumes(volume, phantom)


def test_feet_first(written):
    phantom, paths = written["feet-first"]
    volume = load_volume(_shuffled(paths))

    # Rows run towards the patient's right and slices ascend along the normal, i.e. from the head down.
    assert np.allclose(volume.affine[:3, :3], np.diag([-1.6, 1.0, -5.0]))
    assert volume.sources[0].InstanceNumber == 1 and volume.sources[0].PatientPosition == "FFS"
    assert volume.affine[2, 3] == pytest.approx((GRID["slices"] - 1) / 2 * GRID["slice_spacing"])
    assert_matches_phantom(volume, phantom)
    assert_analytic_volumes(volume, phantom)


def test_oblique_orientation(written):
    phantom, paths = written["oblique"]
    volume = load_volume(_shuffled(paths))

    row, column = np.array(phantom.orientation[:3]), np.array(phantom.orientation[3:])
    assert np.allclose(volume.affine[:3, 0], row * 1.6)
    assert np.allclose(volume.affine[:3, 1], column * 1.0)
    assert np.allclose(volume.affine[:3, 2], np.cross(row, column) * 5.0)
    assert volume.spacing == pytest.approx((1.6, 1.0, 5.0))
    assert_matches_phantom(volume, phantom)


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [venv_tool("dciodvfy"), str(path)], check=False, capture_output=True, text=True, timeout=120
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_enhanced_ct_multi_frame(written, tmp_path):
    phantom, paths = written["head-first"]
    frame_order = _shuffled(list(range(phantom.slices)))  # frame n holds slice frame_order[n]
    path = phantom.write_multiframe(tmp_path / "enhanced.dcm", frame_order)
    assert _dciodvfy_errors(path) == []

    volume = load_volume([path])
    single_frame = load_volume(paths)

    assert np.array_equal(volume.pixels, single_frame.pixels)
    assert np.allclose(volume.affine, single_frame.affine)
    assert [frame.frame_number for frame in volume.frames] == [frame_order.index(k) + 1 for k in range(44)]
    assert {frame.sop_class_uid for frame in volume.frames} == {EnhancedCTImageStorage}
    (header,) = volume.sources
    assert "PixelData" not in header and header.NumberOfFrames == 44
    assert_matches_phantom(volume, phantom)
    assert_analytic_volumes(volume, phantom)


@pytest.mark.parametrize(
    ("program", "options", "syntax"),
    [("dcmcrle", [], RLELossless), ("dcmcjpls", ["+el"], JPEGLSLossless)],
)
def test_compressed_series_loads_identical(tmp_path, program, options, syntax):
    phantom = _phantom(slices=8, rows=64, columns=48, pixel_spacing=(4.0, 7.0), slice_spacing=10.0, noise_hu=20.0)
    paths = phantom.write(tmp_path / "plain")
    compressed = []
    for path in paths:
        target = tmp_path / f"{path.stem}-{program}.dcm"
        subprocess.run([dcmtk(program), *options, str(path), str(target)], check=True, capture_output=True)
        assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        compressed.append(target)

    plain, decoded = load_volume(paths), load_volume(_shuffled(compressed))

    assert np.array_equal(decoded.pixels, plain.pixels)
    assert np.array_equal(decoded.affine, plain.affine)


def test_to_metatensor(written):
    _, paths = written["feet-first"]
    volume = load_volume(paths)
    tensor = volume.to_metatensor()

    assert tuple(tensor.shape) == (1, 210, 240, 44)  # (channel, columns, rows, slices)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    assert np.allclose(tensor.affine.numpy(), ras)
    assert tensor.meta["space"] == "RAS"
    k, j, i = volume.index_of((-75.0, -5.0, 15.0))
    assert tensor[0, i, j, k] == volume.pixels[k, j, i] == HU_LUNG
    # The voxel's RAS coordinate is its LPS coordinate with x and y negated.
    lps = volume.affine @ [i, j, k, 1]
    assert np.allclose(tensor.affine.numpy() @ [i, j, k, 1], lps * [-1, -1, 1, 1])


def test_to_metatensor_matches_monai_reading_nifti(written, tmp_path):
    """The same image written as NIfTI and read by MONAI gives the same tensor and affine."""
    nibabel = pytest.importorskip("nibabel")
    from monai.transforms import EnsureChannelFirst, LoadImage

    _, paths = written["oblique"]
    volume = load_volume(paths)
    ours = volume.to_metatensor()
    nifti = tmp_path / "volume.nii.gz"
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    nibabel.save(nibabel.Nifti1Image(volume.pixels.transpose(2, 1, 0), ras), nifti)
    monai = EnsureChannelFirst()(LoadImage(image_only=True)(nifti))

    assert torch.equal(monai.as_tensor(), ours.as_tensor())
    assert np.allclose(monai.affine.numpy(), ours.affine.numpy(), atol=1e-4)  # NIfTI keeps float32
    assert monai.meta["space"] == ours.meta["space"]


def test_index_of_outside_the_volume(written):
    _, paths = written["head-first"]
    volume = load_volume(paths)
    with pytest.raises(IndexError, match="outside the volume"):
        volume.index_of((0.0, 0.0, 500.0))


# --- what is refused, and why -------------------------------------------------------------------------------

SMALL = {"slices": 6, "rows": 16, "columns": 16, "pixel_spacing": (20.0, 20.0), "slice_spacing": 10.0}


def _new_uid(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _set(index: int, **attributes):
    def change(datasets, phantom):
        for keyword, value in attributes.items():
            setattr(datasets[index], keyword, value)
        return datasets

    return change


def _delete(index: int, keyword: str):
    def change(datasets, phantom):
        delattr(datasets[index], keyword)
        return datasets

    return change


def _not_an_image(datasets, phantom):
    ds = datasets[4]
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    return datasets


REFUSED = {
    "mixed orientations": (_set(3, ImageOrientationPatient=list(oblique_orientation(10.0))), "mixed orientations"),
    "mixed rows/columns": (
        lambda datasets, phantom: datasets[:2] + [replace(phantom, rows=20).dataset(2)] + datasets[3:],
        "mixed Rows/Columns: 16x16, 20x16",
    ),
    "mixed pixel spacing": (_set(2, PixelSpacing=[20.0, 21.0]), r"mixed pixel spacing: .*\[20.0, 21.0\]"),
    "duplicate position": (
        lambda datasets, phantom: datasets + [_new_uid(datasets[2])],
        "duplicate slice position -5.000 mm along the normal",
    ),
    "missing slice": (
        lambda datasets, phantom: datasets[:3] + datasets[4:],
        r"uneven slice spacing: gaps range from 10.000 to 20.000 mm \(mean 12.500 mm\)",
    ),
    "localizer": (_set(0, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "is a localizer"),
    "single slice": (lambda datasets, phantom: datasets[:1], r"only 1 slice\(s\); a volume needs at least 2"),
    "missing position": (_delete(1, "ImagePositionPatient"), "is missing ImagePositionPatient"),
    "missing orientation": (_delete(5, "ImageOrientationPatient"), "is missing ImageOrientationPatient"),
    "missing pixel spacing": (_delete(0, "PixelSpacing"), "is missing PixelSpacing"),
    "missing frame of reference": (_delete(0, "FrameOfReferenceUID"), "is missing FrameOfReferenceUID"),
    "malformed orientation": (
        _set(0, ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
        "not two orthogonal unit vectors",
    ),
    "not an image": (_not_an_image, f"has no PixelData: SOP class {BasicTextSRStorage} is not an image"),
    "mixed frames of reference": (
        _set(1, FrameOfReferenceUID=generate_uid()),
        "mixed frames of reference: FrameOfReferenceUID takes 2 values",
    ),
    "mixed series": (
        lambda datasets, phantom: datasets[:5] + [replace(phantom, series_uid=generate_uid()).dataset(5)],
        "mixed series: SeriesInstanceUID takes 2 values",
    ),
    "gantry tilt": (
        lambda datasets, phantom: list(replace(phantom, gantry_tilt_deg=15.0).datasets()),
        r"gantry tilt: .* \(about 15.0 degrees\)",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_reason(tmp_path, case):
    change, reason = REFUSED[case]
    phantom = CTPhantom(**SMALL)
    datasets = change(list(phantom.datasets()), phantom)
    paths = []
    for n, ds in enumerate(datasets):
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with pytest.raises(VolumeError, match=reason):
        load_volume(paths)


def test_fewer_slices_than_required(tmp_path):
    paths = CTPhantom(**SMALL).write(tmp_path)
    with pytest.raises(VolumeError, match=r"only 6 slice\(s\); a volume needs at least 16"):
        load_volume(paths, min_slices=16)


def test_small_gantry_tilt_within_tolerance_is_not_refused(tmp_path):
    """Positions rounded in the header wobble by micrometres; that is not a tilt."""
    paths = CTPhantom(**SMALL, gantry_tilt_deg=0.01).write(tmp_path)
    assert load_volume(paths).shape == (6, 16, 16)


def test_unreadable_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not DICOM")
    with pytest.raises(VolumeError, match="notes.txt: cannot be read as DICOM"):
        load_volume([path])


def test_no_instances():
    with pytest.raises(VolumeError, match="no instances"):
        load_volume([])


def test_multi_frame_refusals(tmp_path):
    phantom = CTPhantom(**SMALL)

    duplicate = phantom.write_multiframe(tmp_path / "duplicate.dcm", [0, 1, 2, 2, 3, 4, 5])
    with pytest.raises(VolumeError, match="duplicate slice position .*: frame 3 of .* and frame 4 of"):
        load_volume([duplicate])

    ds = phantom.enhanced_dataset()
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(tmp_path / "no-position.dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match="frame 3 of instance .* is missing PlanePositionSequence"):
        load_volume([tmp_path / "no-position.dcm"])

    mixed = [phantom.write_multiframe(tmp_path / "enhanced.dcm"), *phantom.write(tmp_path / "single")]
    with pytest.raises(VolumeError, match=r"1 multi-frame instance\(s\) among 7 instances"):
        load_volume(mixed)
