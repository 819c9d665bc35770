"""Models by name, loaded once per worker process and kept warm between jobs."""

from __future__ import annotations

from dicom_ai_node.config import BuiltinModelConfig, ModelConfig, MonaiBundleConfig, TorchScriptConfig
from dicom_ai_node.inference.model import Model, ModelUnavailable


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
            case BuiltinModelConfig(model="ct-lung-nodules"):
                from dicom_ai_node.inference.builtin_findings import BuiltinLungNoduleModel

                return BuiltinLungNoduleModel(device=config.device)
            case BuiltinModelConfig(model="ct-contrast"):
                from dicom_ai_node.inference.builtin_findings import BuiltinContrastModel

                return BuiltinContrastModel(device=config.device)
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
                    output=config.output or "segmentation",
                    finding=config.finding,
                    min_score=config.min_score,
                )
        raise ModelUnavailable(f"{name}: no loader for {type(config).__name__}")
