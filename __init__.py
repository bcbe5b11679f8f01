"""ComfyUI entry point of comfyui-tuner.

ComfyUI imports this file when it loads custom nodes, as a package, so the nodes are imported
relatively (``.nodes``: ComfyUI has a top-level ``nodes`` module of its own). It uses ComfyUI's V3
node API: ``comfy_entrypoint`` returns the extension that lists the nodes. Importing this module
costs nothing; the node modules (and the trainer core they use) load when ComfyUI calls the entry
point. There is deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI would take the V1 path instead.
The trainer core stays usable without ComfyUI (``python -m trainer_core``).
"""

from __future__ import annotations

from typing import Any

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> Any:
    from .nodes.extension import TunerExtension

    return TunerExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
