"""What presentation states and secondary captures draw of a result: outlines and boxes per slice, in layers.

A viewer that shows no SEG still shows a presentation state (GSPS) or plain images (secondary captures); both
draw the same marks, made here once from the model's segmentation or detections.  Coordinates are image pixel
coordinates (column, row), (0, 0) the top left corner of the top left pixel, as SCOORD and GSPS have them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.multival import MultiValue

from ..inference.findings import Detection, Detections
from ..inference.segmentation import PALETTE, Segmentation
from ..inference.volume import Volume
from .contours import largest_cross_section, region_outlines

# The window a CT is shown in when its images carry none: soft tissue.
CT_WINDOW = (40.0, 400.0)
# Regions smaller than this (pixels) are specks a reader cannot see at the scale of the image: not outlined.
MIN_REGION_PIXELS = 4


@dataclass(frozen=True)
class Layer:
    """One thing drawn: a segment, or one type of finding, in one colour, with its line for a legend."""

    name: str  # "Lungs", "Nodule"
    colour: tuple[int, int, int]
    legend: str  # "Lungs 1811.2 mL", "Nodule: 2 found"


@dataclass(frozen=True)
class Mark:
    """A closed polyline (an outline or a box) on slice `slice_index`, in layer `layer`, with a label or not."""

    layer: int  # index into Drawing.layers
    slice_index: int
    polyline: np.ndarray  # (points, 2) of (column, row); the last point is the first
    text: str | None = None


@dataclass
class Drawing:
    layers: list[Layer]
    marks: list[Mark]
    key_slices: list[int]  # where a reader looks first: each segment's largest cross-section, each finding's centre


def segmentation_drawing(segmentation: Segmentation, volume: Volume, key_slices_only: bool = False) -> Drawing:
    """Every region of each segment the SEG holds, outlined on every slice it is on, or on the key slices only
    (what secondary captures show); context segments such as the whole body are not drawn, as in the SEG."""
    drawn = [(segment, mask) for segment, mask in zip(segmentation.segments, segmentation.masks) if segment.in_seg]
    layers = [Layer(segment.label, segment.color_rgb, f"{segment.label} {volume_ml(mask, volume):.1f} mL")
              for segment, mask in drawn]
    key_slices: list[int] = []
    for _, mask in drawn:
        section = largest_cross_section(mask)
        if section is not None and section.slice_index not in key_slices:
            key_slices.append(section.slice_index)
    marks = []
    for index, (_, mask) in enumerate(drawn):
        slices = key_slices if key_slices_only else np.flatnonzero(mask.any(axis=(1, 2)))
        for k in slices:
            marks += [Mark(index, int(k), polyline) for polyline in region_outlines(mask[k], MIN_REGION_PIXELS)]
    return Drawing(layers, marks, key_slices)


def volume_ml(mask: np.ndarray, volume: Volume) -> float:
    """The volume of a mask on the volume's grid, in mL."""
    return np.count_nonzero(mask) * volume.voxel_volume_ml


def detections_drawing(detections: Detections, volume: Volume) -> Drawing:
    """Each finding's box (or a small square around its centre) on the slice nearest its centre, labelled with its
    name and certainty; one layer per type of finding."""
    layers: list[Layer] = []
    marks, key_slices = [], []
    for detection in detections.findings:
        names = [layer.name for layer in layers]
        if detection.type.meaning not in names:
            count = sum(finding.type == detection.type for finding in detections.findings)
            layers.append(Layer(detection.type.meaning, PALETTE[len(layers) % len(PALETTE)],
                                f"{detection.type.meaning}: {count} found"))
            names.append(detection.type.meaning)
        k, graphic_type, points = detection_region(volume, detection)
        if graphic_type == "POINT":  # a small square around it, within the image
            (column, row), half = points[0], 2.0
            c0, c1 = max(column - half, 0.0), min(column + half, float(volume.shape[2]))
            r0, r1 = max(row - half, 0.0), min(row + half, float(volume.shape[1]))
            points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
        marks.append(Mark(names.index(detection.type.meaning), k, points, f"{detection.label} {detection.score:.0%}"))
        if k not in key_slices:
            key_slices.append(k)
    return Drawing(layers, marks, key_slices)


def detection_region(volume: Volume, detection: Detection) -> tuple[int, str, np.ndarray]:
    """Where a finding is drawn: the slice nearest its centre, and on it its box (a closed POLYLINE of 5 points,
    the box's corners projected on the image) or, without a box, its centre (a POINT)."""
    inverse = np.linalg.inv(volume.affine)
    k = volume.index_of(detection.centre_lps)[0]

    def pixels(points_lps: np.ndarray) -> np.ndarray:
        """(column, row) image coordinates of patient points: voxel (i, j) centres are at (i + 0.5, j + 0.5)."""
        voxels = (inverse @ np.c_[points_lps, np.ones(len(points_lps))].T)[:2].T
        return voxels + 0.5

    centre = pixels(np.array([detection.centre_lps]))
    if detection.box_lps is None:
        return k, "POINT", centre
    low, high = detection.box_lps
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    limits = np.array([volume.shape[2], volume.shape[1]], dtype=np.float64)  # (columns, rows): the image's far edge
    projected = np.clip(pixels(corners), 0.0, limits)  # a box reaching past the image is drawn to its edge
    (c0, r0), (c1, r1) = projected.min(axis=0), projected.max(axis=0)
    if c1 - c0 <= 0 or r1 - r0 <= 0:  # a box with no extent in this plane: its centre says as much
        return k, "POINT", centre
    return k, "POLYLINE", np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])


def within_the_series(detections: Detections, volume: Volume) -> tuple[Detections, list[Detection]]:
    """The findings whose centre lies in the volume, and those a model placed outside it (which no image can
    show: a model's error, reported, not drawn)."""
    inside, outside = [], []
    for detection in detections.findings:
        try:
            volume.index_of(detection.centre_lps)
        except IndexError:
            outside.append(detection)
        else:
            inside.append(detection)
    kept = Detections(inside, detections.target, detections.category, detections.algorithm_name,
                      detections.algorithm_version)
    return kept, outside


def display_window(volume: Volume) -> tuple[float, float] | None:
    """(centre, width) the images are shown in: their own default window, else a soft-tissue window for CT;
    None when neither says (the viewer's own choice, or the pixel range)."""
    first = volume.sources[0]
    if first.get("WindowCenter") is not None and first.get("WindowWidth") is not None:
        # The first of several windows is the one the images are shown in by default.
        centre, width = (first.WindowCenter, first.WindowWidth)
        return (float(centre[0] if isinstance(centre, MultiValue) else centre),
                float(width[0] if isinstance(width, MultiValue) else width))
    return CT_WINDOW if volume.modality == "CT" else None
