"""Outlines of segments, as the closed polylines of a SCOORD (PS3.3 C.18.6) or a presentation state draws them.

An outline follows pixel edges, not pixel centres: it encloses exactly the pixels of its region, so the area a
viewer computes from the polyline is the region's pixel count times the pixel area, and the outline can be
checked against the mask it came from.  Coordinates are (column, row) with (0, 0) the top left corner of the
top left pixel (the SCOORD convention), so pixel (row j, column i) spans [i, i + 1] x [j, j + 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class CrossSection:
    """The largest connected region of a mask on one slice, and its outline."""

    slice_index: int  # k of the volume (its source frame is Volume.frames[k])
    outline: np.ndarray  # float, (points, 2) of (column, row); closed: the last point is the first
    pixels: int  # pixels enclosed by the outline (the region with its holes filled)


def largest_cross_section(mask: np.ndarray) -> CrossSection | None:
    """The outline of the largest region on the slice where `mask` (slices, rows, columns) has most voxels.

    A radiologist asks "where is it biggest": the slice with the most voxels of the segment, and on it the
    largest region (lungs are two regions; a SCOORD draws one).  None when the mask is empty.
    """
    areas = np.array([np.count_nonzero(plane) for plane in mask])  # per plane: far faster than along an axis
    if not areas.any():
        return None
    largest = np.flatnonzero(areas == areas.max())
    k = int(largest[len(largest) // 2])  # of equal slices (a cylinder's), the middle one
    region = largest_region(mask[k])
    return CrossSection(k, outline(region), int(region.sum()))


def region_outlines(plane: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """The outline of every 4-connected region of a 2-D mask with at least `min_pixels` pixels, largest first
    (holes filled: an outline draws a region's outer edge)."""
    labels, count = ndimage.label(plane)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    order = [int(n) for n in np.argsort(sizes[1:])[::-1] + 1 if sizes[n] >= min_pixels]
    boxes = ndimage.find_objects(labels)
    outlines = []
    for number in order:
        rows, columns = boxes[number - 1]
        region = ndimage.binary_fill_holes(labels[rows, columns] == number)
        outlines.append(outline(region) + [columns.start, rows.start])
    return outlines


def largest_region(plane: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a 2-D mask, its holes filled (an outline cannot draw holes)."""
    labels, count = ndimage.label(plane)
    if count == 0:
        raise ValueError("the plane has no pixel set")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def outline(region: np.ndarray) -> np.ndarray:
    """The boundary of one 4-connected region without holes, along pixel edges, clockwise on screen.

    Every boundary edge is directed with the region on its right (screen coordinates, rows down); in such a
    region each corner starts exactly one boundary edge (two would need a background pixel enclosed by the
    region, i.e. a hole), so following the edges from corner to corner visits them all.  Corners on a
    straight run are dropped: a 512 x 512 body outline keeps its staircase corners only.
    """
    padded = np.pad(region.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    rows, columns = region.shape
    width = columns + 1  # corners per row

    def corner(row: np.ndarray, column: np.ndarray) -> np.ndarray:
        return row * width + column

    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    # (neighbour outside, start corner offset, end corner offset) per side, offsets as (row, column).
    sides = (
        (~padded[:-2, 1:-1], (0, 0), (0, 1)),  # top: left to right
        (~padded[1:-1, 2:], (0, 1), (1, 1)),  # right: downwards
        (~padded[2:, 1:-1], (1, 1), (1, 0)),  # bottom: right to left
        (~padded[1:-1, :-2], (1, 0), (0, 0)),  # left: upwards
    )
    for outside, (start_row, start_column), (end_row, end_column) in sides:
        j, i = np.nonzero(inside & outside)
        starts.append(corner(j + start_row, i + start_column))
        ends.append(corner(j + end_row, i + end_column))
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    if start.size == 0:
        raise ValueError("the region has no pixel set")
    if np.unique(start).size != start.size:
        raise ValueError("the region is not one 4-connected region without holes")
    following = np.full((rows + 1) * width, -1, dtype=np.int64)
    following[start] = end
    path = [int(start[0])]
    while (step := int(following[path[-1]])) != path[0]:
        path.append(step)
    if len(path) != start.size:
        raise ValueError("the region is not one 4-connected region without holes")
    corners = np.array(path, dtype=np.int64)
    points = np.stack([corners % width, corners // width], axis=1)
    # Keep a corner only where the direction changes.
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    turns = points[np.any(incoming != outgoing, axis=1)]
    return np.concatenate([turns, turns[:1]]).astype(np.float64)


def polygon_area(points: np.ndarray) -> float:
    """The area enclosed by a closed polyline (shoelace), in its own units squared."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)
