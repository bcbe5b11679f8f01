"""Writing a trained LoRA in the two formats people load: diffusers and ComfyUI.

The diffusers file is what ``pipe.load_lora_weights(folder)`` reads. Its tensors carry no alpha,
so the LoraConfig goes into the ``lora_adapter_metadata`` header entry that diffusers turns back
into ``LoraConfig(**...)``; without it diffusers would assume lora_alpha == r and a LoRA trained
with alpha != rank would load at the wrong strength. The ComfyUI file uses ComfyUI's module
names with ``.alpha`` tensors (see ``comfy_keys``). Both get our provenance metadata, and both are
written atomically so an interrupted save never leaves a truncated LoRA behind.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from ..errors import ConfigError
from ..io_utils import atomic_save_safetensors
from .adapters import DIFFUSERS_PREFIX, LORA_ADAPTER_METADATA_KEY
from .comfy_keys import to_comfyui

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
META_PREFIX = "comfyui_tuner."


@dataclass
class LoraFiles:
    diffusers: Path
    comfyui: Path


def lora_metadata(
    *,
    family: str,
    flavour: str,
    rank: int,
    alpha: float,
    steps: int,
    target_modules: list[str],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Provenance written into both files (safetensors metadata is str -> str).

    ``ss_network_dim``/``ss_network_alpha`` are the kohya keys LoRA browsers and ComfyUI-Manager show.
    """
    meta = {
        f"{META_PREFIX}family": family,
        f"{META_PREFIX}flavour": flavour,
        f"{META_PREFIX}rank": str(int(rank)),
        f"{META_PREFIX}alpha": repr(float(alpha)),
        f"{META_PREFIX}steps": str(int(steps)),
        f"{META_PREFIX}target_modules": json.dumps(list(target_modules)),
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": repr(float(alpha)),
    }
    for key, value in (extra or {}).items():
        meta[key if key.startswith(META_PREFIX) else META_PREFIX + key] = str(value)
    return meta


def _jsonable(value: Any) -> tuple[bool, Any]:
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    elif isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def diffusers_adapter_metadata(config: LoraConfig) -> str:
    """``lora_adapter_metadata`` as diffusers writes it: the LoraConfig, keys prefixed 'transformer.'.

    diffusers strips the prefix and calls ``LoraConfig(**metadata)``, so lora_alpha (and r,
    target_modules) come back exactly. ``init_lora_weights`` is forced to True: inits such as
    PiSSA/OLoRA would rewrite the base weights while loading, and the file's values replace the
    initial ones anyway.
    """
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        ok, value = _jsonable(value)
        if ok:
            out[DIFFUSERS_PREFIX + key] = value
        else:
            log.debug("dropping non-JSON LoraConfig field %s from the diffusers metadata", key)
    out[DIFFUSERS_PREFIX + "init_lora_weights"] = True
    return json.dumps(out, sort_keys=True)


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise ConfigError(f"LoRA metadata values must be strings; not for: {', '.join(map(str, bad))}")
    return dict(metadata)


def save_lora(
    out_dir: Path,
    name: str,
    family: str,
    peft_sd: Mapping[str, torch.Tensor],
    lora_config: LoraConfig,
    transformer_config: Mapping[str, Any],
    metadata: Mapping[str, str],
    comfyui_dtype: torch.dtype = torch.float32,
) -> LoraFiles:
    """Write ``<out_dir>/pytorch_lora_weights.safetensors`` and ``<out_dir>/<name>_comfyui.safetensors``.

    The ComfyUI file is converted first, so an unmappable target fails before anything is written.
    """
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"LoRA output name {name!r} must be a plain file name", "set export.output_name")
    out_dir = Path(out_dir)
    meta = _check_metadata(metadata)
    alpha = float(lora_config.lora_alpha)
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ConfigError("per-module rank_pattern/alpha_pattern LoRAs cannot be exported with one alpha")

    comfy = to_comfyui(family, peft_sd, alpha, transformer_config)
    comfy = {k: v if k.endswith(".alpha") else v.detach().to(comfyui_dtype) for k, v in comfy.items()}

    files = LoraFiles(diffusers=out_dir / DIFFUSERS_WEIGHT_NAME, comfyui=out_dir / f"{name}_comfyui.safetensors")
    diffusers_sd = {DIFFUSERS_PREFIX + k: v.detach() for k, v in peft_sd.items()}
    diffusers_meta = {"format": "pt", **meta, LORA_ADAPTER_METADATA_KEY: diffusers_adapter_metadata(lora_config)}
    atomic_save_safetensors(files.diffusers, diffusers_sd, metadata=diffusers_meta)
    atomic_save_safetensors(files.comfyui, comfy, metadata={"format": "pt", **meta})
    log.info("saved LoRA: %s and %s", files.diffusers, files.comfyui)
    return files
