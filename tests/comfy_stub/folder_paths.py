"""Stand-in for ComfyUI's ``folder_paths``: model folders under a base path the tests choose.

Same function names and behaviour as ComfyUI's for what the pack calls (folder lists, legacy
names, ``get_filename_list`` walking subfolders). ``set_base_path`` is a test hook.
"""

from __future__ import annotations

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}

base_path = ""
models_dir = ""
output_directory = ""
temp_directory = ""
input_directory = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def set_base_path(path: str) -> None:
    """Test hook: lay out a ComfyUI tree (models/, output/, temp/, input/) under ``path``."""
    global base_path, models_dir, output_directory, temp_directory, input_directory
    base_path = str(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    folder_names_and_paths.clear()
    for name, subs in {
        "checkpoints": ["checkpoints"],
        "loras": ["loras"],
        "vae": ["vae"],
        "text_encoders": ["text_encoders", "clip"],
        "diffusion_models": ["unet", "diffusion_models"],
    }.items():
        folder_names_and_paths[name] = ([os.path.join(models_dir, s) for s in subs], supported_pt_extensions)
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], {"folder"})
    for d in (output_directory, temp_directory, input_directory):
        os.makedirs(d, exist_ok=True)


def map_legacy(folder_name: str) -> str:
    return _LEGACY.get(folder_name, folder_name)


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths = folder_names_and_paths.setdefault(map_legacy(folder_name), ([], set()))[0]
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_filename_list(folder_name: str) -> list[str]:
    folders, extensions = folder_names_and_paths[map_legacy(folder_name)]
    found = set()
    for folder in folders:
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for f in files:
                if os.path.splitext(f)[-1].lower() in extensions or not extensions:
                    found.add(os.path.relpath(os.path.join(root, f), folder))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for folder in folder_names_and_paths[folder_name][0]:
        full = os.path.join(folder, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full
