"""MONAI Model Zoo bundles, run on the node's in-memory volume.

A Zoo bundle's inference config is written for files on disk: LoadImaged first, SaveImaged last,
with the network, inferer and checkpoint as separate entries. The node already holds the volume
in memory and must hand back masks in memory on exactly the source grid, so it uses the bundle's
own preprocessing, network, inferer and postprocessing and removes only the file I/O: the volume
goes in as the MetaTensor LoadImaged + EnsureChannelFirstd would have made, Invertd (if the bundle
has it) maps the prediction back through the recorded operations, and whatever is still off the
source grid is resampled onto it with nearest neighbour. No temporary files are written.
A classifier's probabilities and a detector's boxes are taken before the bundle's postprocessing,
which would reduce the first to an argmax and only maps the second to world coordinates, done here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.box_utils import clip_boxes_to_image
from monai.data.utils import orientation_ras_lps
from monai.inferers import SimpleInferer
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    LoadImage,
    LoadImaged,
    Orientationd,
    ResampleToMatch,
    SaveImage,
    SaveImaged,
)

from dicom_ai_node.config import MonaiBundleConfig
from dicom_ai_node.inference.findings import (
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Classification,
    ClassScore,
    Detection,
    Detections,
    Point,
)
from dicom_ai_node.inference.model import ModelUnavailable, file_digest, resolve_device
from dicom_ai_node.inference.segmentation import PALETTE, CodedConcept, Segment, Segmentation
from dicom_ai_node.inference.volume import Volume

Axcodes = Literal["RAS", "LPS"]
ModelOutput = Literal["segmentation", "classification", "detection"]

ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical structure")
# The volume arrives as a channel-first MetaTensor, so reading files and adding a channel are skipped;
# writing files is skipped because the prediction goes back in memory.
_FILE_INPUT = (LoadImage, LoadImaged, EnsureChannelFirst, EnsureChannelFirstd)
_FILE_OUTPUT = (SaveImage, SaveImaged)
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Affines that differ by less than this (mm) describe the same grid.
_GRID_TOLERANCE_MM = 1e-3


def parse_code(text: str, where: str) -> CodedConcept:
    """A "SCHEME:code:meaning" string from the node config as a CodedConcept."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(part.strip() for part in parts):
        raise ModelUnavailable(f"{where}: {text!r} is not SCHEME:code:meaning, e.g. SCT:39607008:Lung")
    scheme, value, meaning = (part.strip() for part in parts)
    return CodedConcept(value, scheme, meaning)


def coded_segments(names: list[str], codes: dict[str, str], model: str) -> list[Segment]:
    """One Segment per label name, in order; a SEG needs a code for each, so a missing one stops loading."""
    segments = []
    for number, label in enumerate(names, start=1):
        if label not in codes:
            raise ModelUnavailable(
                f"{model}: label {label!r} has no code; add it to models.{model}.labels as SCHEME:code:meaning"
            )
        segments.append(
            Segment(
                number=number,
                label=label,
                category=ANATOMICAL_STRUCTURE,
                type=parse_code(codes[label], f"models.{model}.labels.{label}"),
                color_rgb=PALETTE[(number - 1) % len(PALETTE)],
            )
        )
    return segments


def classification_of(
    logits: torch.Tensor, classes: list[CodedConcept], finding: CodedConcept, name: str, version: str
) -> Classification:
    """A network's output for one series (one value per class, in `classes` order) as a Classification: taken as
    probabilities when it already is a probability vector, else as logits (softmax)."""
    values = torch.as_tensor(logits).detach().float().cpu().reshape(-1)
    if values.numel() != len(classes):
        raise ValueError(f"{name} returned {values.numel()} value(s) for {len(classes)} class(es)")
    if not (values.min() >= 0 and abs(float(values.sum()) - 1.0) < 1e-3):
        values = torch.softmax(values.double(), dim=0)
    values = values.double() / values.double().sum()
    scores = [ClassScore(concept, float(p)) for concept, p in zip(classes, values)]
    return Classification(finding, scores, name, version)


def declared_output(output: ModelOutput | None, metadata: dict[str, Any]) -> ModelOutput:
    """What the network returns: `output` if the node's config sets it, else what the bundle metadata's first output
    says (type "probabilities" or format "classes": a classification; type "object": a detection), else a
    segmentation."""
    if output is not None:
        return output
    described = next(iter(metadata.get("network_data_format", {}).get("outputs", {}).values()), {})
    if described.get("type") == "probabilities" or described.get("format") == "classes":
        return "classification"
    if described.get("type") == "object":  # MONAI's detection bundles: a dict of boxes, labels and scores
        return "detection"
    return "segmentation"


def finding_of(output: ModelOutput, finding: str | None, segments: list[Segment], model: str) -> CodedConcept | None:
    """What a classification is about or a detection looks for (None for a segmentation): `finding` from the node's
    config, else, for a detector of one class, that class."""
    if output == "segmentation":
        return None
    if finding is not None:
        return parse_code(finding, f"models.{model}.finding")
    if output == "detection" and len(segments) == 1:
        return segments[0].type
    raise ModelUnavailable(f"{model}: a {output} needs models.{model}.finding, what it "
                           f"{'classifies' if output == 'classification' else 'looks for'}, as SCHEME:code:meaning "
                           "(e.g. SCT:7140000:Contrast agent or SCT:27925004:Nodule)")


_BOX_KEYS = ("box", "boxes")  # MONAI's RetinaNetDetector (as its bundles set it) and torchvision's names
_SCORE_KEYS = ("label_scores", "scores")
_LABEL_KEYS = ("label", "labels")


def _entry(output: Mapping[str, Any], keys: tuple[str, ...]) -> torch.Tensor | None:
    """The first of `keys` that `output` has, as a tensor on the CPU, or None."""
    key = next((key for key in keys if key in output), None)
    return None if key is None else torch.as_tensor(output[key]).detach().cpu()


def _point(values: torch.Tensor) -> Point:
    x, y, z = map(float, values)
    return x, y, z


def detections_of(output: Any, image: MetaTensor, classes: list[Segment], target: CodedConcept, min_score: float,
                  name: str, version: str) -> Detections:
    """A detector's output for one series as Detections in patient coordinates.

    `output` is a mapping (or a list of one, per batch item, as MONAI's RetinaNetDetector returns) of boxes, N x 6
    in MONAI's xyzxyz order, or points, N x 3, in voxel coordinates of `image` (the network's input, whose affine
    records every resampling and reorientation the preprocessing did), with one score each and, unless there is
    one class, a class index each.  Boxes are clipped to the image (those wholly outside it dropped, points
    outside it too) and mapped to the world as MONAI's ClipBoxToImaged and AffineBoxToWorldCoordinated do;
    findings scored below `min_score` (or not scored: NaN) are left out before their classes are checked.
    """
    if isinstance(output, list | tuple):
        if len(output) != 1:
            raise ValueError(f"{name} returned {len(output)} results for one series")
        output = output[0]
    if not isinstance(output, Mapping):
        raise ValueError(f"{name} returned a {type(output).__name__}, not a mapping of boxes, scores and labels")
    boxes, scores = _entry(output, _BOX_KEYS), _entry(output, _SCORE_KEYS)
    if boxes is None or scores is None:
        raise ValueError(f"{name} returned {sorted(output)}: a detector returns boxes ({' or '.join(_BOX_KEYS)}) "
                         f"and scores ({' or '.join(_SCORE_KEYS)})")
    boxes, scores = boxes.double(), scores.double().reshape(-1)
    labels = _entry(output, _LABEL_KEYS)
    labels = torch.zeros(len(scores), dtype=torch.long) if labels is None else labels.long().reshape(-1)
    if boxes.numel() == 0 and len(scores) == len(labels) == 0:
        return Detections([], target, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, name, version)  # nothing, in any shape
    if boxes.ndim != 2 or boxes.shape[1] not in (3, 6) or not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{name} returned boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)}: expected N x 6 boxes (or N x 3 points) and N of each")
    if len(classes) > 1 and not any(key in output for key in _LABEL_KEYS):
        raise ValueError(f"{name} has {len(classes)} classes but returned no labels")
    reported = scores >= min_score  # NaN is not reported either
    boxes, scores, labels = boxes[reported], scores[reported], labels[reported]
    unknown = labels[(labels < 0) | (labels >= len(classes))]
    if len(unknown):
        raise ValueError(f"{name} returned class {int(unknown[0])}; models.{name}.labels codes classes 0 to "
                         f"{len(classes) - 1}")
    world = torch.as_tensor(orientation_ras_lps(np.asarray(image.affine, dtype=np.float64)))  # MONAI's RAS -> LPS
    spatial = tuple(image.shape[1:])
    if boxes.shape[1] == 6:
        boxes, keep = clip_boxes_to_image(boxes, spatial, remove_empty=True)
        scores, labels = scores[keep], labels[keep]
        places = [(_point((box[:3] + box[3:]) / 2), (_point(box[:3]), _point(box[3:])))
                  for box in apply_affine_to_boxes(boxes, world)]
    else:
        keep = ((boxes >= 0) & (boxes < torch.tensor(spatial, dtype=boxes.dtype))).all(dim=1)
        scores, labels = scores[keep], labels[keep]
        points = (world[:3, :3] @ boxes[keep].T + world[:3, 3:]).T
        places = [(_point(point), None) for point in points]
    findings, numbers = [], dict.fromkeys(range(len(classes)), 0)
    for index in sorted(range(len(places)), key=lambda n: -float(scores[n])):
        kind = classes[int(labels[index])]
        numbers[int(labels[index])] += 1
        centre, box = places[index]
        findings.append(Detection(f"{kind.type.meaning} {numbers[int(labels[index])]}", kind.type,
                                  float(scores[index]), centre, box))
    return Detections(findings, target, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, name, version)


def to_source_grid(labelmap: MetaTensor, source: MetaTensor) -> MetaTensor:
    """A (1, i, j, k) label map on exactly the grid of `source`, resampled (nearest) only if it is not already."""
    same_shape = tuple(labelmap.shape[1:]) == tuple(source.shape[1:])
    if same_shape and np.allclose(
        np.asarray(labelmap.affine, dtype=np.float64),
        np.asarray(source.affine, dtype=np.float64),
        atol=_GRID_TOLERANCE_MM,
    ):
        return labelmap
    return ResampleToMatch(mode="nearest", padding_mode="zeros")(labelmap, img_dst=source)


def label_masks(labelmap: torch.Tensor, values: list[int]) -> np.ndarray:
    """Bool masks (n, slices, rows, columns) of a (1, i, j, k) label map, one per label value."""
    array = np.rint(labelmap[0].detach().cpu().numpy()).astype(np.int32).transpose(2, 1, 0)
    return np.stack([array == value for value in values])


def read_bundle_config(bundle: Path, device: torch.device) -> ConfigParser:
    """The bundle's metadata and inference config (JSON or YAML), with bundle_root and device set for this node."""
    configs = bundle / "configs"
    metadata = configs / "metadata.json"
    if not metadata.is_file():
        raise ModelUnavailable(f"{bundle} is not a MONAI bundle: {metadata} is missing")
    config = next((configs / name for name in _CONFIG_NAMES if (configs / name).is_file()), None)
    if config is None:
        raise ModelUnavailable(f"{bundle} has no configs/{' or configs/'.join(_CONFIG_NAMES)}")
    parser = ConfigParser()
    try:
        parser.read_meta(metadata)
        parser.read_config(config)
    except (OSError, ValueError, json.JSONDecodeError) as exc:  # yaml errors are ValueErrors too
        raise ModelUnavailable(f"{config}: cannot be read: {exc}") from exc
    parser["bundle_root"] = str(bundle)
    parser["device"] = f"$torch.device('{device}')"
    return parser


def in_memory_preprocessing(parser: ConfigParser, orientation: Axcodes | None = None) -> Compose:
    """The bundle's `preprocessing` Compose, changed in place to take {"image": MetaTensor} instead of a file.

    Changed in place, not copied, because the bundle's Invertd refers to this very Compose object and
    matches the transforms it inverts by identity. `orientation` replaces the axcodes of every
    Orientationd (or adds one first), for bundles trained on data in another orientation.
    """
    compose = parser.get_parsed_content("preprocessing")
    if not isinstance(compose, Compose):
        raise ModelUnavailable(f"preprocessing is a {type(compose).__name__}, not a Compose")
    transforms = [t for t in compose.flatten().transforms if not isinstance(t, _FILE_INPUT)]
    if orientation is not None:
        if not any(isinstance(t, Orientationd) for t in transforms):
            transforms.insert(0, Orientationd(keys="image", axcodes=orientation, labels=None))
        transforms = [
            Orientationd(keys=t.keys, axcodes=orientation, labels=None) if isinstance(t, Orientationd) else t
            for t in transforms
        ]
    compose.transforms = tuple(transforms)
    return compose


def _in_memory_postprocessing(parser: ConfigParser) -> Compose | None:
    """The bundle's `postprocessing` without its file writers, or None if the bundle has none."""
    if "postprocessing" not in parser:
        return None
    compose = parser.get_parsed_content("postprocessing")
    if not isinstance(compose, Compose):
        raise ModelUnavailable(f"postprocessing is a {type(compose).__name__}, not a Compose")
    compose.transforms = tuple(t for t in compose.flatten().transforms if not isinstance(t, _FILE_OUTPUT))
    return compose


def _channel_names(metadata: dict[str, Any], codes: dict[str, str], background: bool = True
                   ) -> tuple[list[int], list[str]]:
    """Label values and names: the output's channel_def without channel 0 when it is the background (a
    segmentation's; a classification's channel 0 is a class), else the config's labels."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    channel_def = next((output.get("channel_def") for output in outputs.values() if output.get("channel_def")), {})
    first = 1 if background else 0
    if channel_def:
        pairs = sorted((int(value), str(name)) for value, name in channel_def.items() if int(value) >= first)
        return [value for value, _ in pairs], [name for _, name in pairs]
    return list(range(first, len(codes) + first)), list(codes)


@contextmanager
def _own_code_first(bundle: Path) -> Iterator[None]:
    """The bundle's root first on the import path while its config is parsed, so that `scripts.net.X` (or any
    package the bundle ships) is its own; modules of those names are forgotten before and after, so that two bundles
    that both ship a `scripts` package never import each other's."""
    shipped = {path.stem for path in bundle.iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}

    def forget() -> None:
        for module in [name for name in sys.modules if name.partition(".")[0] in shipped]:
            del sys.modules[module]

    forget()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        forget()


class MonaiBundleModel:
    """A MONAI bundle directory in Model Zoo layout, loaded once and kept warm."""

    def __init__(self, name: str, config: MonaiBundleConfig) -> None:
        self.name = name
        self.path = Path(config.path)
        self.device = resolve_device(config.device)
        self.amp = config.mixed_precision and self.device.type == "cuda"
        self.min_score = config.min_score
        parser = read_bundle_config(self.path, self.device)
        metadata = parser.get("_meta_", {})
        self.version = str(metadata.get("version", "unknown"))
        self.output = declared_output(config.output, metadata)
        self.values, names = _channel_names(metadata, config.labels, background=self.output == "segmentation")
        if not names:
            raise ModelUnavailable(f"{name}: bundle {self.path} names no output channels; set models.{name}.labels")
        self.segments = coded_segments(names, config.labels, name)
        self.finding = finding_of(self.output, config.finding, self.segments, name)
        try:
            with _own_code_first(self.path):
                self.preprocessing = in_memory_preprocessing(parser, config.orientation)
                self.postprocessing = _in_memory_postprocessing(parser) if self.output == "segmentation" else None
                self.network, weights = self._load_network(parser)
                if "detector_ops" in parser:  # a detection bundle sets up its detector before the inferer wraps it
                    parser.get_parsed_content("detector_ops")
                self.inferer = parser.get_parsed_content("inferer") if "inferer" in parser else SimpleInferer()
        except ModelUnavailable as exc:
            raise ModelUnavailable(f"{name}: bundle {self.path}: {exc}") from exc
        except Exception as exc:  # a bundle config can fail in any component's constructor
            raise ModelUnavailable(f"{name}: bundle {self.path} cannot be loaded: {exc!r}") from exc
        # The version alone does not tell weights apart (a retrained bundle often keeps it): its configs and
        # the weights it loads do.
        configs = sorted(path for path in (self.path / "configs").rglob("*") if path.is_file())
        self.identity = f"{self.version} {file_digest(*configs, weights)}"

    def _load_network(self, parser: ConfigParser) -> tuple[torch.nn.Module, Path]:
        """models/model.ts (TorchScript, self-contained) if present, else models/model.pt into network_def;
        with the file it came from."""
        scripted = self.path / "models" / "model.ts"
        if scripted.is_file():
            network = torch.jit.load(str(scripted), map_location=self.device)
            return network.eval(), scripted
        weights = self.path / "models" / "model.pt"
        if not weights.is_file():
            raise ModelUnavailable("neither models/model.ts nor models/model.pt exists")
        network = parser.get_parsed_content("network_def")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state.get("model"), dict):  # saved by a CheckpointSaver with more than the network
            state = state["model"]
        network.load_state_dict(state)
        network.to(self.device)
        return network.eval(), weights

    def predict(self, volume: Volume) -> Segmentation | Classification | Detections:
        """Segment the volume (the masks lie on exactly its grid), classify it, or find what it looks for."""
        source = volume.to_metatensor()
        # Bundle transforms are not ours to audit for in-place changes; the volume's pixels must stay intact.
        data = self.preprocessing({"image": source.clone()})
        image = data["image"]
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
            logits = self.inferer(image.as_tensor()[None].to(self.device), self.network)
        if self.output == "detection":  # the bundle's postprocessing only clips and maps the boxes: done here
            return detections_of(logits, image, self.segments, self.finding, self.min_score, self.name, self.version)
        if self.output == "classification":  # the bundle's postprocessing (argmax, thresholds) would lose them
            return classification_of(torch.as_tensor(logits)[0], [segment.type for segment in self.segments],
                                     self.finding, self.name, self.version)
        data["pred"] = MetaTensor(torch.as_tensor(logits)[0].float(), meta=dict(image.meta))
        if self.postprocessing is not None:
            with torch.no_grad():
                data = self.postprocessing(data)
        pred = data["pred"]
        meta = dict((pred if isinstance(pred, MetaTensor) else image).meta)  # a plain output is on image's grid
        pred = torch.as_tensor(pred).as_subclass(torch.Tensor)
        if pred.shape[0] > 1:  # probabilities or one-hot: the bundle's postprocessing stopped before argmax
            pred = pred.argmax(dim=0, keepdim=True)
        labelmap = to_source_grid(MetaTensor(pred.float().cpu(), meta=meta), source)
        return Segmentation(
            masks=label_masks(labelmap, self.values),
            segments=self.segments,
            algorithm_name=self.name,
            algorithm_version=self.version,
        )
