"""The node's embedded default model: classical CT tissue segmentation (body, lungs, bone) in torch.

Hounsfield-unit thresholds, morphology and connected components, nothing learned: it lets a fresh
node produce a meaningful SEG end to end with no model download.  Every step is a tensor operation,
so the same code runs on a GPU when there is one.  Not validated and not for clinical use.

Speed comes from a two-level design: thresholds and final boundaries are computed on the full
grid, while the decisions that need neighbourhoods (morphology, connected components, sizes) are
taken on a coarse grid of ~3 mm cells and broadcast back.  Per-slice hole filling works at full
resolution where it matters: the coarse grid settles every cell that is all air or all body, and
the cells that straddle the skin are flooded voxel by voxel.

Known limits: a table touching the skin over more than a few millimetres joins the body; air in
the mouth, nose or bowel that is enclosed and not connected to outside air in any slice counts as
lung; iodinated contrast above 300 HU counts as bone; lung vessels within ~3 mm of the pleura are
left out of the lung mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from dicom_ai_node.inference.model import resolve_device
from dicom_ai_node.inference.segmentation import CodedConcept, Segment, Segmentation
from dicom_ai_node.inference.volume import Volume

# Segmented Property Category (CID 7150) and Type codes, with DICOM's code meanings.
ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
TISSUE = CodedConcept("85756007", "SCT", "Tissue")

# The one table of what `predict` returns, in mask order.  Bone is "Tissue"/"Bone" (CID 7191 via
# CID 7166) because a density threshold finds bone tissue anywhere, not one named bone.
# Hues far apart (green, blue, yellow), so lungs and bone read apart at a glance over grey CT.  The body is
# context, not a finding: painted over the whole image it washes out what lies beneath, so it is measured and
# outlined in the SR but left out of the SEG.
SEGMENTS: tuple[Segment, ...] = (
    Segment(1, "Body", ANATOMICAL_STRUCTURE, CodedConcept("38266002", "SCT", "Entire body"), (60, 180, 75),
            in_seg=False),
    Segment(2, "Lungs", ANATOMICAL_STRUCTURE, CodedConcept("39607008", "SCT", "Lung"), (0, 130, 200)),
    Segment(3, "Bone", TISSUE, CodedConcept("272673000", "SCT", "Bone"), (255, 225, 25)),
)


class BuiltinCTModel:
    """Classical CT tissue segmentation: thresholds + morphology + connected components.

    Not a learned model and not for clinical use.  Segments, in order: body, lungs, bone.
    """

    name = "builtin-ct-tissue"
    version = "1.1"  # 1.1: body out of the SEG, colours of distinct hues
    identity = version  # its code is its weights: a change to what it returns comes with a new version

    BODY_MIN_HU = -500.0  # body is denser than this; lung air and outside air are not
    BONE_MIN_HU = 300.0  # above soft tissue and unenhanced blood; below cortical and most trabecular bone
    CELL_MM = 3.0  # target coarse cell size for the neighbourhood decisions
    MIN_LUNG_ML = 1.0  # smaller enclosed air pockets are noise or gas, not lung
    MIN_BONE_ML = 0.5  # smaller dense specks are noise or calcifications
    BONE_CELL_FRACTION = 0.25  # a coarse cell seeds bone only if this much of it is dense (noise robustness)

    def __init__(self, device: str = "auto", cpu_threads: int | None = 1) -> None:
        """`cpu_threads` caps torch's intra-op threads during `predict` on CPU.  The model is hundreds
        of short tensor ops, which lose more to thread synchronisation than they gain as soon as other
        processes compete for the cores (on 2 busy cores: ~1 s with 1 thread, ~4 s with 2 for
        200x512x512).  None leaves torch's process-wide setting alone."""
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be None or at least 1, not {cpu_threads}")
        self.device = resolve_device(device)
        self.cpu_threads = cpu_threads

    def describe(self) -> str:
        """What this model is, in one paragraph, for logs and listings shown to users."""
        return (
            f"{self.name} {self.version}: classical CT segmentation of body, lungs and bone from "
            f"Hounsfield thresholds (body > {self.BODY_MIN_HU:g} HU, lungs <= {self.BODY_MIN_HU:g} HU inside the "
            f"body, bone > {self.BONE_MIN_HU:g} HU), morphology and connected components. Not a learned model; "
            "not validated; not for clinical use."
        )

    def predict(self, volume: Volume) -> Segmentation:
        """Segment a CT volume; masks are on exactly the volume's grid."""
        if volume.modality != "CT":
            raise ValueError(f"{self.name} segments CT only, not {volume.modality}: its thresholds are in HU")
        if volume.pixels.ndim != 3 or 0 in volume.pixels.shape:
            raise ValueError(f"expected a non-empty (slices, rows, columns) volume, got shape {volume.pixels.shape}")
        axes = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)[::-1]  # affine columns are (i, j, k); pixels are (k, j, i)
        voxel_ml = volume.voxel_volume_ml
        if not np.all(np.isfinite(spacing)) or voxel_ml <= 0:
            raise ValueError("the volume's affine has a degenerate voxel size")
        factor = tuple(min(n, max(1, round(self.CELL_MM / s))) for n, s in zip(volume.pixels.shape, spacing))
        grid = _Grid(volume.pixels.shape, factor)

        threads = self.cpu_threads if self.device.type == "cpu" else None
        with torch.inference_mode(), _intra_op_threads(threads):
            hu = torch.as_tensor(np.ascontiguousarray(volume.pixels, dtype=np.float32)).to(self.device)
            solid = grid.threshold(hu, self.BODY_MIN_HU)
            body = _body(solid, grid)
            lungs = _lungs(solid, body, grid, voxel_ml, self.MIN_LUNG_ML)
            del solid
            dense = grid.threshold(hu, self.BONE_MIN_HU)
            dense &= body
            bone = _bone(dense, grid, voxel_ml, self.MIN_BONE_ML, self.BONE_CELL_FRACTION)
            masks = torch.empty((len(SEGMENTS), *volume.pixels.shape), dtype=torch.bool, device=self.device)
            for out, mask in zip(masks, (body, lungs, bone)):
                out.copy_(grid.crop(mask))
        return Segmentation(
            masks=masks.cpu().numpy(), segments=list(SEGMENTS), algorithm_name=self.name, algorithm_version=self.version
        )


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op thread count set for the block and restored after; None leaves it alone."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class _Grid:
    """The full-resolution grid, padded to whole coarse cells of `factor` voxels per axis.

    Full-resolution masks live in the padded shape so that a cell view is a free reshape; the
    padding replicates the last slice/row/column, so partial cells behave like their neighbours.
    """

    shape: tuple[int, int, int]
    factor: tuple[int, int, int]

    @property
    def cells(self) -> tuple[int, int, int]:
        return tuple(-(-n // f) for n, f in zip(self.shape, self.factor))

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(c * f for c, f in zip(self.cells, self.factor))

    def threshold(self, hu: torch.Tensor, level: float) -> torch.Tensor:
        mask = torch.empty(self.padded, dtype=torch.bool, device=hu.device)
        d, h, w = self.shape
        torch.gt(hu, level, out=mask[:d, :h, :w])
        mask[d:, :h, :w] = mask[d - 1 : d, :h, :w]
        mask[:, h:, :w] = mask[:, h - 1 : h, :w]
        mask[:, :, w:] = mask[:, :, w - 1 : w]
        return mask

    def crop(self, mask: torch.Tensor) -> torch.Tensor:
        d, h, w = self.shape
        return mask[:d, :h, :w]

    def blocks(self, mask: torch.Tensor) -> torch.Tensor:
        """(cz, fz, cy, fy, cx, fx) view of a padded full-resolution tensor."""
        (cz, cy, cx), (fz, fy, fx) = self.cells, self.factor
        return mask.view(cz, fz, cy, fy, cx, fx)

    def spread(self, cells: torch.Tensor) -> torch.Tensor:
        """A per-cell tensor shaped to broadcast against `blocks`."""
        return cells[:, None, :, None, :, None]

    def restrict(self, mask: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The full-resolution `mask` where its cell is set in `cells`."""
        return (self.blocks(mask) & self.spread(cells)).view(self.padded)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        return self._pool(mask, torch.Tensor.logical_or_)

    def all(self, mask: torch.Tensor) -> torch.Tensor:
        return self._pool(mask, torch.Tensor.logical_and_)

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """Set voxels per cell."""
        dtype = torch.uint8 if math.prod(self.factor) <= 255 else torch.int32
        return self._pool(mask.view(torch.uint8), torch.Tensor.add_, dtype)

    def _pool(
        self,
        x: torch.Tensor,
        combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        # Folds one axis at a time with elementwise ops on strided views: a reduction over a
        # short inner axis (2-4 voxels) is several times slower on CPU.
        for axis in (2, 1, 0):
            f = self.factor[axis]
            if f > 1:
                strided = x.unflatten(axis, (x.shape[axis] // f, f))
                out = strided.select(axis + 1, 0).to(dtype or x.dtype, copy=True)
                for k in range(1, f):
                    combine(out, strided.select(axis + 1, k))
                x = out
        return x


def _dilate(mask: torch.Tensor, axes: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    """Max filter with a box of 3 along each of `axes` (separable max pooling on bool)."""
    for axis in axes:
        n = mask.shape[axis]
        out = mask.clone()
        out.narrow(axis, 1, n - 1).logical_or_(mask.narrow(axis, 0, n - 1))
        out.narrow(axis, 0, n - 1).logical_or_(mask.narrow(axis, 1, n - 1))
        mask = out
    return mask


def _erode(mask: torch.Tensor, axes: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    """Min filter with a box of 3 along `axes`; beyond the array counts as set, so structures cut
    by the field of view are not eaten from the scan's edges."""
    for axis in axes:
        n = mask.shape[axis]
        out = mask.clone()
        out.narrow(axis, 1, n - 1).logical_and_(mask.narrow(axis, 0, n - 1))
        out.narrow(axis, 0, n - 1).logical_and_(mask.narrow(axis, 1, n - 1))
        mask = out
    return mask


def _label(mask: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Connected components, face-connected along `axes`.

    Each set voxel gets the smallest flat index in its component; unset voxels get mask.numel().
    Runs along the last axis are collapsed in one scan; then roots are hooked to their smallest
    neighbouring root and chains are shortened by pointer jumping over the roots only, so the
    number of passes over the grid grows with the shape's complexity, not its diameter.
    """
    shape, n, last = mask.shape, mask.numel(), mask.ndim - 1
    index = torch.arange(n, device=mask.device).view(shape)
    if last in axes and shape[last] > 1:
        starts = mask.clone()
        starts[..., 1:] &= ~mask[..., :-1]
        first = torch.where(starts, index, -1).cummax(dim=last).values
        axes = tuple(axis for axis in axes if axis != last)
    else:
        starts, first = mask, index
    parent = torch.cat([torch.where(mask, first, n).reshape(-1), index.new_full((1,), n)])
    roots = starts.reshape(-1).nonzero().squeeze(1)
    while axes and roots.numel():
        labels = parent[:n].view(shape).clone()
        lowest = labels.clone()
        for axis in axes:
            size = shape[axis]
            if size > 1:
                head, tail = lowest.narrow(axis, 0, size - 1), lowest.narrow(axis, 1, size - 1)
                torch.minimum(head, labels.narrow(axis, 1, size - 1), out=head)
                torch.minimum(tail, labels.narrow(axis, 0, size - 1), out=tail)
        # Every label is a root, so hooking it to its lowest neighbour never raises it; the
        # background slot collects junk from voxels next to the mask and is reset.
        parent.scatter_reduce_(0, labels.reshape(-1), lowest.reshape(-1), reduce="amin")
        parent[n] = n
        hooked = parent.index_select(0, roots)
        if torch.equal(hooked, roots):
            break
        while True:
            jumped = parent.index_select(0, hooked)
            if torch.equal(jumped, hooked):
                break
            parent.index_copy_(0, roots, jumped)
            hooked = jumped
        parent[:n] = parent.index_select(0, parent[:n])
        roots = roots[hooked == roots]
    return parent[:n].view(shape)


def _component_totals(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-label cell counts (or sums of `weights`), indexed by label; the background slot is 0."""
    n = labels.numel()
    flat_weights = None if weights is None else weights.reshape(-1).double()
    totals = torch.bincount(labels.reshape(-1), weights=flat_weights, minlength=n + 1)
    totals[n] = 0
    return totals


def _selected(labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Cells whose label is chosen (`chosen` is indexed by label); the background slot never is."""
    chosen[labels.numel()] = False
    return chosen[labels]


def _body(solid: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """The largest 3-D component of dense voxels, after a closing and opening that bridge gaps in
    the skin and detach the table, with its holes filled slice by slice."""
    cells = grid.any(solid)
    region = _dilate(_erode(_erode(_dilate(cells))))
    if not bool(region.any()):
        return torch.zeros_like(solid)
    labels = _label(region, (0, 1, 2))
    sizes = _component_totals(labels)
    keep = _dilate(labels == torch.argmax(sizes))  # the opening's rim back
    return _fill_holes_per_slice(grid.restrict(solid, keep), grid)


def _fill_holes_per_slice(body: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Body plus everything not 4-connected, within its slice, to the slice's border.

    Cells of pure air are labelled on the coarse grid; cells straddling the skin are then flooded
    voxel by voxel from the outside, so the skin is exact at full resolution.  An air space that
    reaches the outside only through a gap narrower than a cell (lips slightly apart) stays filled.
    """
    any_body, all_body = grid.any(body), grid.all(body)
    air = ~any_body
    labels = _label(air, (1, 2))
    n = labels.numel()
    on_border = torch.zeros(n + 1, dtype=torch.bool, device=body.device)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        on_border[edge.reshape(-1)] = True
    on_border[n] = False
    outside = on_border[labels]
    filled = grid.blocks(body) | grid.spread(~outside)
    mixed = any_body & ~all_body
    if bool(mixed.any()):
        cz, cy, cx = mixed.nonzero(as_tuple=True)
        reached = _flood_mixed_cells(~grid.blocks(body)[cz, :, cy, :, cx, :], (cz, cy, cx), outside)
        filled[cz, :, cy, :, cx, :] = ~reached
    return filled.view(grid.padded)


def _flood_mixed_cells(
    air: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor, torch.Tensor], outside: torch.Tensor
) -> torch.Tensor:
    """Air voxels of the given cells (m, fz, fy, fx) reached in-plane from outside cells or the image edge.

    One voxel step per pass, but only over the cells along the skin, which are reached within a
    few passes unless a skin fold runs deep into the body.
    """
    m = air.shape[0]
    cz, cy, cx = where
    from_outside, from_nothing = m, m + 1
    ids = torch.full((outside.shape[0], outside.shape[1] + 2, outside.shape[2] + 2), from_outside, device=air.device)
    inner = ids[:, 1:-1, 1:-1]
    inner[~outside] = from_nothing
    inner[cz, cy, cx] = torch.arange(m, device=air.device)
    up, down = ids[cz, cy, cx + 1], ids[cz, cy + 2, cx + 1]
    left, right = ids[cz, cy + 1, cx], ids[cz, cy + 1, cx + 2]
    state = torch.zeros((m + 2, *air.shape[1:]), dtype=torch.bool, device=air.device)
    state[from_outside] = True
    while True:
        reached = state[:m]
        grown = reached.clone()
        grown[:, :, 1:, :].logical_or_(reached[:, :, :-1, :])
        grown[:, :, :-1, :].logical_or_(reached[:, :, 1:, :])
        grown[:, :, :, 1:].logical_or_(reached[:, :, :, :-1])
        grown[:, :, :, :-1].logical_or_(reached[:, :, :, 1:])
        grown[:, :, 0, :].logical_or_(state[up, :, -1, :])
        grown[:, :, -1, :].logical_or_(state[down, :, 0, :])
        grown[:, :, :, 0].logical_or_(state[left, :, :, -1])
        grown[:, :, :, -1].logical_or_(state[right, :, :, 0])
        grown &= air
        if torch.equal(grown, reached):
            return reached
        state[:m] = grown


def _lungs(solid: torch.Tensor, body: torch.Tensor, grid: _Grid, voxel_ml: float, min_ml: float) -> torch.Tensor:
    """Air inside the body, without components open to the outside air through another slice,
    after an opening that drops specks and thin channels, and without components under `min_ml`;
    plus the vessels and specks deep inside it, since the coded concept is the organ."""
    candidate = body & ~solid
    outside = ~body
    touching = torch.zeros_like(candidate)
    torch.logical_and(candidate[1:], outside[:-1], out=touching[1:])
    touching[:-1].logical_or_(candidate[:-1] & outside[1:])
    cells = grid.any(candidate)
    region = _dilate(_erode(cells))
    labels = _label(region, (0, 1, 2))
    volume_ml = _component_totals(labels, grid.count(candidate)) * voxel_ml
    open_to_air = torch.zeros_like(volume_ml, dtype=torch.bool)
    open_to_air[labels[grid.any(touching) & region]] = True
    keep = _selected(labels, (volume_ml >= min_ml) & ~open_to_air)
    for _ in range(2):  # regrow into the thin tips the opening trimmed, within the candidate air
        keep = _dilate(keep) & cells
    # Cells a cell or more inside the closed lung are lung whatever their density (vessels, noise);
    # nearer the surface only air counts, which keeps the pleural boundary at full resolution.
    interior = _erode(_erode(_dilate(keep)))
    return (grid.blocks(candidate) & grid.spread(keep) | grid.spread(interior)).view(grid.padded)


def _bone(dense: torch.Tensor, grid: _Grid, voxel_ml: float, min_ml: float, cell_fraction: float) -> torch.Tensor:
    """Dense voxels in 3-D components of at least `min_ml`, seeded from cells that are mostly dense."""
    counts = grid.count(dense)
    cells = counts >= max(1, math.ceil(cell_fraction * math.prod(grid.factor)))
    labels = _label(cells, (0, 1, 2))
    volume_ml = _component_totals(labels, counts) * voxel_ml
    keep = _dilate(_selected(labels, volume_ml >= min_ml))  # the partly dense cells at the rim
    return grid.restrict(dense, keep)
