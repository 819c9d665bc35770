"""What a model found, in a count and a line, for the job's record and its event (the SR has the details)."""

from __future__ import annotations

import numpy as np

from ..inference.findings import Classification, Detections
from ..inference.segmentation import Segmentation
from ..inference.volume import Volume
from ..values import Found


def what_was_found(prediction: Segmentation | Detections | Classification, volume: Volume) -> Found:
    """Segments the SEG holds that have voxels (with their volumes), detections (with their certainty), or a
    classification's answer (with its probability); 0 findings is "no findings", said as what is absent."""
    match prediction:
        case Segmentation():
            segments = list(zip(prediction.segments, prediction.masks))
            drawn = [(segment, mask) for segment, mask in segments if segment.in_seg] or segments  # or all context
            present = [(segment, np.count_nonzero(mask)) for segment, mask in drawn if mask.any()]
            if not present:
                return Found(0, "no findings: " + ", ".join(f"{segment.type.meaning} absent" for segment, _ in drawn))
            return Found(len(present), ", ".join(f"{segment.label} {voxels * volume.voxel_volume_ml:.1f} mL"
                                                 for segment, voxels in present))
        case Detections():
            if not prediction.findings:
                return Found(0, f"no findings: {prediction.target.meaning} absent")
            return Found(len(prediction.findings), ", ".join(f"{finding.label} ({finding.score:.0%})"
                                                             for finding in prediction.findings))
        case Classification():
            answer = prediction.answer
            return Found(1, f"{prediction.name.meaning}: {answer.value.meaning} ({answer.probability:.0%})")
    raise TypeError(f"a model returned {type(prediction).__name__}: not a Segmentation, Detections or Classification")
