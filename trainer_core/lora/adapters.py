"""Creating, reading and restoring the trained LoRA adapter on a diffusers transformer.

The adapter lives inside the transformer through diffusers' PEFT integration (``add_adapter``),
so the engine trains the real model classes and diffusers' own loaders can read what we save.
State dicts here use PEFT's names without the adapter name ('<module>.lora_A.weight'), which is
what ``get_peft_model_state_dict`` produces and what both export formats start from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import ConfigError
from ..spec import LoraSpec
from .comfy_keys import PREFIX as COMFY_PREFIX
from .comfy_keys import from_comfyui
from .dora import base_weights_of
from .export import DIFFUSERS_PREFIX, LORA_ADAPTER_METADATA_KEY, LoraFiles, save_lora

log = logging.getLogger(__name__)

LUMINA2_TARGETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+ffn": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "feed_forward.linear_1",
        "feed_forward.linear_2",
        "feed_forward.linear_3",
    ],
}

class LoraKeyMismatchError(ConfigError):
    """A LoRA state dict does not fit the adapter: keys missing, unexpected, or of another shape."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message, "use a LoRA trained with the same targets and rank on the same model")
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def lora_config(spec: LoraSpec, target_modules: list[str], init_weights: bool | str = True) -> LoraConfig:
    """The PEFT config of the adapter the spec asks for."""
    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(target_modules),
        init_lora_weights=init_weights,
        use_dora=spec.use_dora,
    )


def _adapter_name(transformer: torch.nn.Module) -> str:
    configs = getattr(transformer, "peft_config", None) or {}
    if len(configs) == 1:
        return next(iter(configs))
    if "default" in configs or not configs:
        return "default"
    raise ConfigError(f"the transformer holds several adapters ({', '.join(configs)}); expected one")


def adapter_config(transformer: torch.nn.Module) -> LoraConfig:
    """The LoraConfig of the transformer's (single) adapter."""
    configs = getattr(transformer, "peft_config", None) or {}
    name = _adapter_name(transformer)
    if name not in configs:
        raise ConfigError("the transformer has no LoRA adapter yet", "call add_lora first")
    return configs[name]


def add_lora(transformer: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the transformer, add the adapter and return its parameters, cast to float32.

    LoRA weights stay in fp32 even when the base model is bf16: updates of lr·grad are far
    below bf16's resolution for weights of order 1e-2, so bf16 LoRA weights would barely move.
    """
    transformer.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            # On a torchao-quantised base PEFT wraps each linear in TorchaoLoraLinear and warns that
            # merge()/unmerge() will fail without transformers' TorchAoConfig (it would re-quantise
            # the merged weight with it). We never merge: the adapter is trained and exported as is.
            # Handing PEFT that callable means faking diffusers' hf_quantizer, which changes how
            # diffusers moves and saves the model, so this one warning is dropped instead.
            warnings.filterwarnings(
                "ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning
            )
            transformer.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(
            f"cannot add the LoRA: {e}", "check peft_lora_target_modules / lora_target_preset for this model"
        ) from e
    params = [p for n, p in transformer.named_parameters() if p.requires_grad and "lora_" in n]
    if not params:
        raise ConfigError(f"the LoRA targets {sorted(config.target_modules or [])} matched no trainable module")
    for p in params:
        p.data = p.data.to(torch.float32)
    return params


def adapter_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached snapshot of the adapter: keys '<module>.lora_A.weight' (no adapter name)."""
    sd = get_peft_model_state_dict(transformer, adapter_name=_adapter_name(transformer))
    return {k: v.detach().clone() for k, v in sd.items()}


def load_adapter_state_dict(transformer: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Put ``sd`` into the adapter; every key must exist and fit (PEFT alone would skip mismatches)."""
    name = _adapter_name(transformer)
    current = get_peft_model_state_dict(transformer, adapter_name=name)
    missing = sorted(set(current) - set(sd))
    unexpected = sorted(set(sd) - set(current))
    mismatched = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(current[k].shape)}"
        for k in set(sd) & set(current)
        if sd[k].shape != current[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise LoraKeyMismatchError(
            "the LoRA weights do not fit the adapter; " + "; ".join(parts), missing, unexpected, mismatched
        )
    set_peft_model_state_dict(transformer, dict(sd), adapter_name=name)


def _lora_ranks(transformer: torch.nn.Module) -> dict[str, int]:
    """diffusers module name -> rank of the adapter on it."""
    name = _adapter_name(transformer)
    return {n: m.r[name] for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and name in m.r}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError as e:
        raise ConfigError(f"init_lora file {path} does not exist") from e
    except Exception as e:  # safetensors raises its own error types for broken files
        raise ConfigError(f"init_lora file {path} is not a readable safetensors file: {e}") from e


def _diffusers_file_alpha(metadata: Mapping[str, str]) -> float | None:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            value: Any = json.loads(raw).get(DIFFUSERS_PREFIX + "lora_alpha")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value is not None:
            return float(value)
    ours = metadata.get("comfyui_tuner.alpha")
    return float(ours) if ours else None


def _dora_base_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Base weights of the DoRA-adapted modules (ComfyUI's ``dora_scale`` is baked against them); None for a LoRA."""
    config = adapter_config(transformer)
    if not getattr(config, "use_dora", False):
        return None
    suffix = ".base_layer"
    names = [n[: -len(suffix)] for n, _ in transformer.named_modules() if n.endswith(suffix)]
    return base_weights_of(transformer, names)  # peft's layers expose their base layer's weight


def load_lora_file(path: str | Path, transformer: torch.nn.Module, family: str) -> None:
    """Start the adapter from a LoRA file (``init_lora``): our diffusers file or our ComfyUI file.

    The adapter must already exist with the same targets and rank. If the file's alpha differs
    from the adapter's, lora_B is rescaled so that the loaded LoRA has the same effect as in the file.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise ConfigError(f"init_lora file {path} holds no tensors")
    adapter_alpha = float(adapter_config(transformer).lora_alpha)
    lycoris = [k for k in tensors if k.startswith("lycoris_") or k.endswith((".lokr_w1", ".hada_w1_a", ".diff"))]
    if lycoris:
        raise ConfigError(
            f"init_lora file {path} holds a LyCORIS adapter (e.g. {lycoris[0]}), but the adapter being trained is "
            "a PEFT LoRA",
            "set lora_type 'lycoris' with the same lycoris_config to continue it",
        )
    if any(k.startswith(COMFY_PREFIX) for k in tensors):
        sd, file_alpha = from_comfyui(
            family,
            tensors,
            dict(transformer.config),
            expected_ranks=_lora_ranks(transformer),
            base_weights=_dora_base_weights(transformer),
        )
    else:
        if any(k.startswith(DIFFUSERS_PREFIX) for k in tensors):
            others = sorted(k for k in tensors if not k.startswith(DIFFUSERS_PREFIX))
            if others:
                raise ConfigError(
                    f"init_lora file {path} also holds non-transformer weights (e.g. {others[0]})",
                    "only transformer LoRAs can be continued",
                )
            sd = {k[len(DIFFUSERS_PREFIX) :]: v for k, v in tensors.items()}
        else:
            sd = dict(tensors)
        file_alpha = _diffusers_file_alpha(metadata)
        if file_alpha is None:
            log.warning("%s records no lora_alpha; assuming the adapter's %g", path, adapter_alpha)
            file_alpha = adapter_alpha
    if abs(file_alpha - adapter_alpha) > 1e-6 * adapter_alpha:
        log.warning(
            "%s was trained with lora_alpha %g, the adapter uses %g; rescaling lora_B to keep its effect",
            path,
            file_alpha,
            adapter_alpha,
        )
        factor = file_alpha / adapter_alpha
        sd = {k: v * factor if k.endswith(".lora_B.weight") else v for k, v in sd.items()}
    try:
        load_adapter_state_dict(transformer, sd)
    except LoraKeyMismatchError as e:
        raise ConfigError(f"init_lora file {path} does not match the adapter being trained: {e.message}", e.hint) from e
    log.info("initialised the LoRA from %s", path)


class PeftAdapter:
    """A PEFT LoRA (or DoRA, ``use_dora``) inside the transformer, through diffusers' ``add_adapter``."""

    def __init__(self, transformer: torch.nn.Module, spec: LoraSpec, targets: list[str], family: str) -> None:
        self.spec = spec
        self.family = family
        self.transformer = transformer
        self.config = lora_config(spec, targets)
        self.params = add_lora(transformer, self.config)

    @property
    def kind(self) -> str:
        return self.spec.adapter_kind

    @property
    def target_modules(self) -> list[str]:
        return list(self.config.target_modules)

    @property
    def rank(self) -> int:
        return int(self.config.r)

    @property
    def alpha(self) -> float:
        return float(self.config.lora_alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.transformer)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
        load_adapter_state_dict(self.transformer, sd)

    def load_file(self, path: str | Path) -> None:
        load_lora_file(path, self.transformer, self.family)

    def metadata(self) -> dict[str, str]:
        return {"adapter": self.kind}

    def at_strength(self, multiplier: float) -> contextlib.AbstractContextManager[None]:
        """PEFT LoRA validates at full strength: SimpleTuner's validation_lycoris_strength is for LyCORIS only."""
        return contextlib.nullcontext()

    def save(self, folder: Path, name: str, metadata: Mapping[str, str]) -> LoraFiles:
        return save_lora(
            folder,
            name,
            self.family,
            self.state_dict(),
            self.config,
            dict(self.transformer.config),
            dict(metadata),
            base_weights=_dora_base_weights(self.transformer),
        )
