"""Stand-in for ``comfy.sd.load_lora_for_models`` (same signature and return shape).

The real one maps LoRA keys onto the model's weights; here every ``<prefix>.lora_*``/``.alpha`` group
becomes one patch, so tests can check which LoRA and strength reached the model.
"""

from __future__ import annotations

from typing import Any


def load_lora_for_models(model: Any, clip: Any, lora: dict, strength_model: float, strength_clip: float):
    prefixes = {k.split(".lora_")[0].removesuffix(".alpha") for k in lora}
    loaded = {p: {k: v for k, v in lora.items() if k.startswith(p + ".")} for p in prefixes}
    new_model = None
    if model is not None:
        new_model = model.clone()
        new_model.add_patches(loaded, strength_model)
    new_clip = clip.clone() if clip is not None else None
    return new_model, new_clip
