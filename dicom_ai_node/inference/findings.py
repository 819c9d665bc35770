"""What a detection or a classification model hands to the result builders (a segmentation model: segmentation.py).

Positions are in patient coordinates (LPS millimetres, as DICOM has them), not voxel indices: the results stage
finds the source image and the pixel a position falls on, whatever grid the model worked on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dicom_ai_node.inference.segmentation import CodedConcept

Point = tuple[float, float, float]

# The finding category (CID 7150) of what detectors find: lesions, nodules, masses.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")


@dataclass(frozen=True)
class Detection:
    """One finding at one place: what it is, how sure the model is, where its centre is and, when the model gives
    one, the box around it (two opposite corners, edges along the patient axes)."""

    label: str  # what a reader sees first, e.g. "Nodule 1"
    type: CodedConcept  # e.g. SCT 27925004 "Nodule"
    score: float  # the model's certainty, 0..1 (a score, not a calibrated probability, unless the model says so)
    centre_lps: Point
    box_lps: tuple[Point, Point] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"{self.label}: score {self.score} is not within 0..1")
        if not all(math.isfinite(v) for v in self.centre_lps):
            raise ValueError(f"{self.label}: centre {self.centre_lps} is not a point")


@dataclass
class Detections:
    """Everything a detector found in one series; `findings` may be empty, and then the report says that `target`
    is absent rather than saying nothing."""

    findings: list[Detection]
    target: CodedConcept  # what the model looks for, e.g. SCT 27925004 "Nodule"
    category: CodedConcept  # e.g. SCT 49755003 "Morphologically Abnormal Structure"
    algorithm_name: str
    algorithm_version: str


@dataclass(frozen=True)
class ClassScore:
    """One class of a classification and the model's probability of it."""

    value: CodedConcept  # e.g. SCT 52101004 "Present"
    probability: float


@dataclass
class Classification:
    """One question about the whole series ("Contrast agent?") and the probability of each answer."""

    name: CodedConcept  # what is classified, e.g. SCT 7140000 "Contrast agent"
    scores: list[ClassScore]
    algorithm_name: str
    algorithm_version: str

    def __post_init__(self) -> None:
        if len(self.scores) < 2:
            raise ValueError(f"{self.name.meaning}: a classification needs at least two classes")
        if not all(0.0 <= score.probability <= 1.0 for score in self.scores):
            raise ValueError(f"{self.name.meaning}: probabilities must be within 0..1")
        if abs(sum(score.probability for score in self.scores) - 1.0) > 1e-6:
            raise ValueError(f"{self.name.meaning}: the probabilities of its classes do not sum to 1")

    @property
    def answer(self) -> ClassScore:
        """The most probable class."""
        return max(self.scores, key=lambda score: score.probability)
