"""Models by name, loaded once per worker process and kept warm between jobs."""

from __future__ import annotations

from typing import Protocol

import torch

from dicom_ai_node.config import BuiltinModelConfig, ModelConfig, MonaiBundleConfig, TorchScriptConfig
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


class ModelRegistry:
    def __init__(self, configs: dict[str, ModelConfig]) -> None:
        self.configs = configs
        self._loaded: dict[str, Model] = {}

    def loaded(self) -> dict[str, str]:
        """Model name -> device, for the models this process holds warm."""
        return {name: str(model.device) for name, model in self._loaded.items()}

    def get(self, name: str) -> Model:
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def _load(self, name: str) -> Model:
        config = self.configs.get(name)
        if config is None:
            raise ModelUnavailable(f"no model named {name!r} in [models]")
        match config:  # each kind's module is imported only where that kind is configured
            case BuiltinModelConfig():
                from dicom_ai_node.inference.builtin import BuiltinCTModel

                return BuiltinCTModel(device=config.device)
            case MonaiBundleConfig():
                from dicom_ai_node.inference.bundle import MonaiBundleModel

                return MonaiBundleModel(name, config)
            case TorchScriptConfig():
                from dicom_ai_node.inference.torchscript import TorchScriptModel

                return TorchScriptModel(
                    name,
                    config.path,
                    config.device,
                    config.target_spacing,
                    config.intensity_window,
                    config.roi_size,
                    config.labels,
                    orientation=config.orientation,
                    mixed_precision=config.mixed_precision,
                )
        raise ModelUnavailable(f"{name}: no loader for {type(config).__name__}")
