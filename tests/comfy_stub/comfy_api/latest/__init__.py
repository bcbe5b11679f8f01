"""Stand-in for ``comfy_api.latest``: ``ComfyExtension``, ``io`` and ``ui``."""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import io, ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 (optional hook, as in ComfyUI)
        """Called once when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes this extension provides."""


IO = io
UI = ui

__all__ = ["ComfyExtension", "io", "IO", "ui", "UI"]
