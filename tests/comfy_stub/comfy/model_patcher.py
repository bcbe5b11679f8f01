"""Stand-in for ``comfy.model_patcher.ModelPatcher``: clone(), add_patches() (recorded) and model_state_dict()."""

from __future__ import annotations

from typing import Any


class ModelPatcher:
    def __init__(
        self,
        name: str = "model",
        patches: list[tuple[dict[str, Any], float]] | None = None,
        weights: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.patches = list(patches or [])
        self.weights = dict(weights or {})  # the diffusion model's tensors, by the file's key names

    def clone(self) -> ModelPatcher:
        return ModelPatcher(self.name, self.patches, self.weights)

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        self.patches.append((patches, strength_patch))
        return list(patches)

    def model_state_dict(self, filter_prefix: str | None = None) -> dict[str, Any]:
        """As ComfyUI's: the BaseModel's state dict, the diffusion model's keys under ``diffusion_model.``."""
        sd = {f"diffusion_model.{k}": v for k, v in self.weights.items()}
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}
