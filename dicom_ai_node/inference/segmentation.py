"""What a model hands to the result builders: masks on the source grid and what they mean."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept, e.g. CodedConcept("39607008", "SCT", "Lung")."""

    value: str
    scheme: str
    meaning: str


# Distinct hues, readable over grey images; a model without colours of its own gives segment n
# PALETTE[(n - 1) % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG: its number, label and coded meaning (PS3.3 C.8.20.4)."""

    number: int  # 1-based, in the order of Segmentation.masks
    label: str
    category: CodedConcept  # Segmented Property Category, e.g. SCT 91723000 "Anatomical structure"
    type: CodedConcept  # Segmented Property Type, e.g. SCT 39607008 "Lung"
    color_rgb: tuple[int, int, int]  # recommended display colour
    # False for context a radiologist does not want painted over the image (the whole body): measured in the
    # SR, outlined there on its largest cross-section, but not a segment of the SEG.
    in_seg: bool = True


@dataclass
class Segmentation:
    """Binary masks on exactly the grid of the Volume they were computed from.

    `masks[n]` belongs to `segments[n]`; masks may overlap (a lung is inside the body).
    """

    masks: np.ndarray  # bool, shape (n_segments, slices, rows, columns)
    segments: list[Segment]
    algorithm_name: str
    algorithm_version: str

    def __post_init__(self) -> None:
        if self.masks.ndim != 4 or self.masks.shape[0] != len(self.segments):
            raise ValueError(f"masks of shape {self.masks.shape} do not match {len(self.segments)} segment(s)")
        if [segment.number for segment in self.segments] != list(range(1, len(self.segments) + 1)):
            raise ValueError("segments must be numbered 1..n in order")
