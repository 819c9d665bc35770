"""What every model kind is: the `Model` contract, the device it runs on, and why one cannot be loaded.

The kinds (builtin.py, bundle.py, torchscript.py) import this module; registry.py imports the kinds.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dicom_ai_node.inference.segmentation import Segmentation
from dicom_ai_node.inference.volume import Volume


class Model(Protocol):
    name: str
    version: str
    device: torch.device

    def predict(self, volume: Volume) -> Segmentation: ...


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
