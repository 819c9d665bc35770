"""What every model kind is: the `Model` contract, the device it runs on, and why one cannot be loaded.

The kinds (builtin.py, bundle.py, torchscript.py) import this module; registry.py imports the kinds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch

from dicom_ai_node.config import ModelConfig

from dicom_ai_node.inference.findings import Classification, Detections
from dicom_ai_node.inference.segmentation import Segmentation
from dicom_ai_node.inference.volume import Volume

# What a model returns, one typed value per task; the results stage writes each kind without knowing the model.
Prediction = Segmentation | Detections | Classification


class Model(Protocol):
    name: str
    version: str  # as its authors name it: shown in SEG and SR
    identity: str  # a digest of what determines its output (`file_digest`); result UIDs derive from it
    device: torch.device

    def predict(self, volume: Volume) -> Prediction: ...


def file_digest(*paths: Path) -> str:
    """"sha256:" and 16 hex digits of the files' bytes, read a MiB at a time (weights can be large)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def result_identity(model: Model, config: ModelConfig) -> str:
    """What determines the result objects of `model`: its identity and the node's settings of it that change
    what is written (seg_type, labels, orientation, spacing ...); not where it runs or lies (device, path).

    Two models with the same name and version but other weights or settings get other result UIDs, so a PACS
    never takes one's SEG for the other's (it keeps the first object it holds under a SOP Instance UID).
    """
    settings = config.model_dump(mode="json", exclude={"device", "path"})
    return f"{model.identity} settings:{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]}"


class ModelUnavailable(ValueError):
    """The model cannot be loaded; the message says why (bad path, unsupported kind, ...)."""


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a device string: "auto" picks CUDA when available; an explicit "cpu" or
    "cuda[:n]" must exist here, so a misconfigured node fails at start-up rather than per study."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelUnavailable(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:n]'") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ModelUnavailable(f"unsupported device {device!r}: use 'auto', 'cpu' or 'cuda[:n]'")
    if not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} requested but CUDA is not available")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelUnavailable(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return resolved
