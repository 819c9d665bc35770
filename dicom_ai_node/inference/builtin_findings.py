"""The node's built-in demo detector and classifier for CT: lung nodule candidates, and contrast or not.

Like the built-in tissue model (builtin.py), whose body, lungs and bone they start from, they are classical image
processing, nothing learned: they let a fresh node show detection and classification results end to end with no
model download.  They are demonstrations of what the node does with such results, NOT models to read patients by:
not validated, not for clinical use.

Known limits.  Nodule candidates are dense blobs enclosed by lung in their slices: a nodule touching the pleura or
the mediastinum is missed, and a vessel seen across (a blob in every slice it crosses) is found as a candidate.
The contrast classifier counts enhanced-looking soft tissue (150-300 HU) away from bone: calcified plaques and
dense organs count as contrast, and an early or weak bolus is called non-contrast.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from dicom_ai_node.inference.builtin import BuiltinCTModel
from dicom_ai_node.inference.findings import (
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Classification,
    ClassScore,
    Detection,
    Detections,
    Point,
)
from dicom_ai_node.inference.segmentation import CodedConcept
from dicom_ai_node.inference.volume import Volume

NODULE = CodedConcept("27925004", "SCT", "Nodule")
CONTRAST_AGENT = CodedConcept("7140000", "SCT", "Contrast agent")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")

# One plane of 4-neighbours: connectivity within each slice, none across slices.
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


class BuiltinLungNoduleModel:
    """Solid blobs enclosed by lung, 3 to 30 mm across, as nodule candidates scored by how round they are.

    Not a learned model and not for clinical use.
    """

    name = "builtin-ct-lung-nodules"
    version = "1.0"
    identity = version  # its code is its weights: a change to what it returns comes with a new version

    SOLID_MIN_HU = -300.0  # denser than aerated lung: a solid or part-solid nodule
    MIN_DIAMETER_MM = 3.0  # smaller blobs are noise
    MAX_DIAMETER_MM = 30.0  # larger are masses or anatomy, not nodules

    def __init__(self, device: str = "auto", cpu_threads: int | None = 1) -> None:
        self.tissue = BuiltinCTModel(device, cpu_threads)
        self.device = self.tissue.device

    def describe(self) -> str:
        return (
            f"{self.name} {self.version}: lung nodule candidates: blobs denser than {self.SOLID_MIN_HU:g} HU "
            f"enclosed by lung in their slices, {self.MIN_DIAMETER_MM:g} to {self.MAX_DIAMETER_MM:g} mm across, "
            "scored by roundness. Not a learned model; not validated; not for clinical use."
        )

    def predict(self, volume: Volume) -> Detections:
        lungs = self.tissue.predict(volume).masks[1]
        found = Detections([], NODULE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, self.name, self.version)
        if not lungs.any():
            return found
        # A nodule is dense tissue with lung on every side of it, slice by slice: inside the lungs with their
        # holes filled (the tissue model may leave it out of the lungs or not), not on their edge.
        outside, _ = ndimage.label(~lungs, structure=_IN_PLANE)
        border = np.zeros_like(lungs)
        border[:, [0, -1], :] = border[:, :, [0, -1]] = True
        touching = np.unique(outside[border])
        filled = ~np.isin(outside, touching[touching != 0])  # label 0 is the lung itself, not what lies outside it
        interior = ndimage.binary_erosion(filled, structure=_IN_PLANE)
        dense = filled & (volume.pixels > self.SOLID_MIN_HU)
        blobs, _ = ndimage.label(dense)
        voxel_mm3 = volume.voxel_volume_ml * 1000.0
        candidates = []
        for index, box in enumerate(ndimage.find_objects(blobs), start=1):
            blob = blobs[box] == index
            if not interior[box][blob].all():
                continue  # on the lung's edge: chest wall, mediastinum, or a nodule this model cannot tell from them
            diameter = (6.0 * blob.sum() * voxel_mm3 / math.pi) ** (1 / 3)
            if not self.MIN_DIAMETER_MM <= diameter <= self.MAX_DIAMETER_MM:
                continue
            # A ball fills pi/6 of its bounding box; flatter or longer blobs (vessels) fill less of theirs.
            roundness = min(1.0, float(blob.mean()) / (math.pi / 6))
            k, j, i = (c + s.start for c, s in zip(ndimage.center_of_mass(blob), box))
            candidates.append((roundness, _lps(volume, (i, j, k)), _box_lps(volume, box)))
        for number, (score, centre, box_lps) in enumerate(sorted(candidates, key=lambda c: -c[0]), start=1):
            found.findings.append(Detection(f"Nodule {number}", NODULE, round(score, 3), centre, box_lps))
        return found


class BuiltinContrastModel:
    """Contrast-enhanced or not, from how much soft tissue looks enhanced (150-300 HU) away from bone.

    Not a learned model and not for clinical use.
    """

    name = "builtin-ct-contrast"
    version = "1.0"
    identity = version

    ENHANCED_HU = (150.0, 300.0)  # iodinated blood and enhancing organs; above unenhanced tissue, below bone
    BONE_MARGIN_MM = 3.0  # partial volume at bone edges looks enhanced too
    HALF_ML = 15.0  # this much enhanced tissue: probability 0.5
    SPREAD_ML = 3.0  # the logistic's scale

    def __init__(self, device: str = "auto", cpu_threads: int | None = 1) -> None:
        self.tissue = BuiltinCTModel(device, cpu_threads)
        self.device = self.tissue.device

    def describe(self) -> str:
        low, high = self.ENHANCED_HU
        return (
            f"{self.name} {self.version}: contrast-enhanced CT or not, from the volume of soft tissue between "
            f"{low:g} and {high:g} HU more than {self.BONE_MARGIN_MM:g} mm from bone (probability 0.5 at "
            f"{self.HALF_ML:g} mL). Not a learned model; not validated; not for clinical use."
        )

    def predict(self, volume: Volume) -> Classification:
        body, lungs, bone = self.tissue.predict(volume).masks
        low, high = self.ENHANCED_HU
        enhanced = body & ~lungs & (volume.pixels > low) & (volume.pixels < high)
        enhanced &= ~_dilated(bone, volume, self.BONE_MARGIN_MM)
        millilitres = float(enhanced.sum()) * volume.voxel_volume_ml
        present = 1.0 / (1.0 + math.exp(-(millilitres - self.HALF_ML) / self.SPREAD_ML))
        return Classification(
            CONTRAST_AGENT,
            [ClassScore(PRESENT, present), ClassScore(ABSENT, 1.0 - present)],
            self.name,
            self.version,
        )


def _lps(volume: Volume, ijk: tuple[float, float, float]) -> Point:
    x, y, z = (volume.affine @ [*ijk, 1.0])[:3]
    return float(x), float(y), float(z)


def _box_lps(volume: Volume, box: tuple[slice, slice, slice]) -> tuple[Point, Point]:
    """The patient-axes box around voxels `box` (k, j, i slices), to their outer faces."""
    k, j, i = box
    corners = np.array([[a - 0.5, b - 0.5, c - 0.5, 1.0] for a in (i.start, i.stop) for b in (j.start, j.stop)
                        for c in (k.start, k.stop)])
    points = (volume.affine @ corners.T)[:3].T
    low, high = points.min(axis=0), points.max(axis=0)
    return (float(low[0]), float(low[1]), float(low[2])), (float(high[0]), float(high[1]), float(high[2]))


def _dilated(mask: np.ndarray, volume: Volume, margin_mm: float) -> np.ndarray:
    """`mask` grown by about `margin_mm` along each axis (a box neighbourhood: max pooling, fast on any size)."""
    column_mm, row_mm, slice_mm = volume.spacing
    reach = [max(0, round(margin_mm / spacing)) for spacing in (slice_mm, row_mm, column_mm)]
    grown = torch.from_numpy(mask)[None, None].float()
    grown = torch.nn.functional.max_pool3d(grown, [2 * r + 1 for r in reach], stride=1, padding=reach)
    return grown[0, 0].numpy() > 0
