"""Stand-in for ``comfy_api.latest.ui`` (``_ui.py``): saved-image results and previews."""

from __future__ import annotations

import os
import random
from typing import Any

import folder_paths

from .io import FolderType


class SavedResult(dict):
    def __init__(self, filename: str, subfolder: str, type: FolderType) -> None:
        super().__init__(filename=filename, subfolder=subfolder, type=type.value)


class SavedImages:
    def __init__(self, results: list[SavedResult], is_animated: bool = False) -> None:
        self.results = results
        self.is_animated = is_animated

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"images": self.results}
        if self.is_animated:
            data["animated"] = (True,)
        return data


class PreviewImage:
    """Saves each image of an IMAGE batch as a PNG in the temp folder, like ComfyUI."""

    def __init__(self, image: Any, animated: bool = False, cls: Any = None, **kwargs: Any) -> None:
        from PIL import Image

        prefix = "ComfyUI_temp_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        self.values = []
        for i, frame in enumerate(image):
            name = f"{prefix}_{i:05}_.png"
            array = (frame.clamp(0, 1) * 255).round().byte().cpu().numpy()
            Image.fromarray(array).save(os.path.join(folder_paths.get_temp_directory(), name))
            self.values.append(SavedResult(name, "", FolderType.temp))
        self.animated = animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.values, "animated": (self.animated,)}


class PreviewText:
    def __init__(self, value: str, **kwargs: Any) -> None:
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": (self.value,)}
