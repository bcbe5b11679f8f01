"""Writing a trained adapter in the two formats people load: the trainer library's own, and ComfyUI's.

PEFT LoRA / DoRA (:func:`save_lora`): the diffusers file is what ``pipe.load_lora_weights(folder)``
reads. Its tensors carry no alpha, so the LoraConfig goes into the ``lora_adapter_metadata`` header
entry that diffusers turns back into ``LoraConfig(**...)``; without it diffusers would assume
lora_alpha == r and a LoRA trained with alpha != rank would load at the wrong strength. The
ComfyUI file uses ComfyUI's module names with ``.alpha`` tensors, and ``.dora_scale`` for DoRA
(see ``comfy_keys`` and ``dora``).

LyCORIS (:func:`save_lycoris`): LyCORIS's own file (``network.state_dict()``, the settings as JSON
in the ``lycoris_config`` metadata entry, as SimpleTuner writes it) that
``lycoris.create_lycoris_from_weights`` loads, and the ComfyUI file (``comfy_lycoris``).

Every file records the adapter type (``comfyui_tuner.adapter``: lora, dora, lokr, loha, locon,
full) and its settings, gets our provenance metadata, and is written atomically so an
interrupted save never leaves a truncated file behind. The ComfyUI file is converted first, so
anything ComfyUI could not apply fails before anything is written.
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
from .comfy_keys import to_comfyui
from .comfy_lycoris import lycoris_to_comfyui

log = logging.getLogger(__name__)

DIFFUSERS_PREFIX = "transformer."  # diffusers' key prefix for a transformer LoRA
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
META_PREFIX = "comfyui_tuner."
ADAPTER_KEY = META_PREFIX + "adapter"  # lora | dora | lokr | loha | locon | full
LYCORIS_CONFIG_KEY = "lycoris_config"  # LyCORIS settings JSON in LyCORIS's own file (SimpleTuner's key)


@dataclass
class LoraFiles:
    """The two files of one export. ``diffusers`` is the trainer-library file: diffusers' LoRA
    format for PEFT adapters, LyCORIS's own format for LyCORIS adapters (same file name)."""

    diffusers: Path
    comfyui: Path
    adapter: str = "lora"


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


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"LoRA output name {name!r} must be a plain file name", "set export.output_name")


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Factors to ``dtype``; ``alpha`` and ``dora_scale`` stay float32 (they are read as exact scales)."""
    return {
        k: v.detach() if k.endswith((".alpha", ".dora_scale")) else v.detach().to(dtype) for k, v in tensors.items()
    }


def save_lora(
    out_dir: Path,
    name: str,
    family: str,
    peft_sd: Mapping[str, torch.Tensor],
    lora_config: LoraConfig,
    transformer_config: Mapping[str, Any],
    metadata: Mapping[str, str],
    comfyui_dtype: torch.dtype = torch.float32,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> LoraFiles:
    """Write ``<out_dir>/pytorch_lora_weights.safetensors`` and ``<out_dir>/<name>_comfyui.safetensors``.

    A DoRA (``lora_magnitude_vector`` in ``peft_sd``) needs ``base_weights`` (diffusers module ->
    base weight, ``dora.base_weights_of(transformer, modules)``) for the ComfyUI ``dora_scale``.
    The ComfyUI file is converted first, so an unmappable target fails before anything is written.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    meta = _check_metadata(metadata)
    alpha = float(lora_config.lora_alpha)
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ConfigError("per-module rank_pattern/alpha_pattern LoRAs cannot be exported with one alpha")
    if getattr(lora_config, "use_rslora", False):
        raise ConfigError("rsLoRA scales by alpha/sqrt(r); the ComfyUI export writes alpha/r", "turn use_rslora off")

    comfy = _cast(to_comfyui(family, peft_sd, alpha, transformer_config, base_weights, comfyui_dtype), comfyui_dtype)
    adapter = "dora" if any(k.endswith(".dora_scale") for k in comfy) else "lora"
    meta[ADAPTER_KEY] = adapter

    files = LoraFiles(
        diffusers=out_dir / DIFFUSERS_WEIGHT_NAME, comfyui=out_dir / f"{name}_comfyui.safetensors", adapter=adapter
    )
    diffusers_sd = {DIFFUSERS_PREFIX + k: v.detach() for k, v in peft_sd.items()}
    diffusers_meta = {"format": "pt", **meta, LORA_ADAPTER_METADATA_KEY: diffusers_adapter_metadata(lora_config)}
    atomic_save_safetensors(files.diffusers, diffusers_sd, metadata=diffusers_meta)
    atomic_save_safetensors(files.comfyui, comfy, metadata={"format": "pt", **meta})
    log.info("saved LoRA: %s and %s", files.diffusers, files.comfyui)
    return files


def lycoris_metadata(settings: Mapping[str, Any]) -> dict[str, str]:
    """What both LyCORIS files record about the adapter: its type and settings, ours and kohya's keys."""
    ok, plain = _jsonable(dict(settings))
    if not ok:
        raise ConfigError("the LyCORIS settings must be JSON (numbers, strings, lists, dicts)")
    algo = str(plain.get("algo", "lokr"))
    config = json.dumps(plain, sort_keys=True)
    meta = {
        ADAPTER_KEY: algo,
        META_PREFIX + "lycoris_config": config,
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({k: v for k, v in plain.items() if k not in ("linear_dim", "linear_alpha")}),
    }
    if plain.get("linear_dim") is not None:
        meta["ss_network_dim"] = str(int(plain["linear_dim"]))
    if plain.get("linear_alpha") is not None:
        meta["ss_network_alpha"] = repr(float(plain["linear_alpha"]))
    return meta


def save_lycoris(
    out_dir: Path,
    name: str,
    family: str,
    lycoris_sd: Mapping[str, torch.Tensor],
    module_names: Mapping[str, str],
    lycoris_settings: Mapping[str, Any],
    transformer_config: Mapping[str, Any],
    base_weights: Mapping[str, torch.Tensor] | None,
    metadata: Mapping[str, str],
    comfyui_dtype: torch.dtype = torch.float32,
) -> LoraFiles:
    """Write LyCORIS's own ``<out_dir>/pytorch_lora_weights.safetensors`` and ``<out_dir>/<name>_comfyui.safetensors``.

    ``lycoris_sd`` is ``network.state_dict()``; ``module_names`` maps its module names to diffusers
    ones (``comfy_lycoris.lycoris_module_names(transformer)``); ``lycoris_settings`` are the
    settings the network was built with (JSON-able: ``LycorisSpec.model_dump()``), recorded in
    both files; ``base_weights`` (``dora.base_weights_of``) are needed for output-axis DoRA.
    The LyCORIS file keeps the network's tensors as they are (``create_lycoris_from_weights``
    reads it); the ComfyUI file's factors are cast to ``comfyui_dtype``.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    meta = _check_metadata(metadata)
    lyco_meta = lycoris_metadata(lycoris_settings)
    meta.update(lyco_meta)

    comfy = lycoris_to_comfyui(
        family,
        lycoris_sd,
        module_names,
        transformer_config,
        base_weights,
        comfyui_dtype,
        rs_lora=bool(lycoris_settings.get("rs_lora", False)),
    )
    comfy = _cast(comfy, comfyui_dtype)
    files = LoraFiles(
        diffusers=out_dir / DIFFUSERS_WEIGHT_NAME,
        comfyui=out_dir / f"{name}_comfyui.safetensors",
        adapter=meta[ADAPTER_KEY],
    )
    native = {k: v.detach().cpu() for k, v in lycoris_sd.items()}
    native_meta = {"format": "pt", **meta, LYCORIS_CONFIG_KEY: meta[META_PREFIX + "lycoris_config"]}
    atomic_save_safetensors(files.diffusers, native, metadata=native_meta)
    atomic_save_safetensors(files.comfyui, comfy, metadata={"format": "pt", **meta})
    log.info("saved LyCORIS %s: %s and %s", files.adapter, files.diffusers, files.comfyui)
    return files
