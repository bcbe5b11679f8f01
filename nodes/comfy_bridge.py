"""Every call the pack makes into ComfyUI itself, in one module.

Keeping them here keeps the node modules readable and gives tests one small surface to stand in
for. Server access is defensive (``PromptServer.instance`` may be unset when ComfyUI runs a
prompt headless or in tests): a missing server only means no websocket messages, never a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths

log = logging.getLogger(__name__)

PACK_FOLDER = "comfyui-tuner"  # our subfolder of ComfyUI's loras/, diffusion_models/ and output/ folders
EVENT_PREFIX = "comfyui-tuner."  # websocket event namespace, matched by web/comfyui_tuner.js


# ---------------------------------------------------------------------- folders
def output_root() -> Path:
    """Where runs (checkpoints, samples, spec.json) and the shared caches live."""
    return Path(folder_paths.get_output_directory()) / PACK_FOLDER


def loras_dir() -> Path:
    """``loras/comfyui-tuner``: the stock LoRA loaders list files here without a restart."""
    return Path(folder_paths.get_folder_paths("loras")[0]) / PACK_FOLDER


def diffusion_models_dir() -> Path:
    """``diffusion_models/comfyui-tuner``: where a full fine-tune's ComfyUI file goes ("Load Diffusion Model").

    The first folder of the kind named ``diffusion_models`` (ComfyUI lists the legacy ``unet`` first).
    """
    roots = folder_paths.get_folder_paths("diffusion_models")
    root = next((r for r in roots if Path(r).name == "diffusion_models"), roots[0])
    return Path(root) / PACK_FOLDER


def model_name(path: Path, folder: str = "loras") -> str:
    """The name the stock loaders show for a file in a model folder (``comfyui-tuner/x.safetensors``)."""
    for root in folder_paths.get_folder_paths(folder):
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def loras_name(path: Path) -> str:
    """The name the stock LoRA loaders show for a file in a loras folder."""
    return model_name(path, "loras")


def input_dir() -> Path:
    return Path(folder_paths.get_input_directory())


def diffusers_models() -> list[str]:
    """Folders holding a ``model_index.json`` under ComfyUI's ``diffusers`` model folders."""
    found: set[str] = set()
    try:
        roots = folder_paths.get_folder_paths("diffusers")
    except KeyError:
        return []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for current, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.add(Path(os.path.relpath(current, root)).as_posix())
    return sorted(found)


def diffusers_model_path(name: str) -> Path | None:
    """The full path of an entry of :func:`diffusers_models`."""
    try:
        roots = folder_paths.get_folder_paths("diffusers")
    except KeyError:
        return None
    for root in roots:
        candidate = Path(root) / name
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def view_ref(path: Path) -> dict[str, str]:
    """``{filename, subfolder, type}`` that ComfyUI's ``/view`` serves; files elsewhere are copied to temp."""
    path = Path(path).resolve()
    for kind, root in (
        ("output", folder_paths.get_output_directory()),
        ("temp", folder_paths.get_temp_directory()),
        ("input", folder_paths.get_input_directory()),
    ):
        try:
            rel = path.relative_to(Path(root).resolve())
        except ValueError:
            continue
        subfolder = "" if rel.parent == Path(".") else rel.parent.as_posix()
        return {"filename": rel.name, "subfolder": subfolder, "type": kind}
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    temp = Path(folder_paths.get_temp_directory()) / PACK_FOLDER
    temp.mkdir(parents=True, exist_ok=True)
    copy = temp / f"{digest}-{path.name}"
    shutil.copy2(path, copy)
    return {"filename": copy.name, "subfolder": PACK_FOLDER, "type": "temp"}


# ---------------------------------------------------------------------- memory and device
def free_comfy_memory() -> None:
    """Unload every model ComfyUI holds, so the training child gets the whole GPU."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def torch_device_name() -> str | None:
    """ComfyUI's compute device (honours --cpu, --cuda-device...), for the child's ``--device``."""
    try:
        return str(comfy.model_management.get_torch_device())
    except Exception:  # an unusual backend: let the child pick
        return None


# ---------------------------------------------------------------------- cancel and progress
def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if Cancel was pressed (and clear the flag)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is ComfyUI's Cancel (as opposed to an error)."""
    return isinstance(exc, comfy.model_management.InterruptProcessingException)


def progress_bar(total: int, node_id: str | None) -> Any:
    """ComfyUI's progress bar; each update is also a cancel point (the hook checks for Cancel)."""
    return comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)


def _server() -> Any:
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send(event: str, data: dict[str, Any]) -> None:
    """A ``comfyui-tuner.<event>`` websocket message to the client that queued the prompt."""
    server = _server()
    if server is None:
        return
    try:
        server.send_sync(EVENT_PREFIX + event, data, getattr(server, "client_id", None))
    except Exception:  # the browser view is a nicety; training must not fail over it
        log.debug("could not send %s", event, exc_info=True)


def progress_text(text: str, node_id: str | None) -> None:
    """A line of text under the node (newer ComfyUI only), for nodes without a live view of their own.

    Train LoRA does not use it: its status line is in the extension's live area (train_monitor).
    """
    server = _server()
    if server is None or node_id is None or not hasattr(server, "send_progress_text"):
        return
    try:
        server.send_progress_text(text, node_id, getattr(server, "client_id", None))
    except Exception:
        log.debug("could not send progress text", exc_info=True)


# ---------------------------------------------------------------------- LoRA
def load_lora_file(path: Path) -> dict[str, Any]:
    """A LoRA file as ComfyUI's ``LORA_MODEL`` value: its state dict, keys as in the file."""
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def apply_lora(model: Any, lora: dict[str, Any], strength: float) -> Any:
    """``model`` with ``lora`` patched in, exactly as the stock LoRA loaders do it."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


# ---------------------------------------------------------------------- fine-tuned model
def load_diffusion_model(path: Path) -> Any:
    """A ComfyUI diffusion-model file as a ``MODEL``, through ComfyUI's own loader (as "Load Diffusion Model")."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))
