"""A TorchScript segmentation or classification network with declared preprocessing.

A TorchScript file carries the network but not how its inputs were prepared, so the node config
declares it (orientation, target spacing, intensity window, patch size) and this class does it
with MONAI transforms on the in-memory volume, then maps the argmax back onto the source grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, Resize, ScaleIntensityRange, Spacing

from dicom_ai_node.inference.bundle import Axcodes, classification_of, coded_segments, label_masks, to_source_grid
from dicom_ai_node.inference.findings import Classification
from dicom_ai_node.inference.model import ModelUnavailable, file_digest, resolve_device
from dicom_ai_node.inference.segmentation import CodedConcept, Segmentation
from dicom_ai_node.inference.volume import Volume


class TorchScriptModel:
    """A TorchScript file whose output channel 0 is background and channel n the n-th entry of `labels`; or, as a
    classifier (`finding`), whose output channel n is the probability (or logit) of the n-th entry of `labels`.

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
        finding: CodedConcept | None = None,
    ) -> None:
        """`finding` makes it a classification of the whole volume about that finding (its channels are the
        classes, in `labels` order; the volume is resized to `roi_size`), else it segments."""
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
        self.finding = finding
        transforms = [Orientation(axcodes=orientation, labels=None)]
        if target_spacing is not None:
            transforms.append(Spacing(pixdim=target_spacing, mode="bilinear"))
        if intensity_window is not None:
            low, high = intensity_window
            transforms.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
        if finding is not None:
            transforms.append(Resize(spatial_size=self.roi_size, mode="area"))
        self.preprocessing = Compose(transforms)
        try:
            self.network = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ModelUnavailable(f"{name}: {self.path} is not a loadable TorchScript file: {exc}") from exc

    def predict(self, volume: Volume) -> Segmentation | Classification:
        """Segment the volume (the masks lie on exactly its grid), or classify it."""
        source = volume.to_metatensor()
        image = self.preprocessing(source.clone())
        if self.finding is not None:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
                logits = self.network(image.as_tensor()[None].to(self.device))
            return classification_of(torch.as_tensor(logits)[0], [segment.type for segment in self.segments],
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
