"""Series -> volume: decoded, rescaled pixels on their exact patient-space grid.

The grid comes from the geometry of every slice, never from InstanceNumber, SliceThickness or
the first two slices, and anything that is not one regular stack is refused with the reason:
a model run on a wrongly assembled volume yields results that look plausible and are misplaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import scipy.ndimage
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

if TYPE_CHECKING:
    from monai.data import MetaTensor

# Direction cosines that differ by more than this are different orientations.
_ORIENTATION_TOLERANCE = 1e-4
_PIXEL_SPACING_TOLERANCE_MM = 1e-4
# Slices closer than this along the normal are the same position.
_DUPLICATE_TOLERANCE_MM = 0.01
# A slice may sit this far off the uniform grid: max(absolute, fraction of the slice spacing).
_GRID_TOLERANCE_MM = 0.1
_GRID_TOLERANCE_FRACTION = 0.05
# Slices may drift sideways (across the normal) by this fraction of a pixel over the whole stack;
# more is a tilted stack, which would need resampling to lie on a grid.
_TILT_TOLERANCE_PIXELS = 0.1
# LPS (DICOM) to RAS (NIfTI, MONAI): x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """The instances cannot form one volume; the message says precisely why."""


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of a Volume came from."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance; None for a single-frame instance


@dataclass
class Volume:
    """A 3-D image on an exact grid.

    `pixels[k, j, i]` is slice k, row j, column i, rescaled (HU for CT).
    `affine` maps the voxel index (i, j, k) = (column, row, slice) to patient LPS millimetres:
        affine @ [i, j, k, 1] = ImagePositionPatient of slice k + i * column step + j * row step.
    Slices are ordered by position along the slice normal (row x column direction), ascending.
    """

    pixels: np.ndarray  # float32, shape (slices, rows, columns)
    affine: np.ndarray  # float64, shape (4, 4)
    frames: list[SourceFrame]  # frames[k] is the source of pixels[k]
    sources: list[Dataset]  # the source instances' headers (no pixel data), in slice order for single-frame
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    # For a model that reads several series by role: one array per input channel, on this grid, in the model's
    # order (`with_roles`); None: `pixels` is the only channel.
    channels: list[np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns), the shape of `pixels`."""
        slices, rows, columns = self.pixels.shape
        return slices, rows, columns

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: (column spacing, row spacing, slice spacing)."""
        i, j, k = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(i), float(j), float(k)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL, for turning voxel counts into structure volumes."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_of(self, point_lps: Sequence[float]) -> tuple[int, int, int]:
        """(k, j, i) of the voxel containing a patient point, for indexing `pixels`; IndexError outside."""
        i, j, k = np.rint(np.linalg.solve(self.affine, [*map(float, point_lps), 1.0])[:3]).astype(int)
        slices, rows, columns = self.shape
        if not (0 <= k < slices and 0 <= j < rows and 0 <= i < columns):
            raise IndexError(f"patient point {tuple(point_lps)} lies outside the volume (voxel {i}, {j}, {k})")
        return int(k), int(j), int(i)

    def to_metatensor(self) -> MetaTensor:
        """The volume as MONAI's LoadImage + EnsureChannelFirst would give it: (1, i, j, k), RAS affine.

        The tensor shares memory with `pixels` (no copy of a 200 MB series); copy before changing it in place.
        """
        import torch
        from monai.data import MetaTensor
        from monai.utils import SpaceKeys

        ras = _LPS_TO_RAS @ self.affine
        meta = {
            "original_affine": ras.copy(),
            "spatial_shape": np.array(self.pixels.shape[::-1]),
            "space": SpaceKeys.RAS,
            # what EnsureChannelFirst records for "no channel", or for channels first
            "original_channel_dim": float("nan") if self.channels is None else 0,
            "filename_or_obj": self.series_instance_uid,
        }
        if self.channels is None:
            array = torch.from_numpy(self.pixels.transpose(2, 1, 0)[np.newaxis])
        else:
            array = torch.from_numpy(np.stack(self.channels).transpose(0, 3, 2, 1))
        return MetaTensor(array, affine=torch.from_numpy(ras), meta=meta)


def with_roles(reference: Volume, roles: dict[str, Volume | None]) -> Volume:
    """`reference` with one channel per role, in the dict's order: each role's volume on the reference grid
    (linear interpolation, zeros outside it), a role without a volume all zeros."""
    channels = [np.zeros_like(reference.pixels) if volume is None else on_grid(volume, reference, role)
                for role, volume in roles.items()]
    return dataclasses.replace(reference, channels=channels)


def on_grid(volume: Volume, onto: Volume, role: str) -> np.ndarray:
    """`volume`'s pixels resampled onto `onto`'s grid through patient space; the same array when the grids are
    the same.  Series of different frames of reference share no patient space: refused (they need a
    registration the node does not do)."""
    if volume.frame_of_reference_uid != onto.frame_of_reference_uid:
        raise VolumeError(
            f"the {role} series {volume.series_instance_uid} has another FrameOfReferenceUID than series "
            f"{onto.series_instance_uid} (the patient moved or was scanned in another session): its voxels cannot be "
            "matched without a registration"
        )
    if volume.shape == onto.shape and _same_corners(volume, onto):
        return volume.pixels
    mapping = np.linalg.solve(volume.affine, onto.affine)  # onto's (i, j, k) -> volume's (i, j, k)
    axes = [2, 1, 0]  # arrays are indexed (k, j, i)
    return scipy.ndimage.affine_transform(
        volume.pixels, mapping[:3, :3][np.ix_(axes, axes)], mapping[:3, 3][axes], output_shape=onto.shape,
        order=1, mode="constant", cval=0.0,
    ).astype(np.float32)


def _same_corners(volume: Volume, onto: Volume) -> bool:
    """The grids' corner voxels lie within _GRID_TOLERANCE_MM of each other in the patient: a spacing or angle
    difference too small to see in the affine grows with the index, so the corners are compared."""
    slices, rows, columns = volume.shape
    corners = np.array([[i, j, k, 1.0] for i in (0, columns - 1) for j in (0, rows - 1) for k in (0, slices - 1)])
    return bool(np.abs(corners @ volume.affine.T - corners @ onto.affine.T).max() <= _GRID_TOLERANCE_MM)


@dataclass(frozen=True)
class _Plane:
    """Geometry and rescale of one slice, whichever kind of instance it came from."""

    label: str  # names the slice in error messages
    position: np.ndarray
    row_direction: np.ndarray  # ImageOrientationPatient[:3], the direction of increasing column index
    column_direction: np.ndarray  # ImageOrientationPatient[3:], the direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float


def load_volume(paths: Sequence[Path], min_slices: int = 2) -> Volume:
    """Read one series (single-frame slices, or one multi-frame instance) into a Volume.

    `min_slices` is the fewest slices accepted; never fewer than 2, as one slice has no third dimension.
    Raises VolumeError, with the reason, when the instances do not form one regular stack.
    """
    if not paths:
        raise VolumeError("no instances given")
    datasets = [_read(Path(path)) for path in paths]
    for ds in datasets:
        _check_image(ds)
    _check_same(datasets, "SeriesInstanceUID", "mixed series")
    _check_same(datasets, "FrameOfReferenceUID", "mixed frames of reference")
    multi_frame = [ds for ds in datasets if _is_multi_frame(ds)]
    if multi_frame and len(datasets) > 1:
        raise VolumeError(
            f"{len(multi_frame)} multi-frame instance(s) among {len(datasets)} instances: "
            "a volume is either one multi-frame instance or a stack of single-frame instances"
        )
    if multi_frame:
        return _multi_frame_volume(datasets[0], min_slices)
    return _single_frame_volume(datasets, min_slices)


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # any reader failure means the same thing here: not a usable instance
        raise VolumeError(f"{path}: cannot be read as DICOM: {exc}") from exc


def _name(ds: Dataset) -> str:
    return f"instance {ds.get('SOPInstanceUID', '(no SOPInstanceUID)')}"


def _check_image(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise VolumeError(f"{_name(ds)} has no PixelData: SOP class {ds.get('SOPClassUID', '(none)')} is not an image")
    image_type = [str(value).upper() for value in _values(ds.get("ImageType"))]
    if "LOCALIZER" in image_type:
        raise VolumeError(f"{_name(ds)} is a localizer (ImageType {'/'.join(image_type)}), not part of a volume")
    if ds.get("SamplesPerPixel", 1) != 1:
        raise VolumeError(f"{_name(ds)} has {ds.SamplesPerPixel} samples per pixel; only greyscale forms a volume")
    for keyword in ("Rows", "Columns", "FrameOfReferenceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if ds.get(keyword) in (None, ""):
            raise VolumeError(f"{_name(ds)} is missing {keyword}")


def _values(value: object) -> list:
    """A DICOM value as a list, whether it is absent, single or multiple."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _check_same(datasets: list[Dataset], keyword: str, reason: str) -> None:
    values = sorted({str(ds.get(keyword)) for ds in datasets})
    if len(values) > 1:
        raise VolumeError(f"{reason}: {keyword} takes {len(values)} values ({', '.join(values[:3])})")


def _frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{_name(ds)} has a malformed NumberOfFrames {ds.NumberOfFrames!r}") from exc


def _is_multi_frame(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or _frame_count(ds) > 1


def _numbers(owner: Dataset | None, keyword: str, count: int, label: str) -> np.ndarray:
    """A numeric multi-valued attribute, or a VolumeError naming what is missing or malformed."""
    values = _values(owner.get(keyword)) if owner is not None else []
    if not values:
        raise VolumeError(f"{label} is missing {keyword}")
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{label} has a non-numeric {keyword} {values}") from exc
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise VolumeError(f"{label} has {keyword} {values}; expected {count} finite numbers")
    return numbers


def _plane(
    label: str,
    position_owner: Dataset | None,
    orientation_owner: Dataset | None,
    spacing_owner: Dataset | None,
    rescale_owner: Dataset | None,
) -> _Plane:
    """Parse one slice's geometry; each owner is the dataset or functional group item holding it."""
    position = _numbers(position_owner, "ImagePositionPatient", 3, label)
    orientation = _numbers(orientation_owner, "ImageOrientationPatient", 6, label)
    spacing = _numbers(spacing_owner, "PixelSpacing", 2, label)
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise VolumeError(
            f"{label} has ImageOrientationPatient {orientation.tolist()}: not two orthogonal unit vectors"
        )
    if np.any(spacing <= 0):
        raise VolumeError(f"{label} has PixelSpacing {spacing.tolist()}: spacing must be positive")
    # Absent rescale (e.g. MR) means stored values are the values.
    has = rescale_owner is not None and "RescaleSlope" in rescale_owner and "RescaleIntercept" in rescale_owner
    slope = _numbers(rescale_owner, "RescaleSlope", 1, label)[0] if has else 1.0
    intercept = _numbers(rescale_owner, "RescaleIntercept", 1, label)[0] if has else 0.0
    return _Plane(
        label=label,
        position=position,
        row_direction=row / np.linalg.norm(row),
        column_direction=column / np.linalg.norm(column),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=float(slope),
        intercept=float(intercept),
    )


def _grid(planes: list[_Plane], min_slices: int) -> tuple[list[int], np.ndarray]:
    """Check that the planes form one regular stack; return their order along the normal and the affine."""
    if len(planes) < max(min_slices, 2):
        raise VolumeError(
            f"only {len(planes)} slice(s); a volume needs at least {max(min_slices, 2)} (a single slice is not 3-D)"
        )
    first = planes[0]
    for plane in planes[1:]:
        if (
            np.abs(plane.row_direction - first.row_direction).max() > _ORIENTATION_TOLERANCE
            or np.abs(plane.column_direction - first.column_direction).max() > _ORIENTATION_TOLERANCE
        ):
            raise VolumeError(
                f"mixed orientations: {first.label} has ImageOrientationPatient "
                f"{np.r_[first.row_direction, first.column_direction].round(6).tolist()}, {plane.label} has "
                f"{np.r_[plane.row_direction, plane.column_direction].round(6).tolist()}"
            )
        if np.abs(np.subtract(plane.pixel_spacing, first.pixel_spacing)).max() > _PIXEL_SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"mixed pixel spacing: {first.label} has PixelSpacing {list(first.pixel_spacing)}, "
                f"{plane.label} has {list(plane.pixel_spacing)}"
            )

    normal = np.cross(first.row_direction, first.column_direction)
    normal /= np.linalg.norm(normal)
    positions = np.array([plane.position for plane in planes])
    distances = positions @ normal
    order = [int(n) for n in np.argsort(distances, kind="stable")]
    distances = distances[order]
    positions = positions[order]

    gaps = np.diff(distances)
    close = int(np.argmin(gaps))
    if gaps[close] < _DUPLICATE_TOLERANCE_MM:
        raise VolumeError(
            f"duplicate slice position {distances[close]:.3f} mm along the normal: "
            f"{planes[order[close]].label} and {planes[order[close + 1]].label}"
        )

    steps = positions - positions[0]
    sideways = steps - np.outer(steps @ normal, normal)
    drift = np.linalg.norm(sideways, axis=1)
    if drift.max() > _TILT_TOLERANCE_PIXELS * min(first.pixel_spacing):
        length = distances[-1] - distances[0]
        angle = np.degrees(np.arctan2(drift[-1], length))
        raise VolumeError(
            f"gantry tilt: slice positions drift {drift.max():.2f} mm across the slice normal over "
            f"{length:.1f} mm (about {angle:.1f} degrees); tilted stacks are not resampled"
        )

    slice_spacing = (distances[-1] - distances[0]) / (len(planes) - 1)
    off_grid = distances - (distances[0] + np.arange(len(planes)) * slice_spacing)
    worst = int(np.argmax(np.abs(off_grid)))
    tolerance = max(_GRID_TOLERANCE_MM, _GRID_TOLERANCE_FRACTION * slice_spacing)
    if abs(off_grid[worst]) > tolerance:
        raise VolumeError(
            f"uneven slice spacing: gaps range from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(mean {slice_spacing:.3f} mm); {planes[order[worst]].label} is {off_grid[worst]:+.3f} mm off a "
            f"uniform grid (tolerance {tolerance:.3f} mm) - missing or extra slices?"
        )

    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = first.row_direction * column_spacing
    affine[:3, 1] = first.column_direction * row_spacing
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = positions[0]
    return order, affine


def _decode(ds: Dataset, frames: int) -> np.ndarray:
    """The stored values as (frames, rows, columns)."""
    try:
        array = pixel_array(ds)
    except Exception as exc:  # decoders raise many types; all mean the pixels are unusable
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID", "(unknown)")
        raise VolumeError(f"{_name(ds)}: cannot decode pixel data ({transfer_syntax}): {exc}") from exc
    expected = (frames, int(ds.Rows), int(ds.Columns))
    if array.size != np.prod(expected) or array.ndim not in (2, 3):
        raise VolumeError(f"{_name(ds)}: decoded pixel data has shape {array.shape}, expected {expected}")
    return array.reshape(expected)


def _rescale_into(out: np.ndarray, stored: np.ndarray, plane: _Plane) -> None:
    out[...] = stored
    if plane.slope != 1.0:
        out *= np.float32(plane.slope)
    if plane.intercept != 0.0:
        out += np.float32(plane.intercept)


def _header(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _volume(
    ds: Dataset, pixels: np.ndarray, affine: np.ndarray, frames: list[SourceFrame], sources: list[Dataset]
) -> Volume:
    return Volume(
        pixels=pixels,
        affine=affine,
        frames=frames,
        sources=sources,
        frame_of_reference_uid=str(ds.FrameOfReferenceUID),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
    )


def _single_frame_volume(datasets: list[Dataset], min_slices: int) -> Volume:
    sizes = sorted({(int(ds.Rows), int(ds.Columns)) for ds in datasets})
    if len(sizes) > 1:
        raise VolumeError(f"mixed Rows/Columns: {', '.join(f'{r}x{c}' for r, c in sizes)}")
    planes = [_plane(_name(ds), ds, ds, ds, ds) for ds in datasets]
    order, affine = _grid(planes, min_slices)

    rows, columns = sizes[0]
    pixels = np.empty((len(order), rows, columns), dtype=np.float32)
    for k, index in enumerate(order):
        _rescale_into(pixels[k], _decode(datasets[index], 1)[0], planes[index])
    sources = [_header(datasets[index]) for index in order]
    frames = [SourceFrame(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None) for ds in sources]
    return _volume(sources[0], pixels, affine, frames, sources)


def _functional_group(keyword: str, per_frame: Dataset, shared: Dataset | None) -> Dataset | None:
    """The frame's item of a functional group macro: its own if present, else the shared one."""
    for owner in (per_frame, shared):
        if owner is not None and len(owner.get(keyword) or []) > 0:
            return owner[keyword][0]
    return None


def _multi_frame_volume(ds: Dataset, min_slices: int) -> Volume:
    frame_count = _frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise VolumeError(f"{_name(ds)} is multi-frame without PerFrameFunctionalGroupsSequence: no per-frame geometry")
    if len(per_frame) != frame_count:
        raise VolumeError(
            f"{_name(ds)} has {frame_count} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items"
        )
    shared_items = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_items[0] if shared_items else None

    planes = []
    for number, item in enumerate(per_frame, start=1):
        label = f"frame {number} of {_name(ds)}"
        groups = {
            keyword: _functional_group(keyword, item, shared)
            for keyword in (
                "PlanePositionSequence",
                "PlaneOrientationSequence",
                "PixelMeasuresSequence",
                "PixelValueTransformationSequence",
            )
        }
        for keyword in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
            if groups[keyword] is None:
                raise VolumeError(f"{label} is missing {keyword}")
        planes.append(
            _plane(
                label,
                groups["PlanePositionSequence"],
                groups["PlaneOrientationSequence"],
                groups["PixelMeasuresSequence"],
                groups["PixelValueTransformationSequence"],
            )
        )
    order, affine = _grid(planes, min_slices)

    stored = _decode(ds, frame_count)
    pixels = np.empty((len(order), int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    for k, index in enumerate(order):
        _rescale_into(pixels[k], stored[index], planes[index])
    header = _header(ds)
    frames = [SourceFrame(str(header.SOPClassUID), str(header.SOPInstanceUID), index + 1) for index in order]
    return _volume(header, pixels, affine, frames, [header])
