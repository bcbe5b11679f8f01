"""Stand-in for ``comfy.model_patcher.ModelPatcher``: clone() and add_patches(), recorded."""

from __future__ import annotations

from typing import Any


class ModelPatcher:
    def __init__(self, name: str = "model", patches: list[tuple[dict[str, Any], float]] | None = None) -> None:
        self.name = name
        self.patches = list(patches or [])

    def clone(self) -> ModelPatcher:
        return ModelPatcher(self.name, self.patches)

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        self.patches.append((patches, strength_patch))
        return list(patches)
