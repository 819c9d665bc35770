"""A TorchScript segmentation, classification or detection network with declared preprocessing.

A TorchScript file carries the network but not how its inputs were prepared, so the node config
declares it (orientation, target spacing, intensity window, patch size) and this class does it
with MONAI transforms on the in-memory volume, then maps the argmax back onto the source grid,
or the boxes a detector found back to patient coordinates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, Resize, ScaleIntensityRange, Spacing

from dicom_ai_node.inference.bundle import (
    Axcodes,
    ModelOutput,
    classification_of,
    coded_segments,
    detections_of,
    finding_of,
    label_masks,
    to_source_grid,
)
from dicom_ai_node.inference.findings import Classification, Detections
from dicom_ai_node.inference.model import ModelUnavailable, file_digest, resolve_device
from dicom_ai_node.inference.segmentation import Segmentation
from dicom_ai_node.inference.volume import Volume


class TorchScriptModel:
    """A TorchScript file whose output channel 0 is background and channel n the n-th entry of `labels`; as a
    classifier, whose output channel n is the probability (or logit) of the n-th entry of `labels`; as a detector,
    that returns a mapping of "boxes" (N x 6, x0 y0 z0 x1 y1 z1, MONAI's xyzxyz) or points (N x 3) in voxel
    coordinates of its input, their "scores" and, for more than one class, their "labels" (n for the n-th entry
    of `labels`, from 0); MONAI's key names "box", "label_scores" and "label" are taken too.

    `labels` maps name -> "SCT:code:meaning"; `orientation` is the array orientation the network was
    trained on (arrays from NIfTI through MONAI's Orientationd are usually RAS).
    """

    def __init__(
        self,
        name: str,
        path: Path,
        device: str,
        target_spacing: tuple[float, float, float] | None,
        intensity_window: tuple[float, float] | None,
        roi_size: tuple[int, int, int],
        labels: dict[str, str],
        orientation: Axcodes = "RAS",
        mixed_precision: bool = False,
        output: ModelOutput = "segmentation",
        finding: str | None = None,
        min_score: float = 0.5,
    ) -> None:
        """A classification is of the whole volume, resized to `roi_size`, about `finding`; a detection sees the
        whole volume and reports what it finds scored at least `min_score`."""
        self.name = name
        self.path = Path(path)
        self.device = resolve_device(device)
        self.amp = mixed_precision and self.device.type == "cuda"
        self.roi_size = tuple(roi_size)
        if not self.path.is_file():
            raise ModelUnavailable(f"{name}: TorchScript file {self.path} does not exist")
        if not labels:
            raise ModelUnavailable(f"{name}: a torchscript model needs models.{name}.labels for its output channels")
        # A TorchScript file has no version of its own; its content hash identifies it in SEG and SR.
        self.identity = self.version = file_digest(self.path)
        self.segments = coded_segments(list(labels), labels, name)
        self.output = output
        self.finding = finding_of(output, finding, self.segments, name)
        self.min_score = min_score
        transforms = [Orientation(axcodes=orientation, labels=None)]
        if target_spacing is not None:
            transforms.append(Spacing(pixdim=target_spacing, mode="bilinear"))
        if intensity_window is not None:
            low, high = intensity_window
            transforms.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
        if output == "classification":
            transforms.append(Resize(spatial_size=self.roi_size, mode="area"))
        self.preprocessing = Compose(transforms)
        try:
            self.network = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ModelUnavailable(f"{name}: {self.path} is not a loadable TorchScript file: {exc}") from exc

    def predict(self, volume: Volume) -> Segmentation | Classification | Detections:
        """Segment the volume (the masks lie on exactly its grid), classify it, or find what it looks for."""
        source = volume.to_metatensor()
        image = self.preprocessing(source.clone())
        if self.output != "segmentation":
            with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
                output = self.network(image.as_tensor()[None].to(self.device))
            if self.output == "detection":
                return detections_of(output, image, self.segments, self.finding, self.min_score, self.name,
                                     self.version)
            return classification_of(torch.as_tensor(output)[0], [segment.type for segment in self.segments],
                                     self.finding, self.name, self.version)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
            logits = sliding_window_inference(
                image.as_tensor()[None].to(self.device),
                roi_size=self.roi_size,
                sw_batch_size=1,
                predictor=self.network,
                overlap=0.25,
            )
        labels = torch.as_tensor(logits).as_subclass(torch.Tensor)[0].argmax(dim=0, keepdim=True).float().cpu()
        labelmap = to_source_grid(MetaTensor(labels, meta=dict(image.meta)), source)
        return Segmentation(
            masks=label_masks(labelmap, list(range(1, len(self.segments) + 1))),
            segments=self.segments,
            algorithm_name=self.name,
            algorithm_version=self.version,
        )
