"""Load the pack and run its nodes the way ComfyUI does, on the stand-in modules of this folder.

- :func:`install` puts this folder first on ``sys.path`` (so ``comfy_api``, ``comfy``,
  ``folder_paths`` and ``server`` resolve here), lays out a ComfyUI tree under a temp folder, and
  installs a progress hook that, like ``main.py``'s ``hijack_progress``, checks for Cancel first and
  then sends a ``progress`` message (and a ``b_preview`` one, with the preview's size, if any).
- :func:`load_pack` imports the top-level ``__init__.py`` with ``spec_from_file_location`` under a
  path-derived module name (``load_custom_node`` does exactly this), then awaits
  ``comfy_entrypoint`` and the extension's node list, and takes each node's schema.
- :func:`run_node` calls ``execute`` on a clone of the node class whose ``hidden`` holds the node's
  id, as the executor does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

STUB_DIR = Path(__file__).resolve().parent
PACK_DIR = STUB_DIR.parent.parent
STUB_MODULES = ("comfy_api", "comfy", "folder_paths", "server")


class ProgressRecorder:
    """The progress hook: Cancel check first (ComfyUI's order), then a recorded ``progress`` update."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.on_update: Callable[[dict[str, Any]], None] | None = None

    def __call__(self, value: int, total: int, preview: Any, prompt_id: str | None = None, node_id: str | None = None):
        import comfy.model_management
        from server import PromptServer

        comfy.model_management.throw_exception_if_processing_interrupted()
        update = {"value": value, "max": total, "node": node_id, "preview": preview}
        self.updates.append(update)
        PromptServer.instance.send_sync("progress", {"value": value, "max": total, "node": node_id}, "test-client")
        if preview is not None:  # main.py sends the image itself (UNENCODED_PREVIEW_IMAGE); here its size
            kind, image, max_size = preview
            size = {"format": kind, "width": image.size[0], "height": image.size[1], "max_size": max_size}
            PromptServer.instance.send_sync("b_preview", {"node": node_id, **size}, "test-client")
        if self.on_update is not None:
            self.on_update(update)


def install(base: Path) -> ProgressRecorder:
    """Make the stand-ins importable and fresh, with a ComfyUI tree under ``base``."""
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import server

    folder_paths.set_base_path(str(base))
    comfy.model_management.reset()
    server.PromptServer.instance = server.PromptServer()
    recorder = ProgressRecorder()
    comfy.utils.set_progress_bar_global_hook(recorder)
    return recorder


def uninstall() -> None:
    """Remove the stand-ins and the pack loaded against them, so the next install starts clean.

    The pack must go too: its modules hold references to the stand-in modules they imported, and
    a later test file would otherwise talk to a stale ``comfy.model_management`` or server.
    """
    if str(STUB_DIR) in sys.path:
        sys.path.remove(str(STUB_DIR))
    pack = module_name()
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES or name == pack or name.startswith(pack + "."):
            del sys.modules[name]


def module_name(pack_dir: Path = PACK_DIR) -> str:
    """The name ComfyUI's loader gives a custom-node folder: its path with dots replaced."""
    return str(pack_dir).replace(".", "_x_")


def load_pack(pack_dir: Path = PACK_DIR) -> tuple[ModuleType, dict[str, type]]:
    """Import the pack like ComfyUI and return (module, node_id -> node class)."""
    name = module_name(pack_dir)
    if name in sys.modules:
        module = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    entry = module.comfy_entrypoint
    extension = asyncio.run(entry()) if inspect.iscoroutinefunction(entry) else entry()
    nodes = asyncio.run(extension.get_node_list())
    return module, {cls.GET_SCHEMA().node_id: cls for cls in nodes}


def run_node(cls: type, unique_id: str = "1", **inputs: Any) -> Any:
    """``execute`` on a per-run clone with ``hidden`` filled in; async nodes are awaited."""
    from comfy_api.latest import io

    clone = type(cls.__name__, (cls,), {})
    clone.hidden = io.HiddenHolder(unique_id=unique_id)
    result = clone.execute(**inputs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    return result


def schema_defaults(cls: type) -> dict[str, Any]:
    """Every widget input's default, by input id (what a freshly added node holds)."""
    return {i.id: i.default for i in cls.GET_SCHEMA().inputs if getattr(i, "is_widget", False)}
