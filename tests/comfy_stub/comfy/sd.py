"""Stand-ins for ``comfy.sd.load_lora_for_models`` and ``comfy.sd.load_diffusion_model`` (same signatures
and return shapes).

``load_diffusion_model`` reads the file and detects the architecture from key names as ComfyUI's
``comfy/model_detection.py`` does (0.8 and 0.33: ``cap_embedder.1.weight`` is Lumina 2,
``visual_transformer_blocks.0.cross_attention.key_norm.weight`` Kandinsky 5); an unknown file fails
with ComfyUI's message. The returned patcher holds the file's tensors (``model_state_dict()``), so
tests can check the model is the file's.

The real one maps LoRA keys onto the model's weights with ``comfy.lora.load_lora``: for each layer
prefix it takes ``<prefix>.alpha`` and ``<prefix>.dora_scale``, then asks each weight adapter (LoRA,
LoHa, LoKr, ...) for its own keys, and logs every key nobody took as "lora key not loaded". Here the
keys are grouped the same way, by the suffixes those adapters read (ComfyUI 0.8's ``comfy/lora.py``
and ``comfy/weight_adapter/*.py``): every layer becomes one patch, so tests can check which layers,
tensors and strength reached the model; a key with no known suffix is recorded in
:data:`NOT_LOADED`, as ComfyUI would log it.
"""

from __future__ import annotations

from typing import Any

from .model_patcher import ModelPatcher
from .utils import load_torch_file

# (key that identifies the architecture, ComfyUI's name for it), as in comfy/model_detection.py
DETECTED_BY = (
    ("cap_embedder.1.weight", "lumina2"),
    ("visual_transformer_blocks.0.cross_attention.key_norm.weight", "kandinsky5"),
)
LOADED_FILES: list[str] = []  # every path load_diffusion_model read, in order

# What load_lora and its weight adapters read after "<layer prefix>.".
ADAPTER_SUFFIXES = (
    # comfy/lora.py itself
    "alpha",
    "dora_scale",
    "diff",
    "diff_b",
    "set_weight",
    "w_norm",
    "b_norm",
    # weight_adapter/lora.py
    "lora_up.weight",
    "lora_down.weight",
    "lora_mid.weight",
    "lora_B.weight",
    "lora_A.weight",
    "lora.up.weight",
    "lora.down.weight",
    "lora_B",
    "lora_A",
    "lora_linear_layer.up.weight",
    "lora_linear_layer.down.weight",
    "lora_B.default.weight",
    "lora_A.default.weight",
    "reshape_weight",
    # weight_adapter/loha.py
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    # weight_adapter/lokr.py
    "lokr_w1",
    "lokr_w2",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    # weight_adapter/oft.py, boft.py, glora.py
    "oft_blocks",
    "rescale",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
)
NOT_LOADED: list[str] = []  # keys of the last call that no adapter would read ("lora key not loaded")


def split_key(key: str) -> tuple[str, str] | None:
    """``(layer prefix, adapter suffix)`` of a LoRA file key, or None when no adapter reads it."""
    for suffix in sorted(ADAPTER_SUFFIXES, key=len, reverse=True):  # lora_B.weight before lora_B
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def load_lora_for_models(model: Any, clip: Any, lora: dict, strength_model: float, strength_clip: float):
    loaded: dict[str, dict[str, Any]] = {}
    NOT_LOADED.clear()
    for key, value in lora.items():
        parts = split_key(key)
        if parts is None:
            NOT_LOADED.append(key)
            continue
        loaded.setdefault(parts[0], {})[key] = value
    new_model = None
    if model is not None:
        new_model = model.clone()
        new_model.add_patches(loaded, strength_model)
    new_clip = clip.clone() if clip is not None else None
    return new_model, new_clip


def load_diffusion_model(unet_path: str, model_options: dict | None = None) -> ModelPatcher:
    sd, _metadata = load_torch_file(unet_path, return_metadata=True)
    LOADED_FILES.append(str(unet_path))
    for key, name in DETECTED_BY:
        if key in sd:
            return ModelPatcher(name, weights=sd)
    raise RuntimeError(f"ERROR: Could not detect model type of: {unet_path}")
