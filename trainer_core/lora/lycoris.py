"""A LyCORIS adapter (LoKr, LoHa, LoCon, full) on a diffusers transformer, built with lycoris-lora.

The network is made the way SimpleTuner makes it (``LycorisNetwork.apply_preset`` then
``create_lycoris(transformer, multiplier, linear_dim, linear_alpha, **settings)`` and
``apply_to``), so a SimpleTuner ``lycoris_config`` means the same thing here. Two differences, and
why:

- ``apply_preset`` writes class attributes of ``LycorisNetwork`` that outlive the call. Every build
  sets *all* of them, so one run's preset never leaks into the next one in the same process (the
  ComfyUI server runs many).
- Without ``apply_preset`` the family's LoRA targets apply (module-name suffixes, as for PEFT),
  rather than lycoris' own default of every Linear/Conv/Norm in the model.

Weights are fp32 trainable parameters, as for PEFT LoRA (see :func:`.adapters.add_lora`). On a
quantised base the adapter runs in ``bypass_mode`` (beside the frozen layer, never merging into
its weight), which is what quanto and torchao layers allow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..spec import LoraSpec, LycorisSpec

if TYPE_CHECKING:
    from .export import LoraFiles

log = logging.getLogger(__name__)

PREFIX = "lycoris"
# create_lycoris keyword arguments taken from LycorisSpec as they are (None: lycoris' default).
_PASSED = (
    "algo",
    "factor",
    "full_matrix",
    "decompose_both",
    "unbalanced_factorization",
    "use_tucker",
    "use_scalar",
    "rs_lora",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "dora_wd",
    "wd_on_output",
    "conv_dim",
    "conv_alpha",
    "init_lokr_norm",
)
# Algorithms lycoris gives DoRA's weight decomposition (dora_wd).
_WEIGHT_DECOMPOSABLE = ("lokr", "loha", "locon")


def _check_fit(current: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Every key of ``current`` in ``sd`` with the same shape, and nothing else; else a ConfigError naming them."""
    missing = sorted(set(current) - set(sd))
    unexpected = sorted(set(sd) - set(current))
    mismatched = sorted(k for k in set(sd) & set(current) if sd[k].shape != current[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise ConfigError(
            f"the LyCORIS weights in {source} do not fit the adapter being trained; " + "; ".join(parts),
            "use a file trained with the same lycoris_config on the same model",
        )


@contextlib.contextmanager
def _quiet_lycoris() -> Iterator[None]:
    """lycoris logs every step of building at INFO through its own handler; keep that at DEBUG level."""
    logger = logging.getLogger("LyCORIS")
    old = logger.level
    logger.setLevel(max(old, logging.WARNING) if not log.isEnabledFor(logging.DEBUG) else old)
    try:
        yield
    finally:
        logger.setLevel(old)


def target_name_patterns(suffixes: list[str]) -> list[str]:
    """Module-name suffixes (PEFT style: 'to_q', 'feed_forward.linear_1') as lycoris name patterns.

    lycoris matches ``target_name`` with ``re.match`` (anchored at the start only), so each
    suffix becomes 'any prefix ending in a dot, then the suffix, then the end'.
    """
    return [rf"^(?:.*\.)?{re.escape(s)}$" for s in suffixes]


def preset_for(lyco: LycorisSpec, family_targets: list[str]) -> dict[str, Any]:
    """Every ``LycorisNetwork.apply_preset`` key, from the spec's preset or the family's targets."""
    p = lyco.apply_preset
    if p is None or (not p.target_module and not p.target_name and not p.module_algo_map and not p.name_algo_map):
        return {
            "enable_conv": True,
            "target_module": [],
            "target_name": target_name_patterns(family_targets),
            "module_algo_map": {},
            "name_algo_map": {},
            "use_fnmatch": False,
            "exclude_name": list(p.exclude_name) if p else [],
            "lora_prefix": PREFIX,
        }
    return {
        "enable_conv": p.enable_conv,
        "target_module": list(p.target_module or []),
        "target_name": list(p.target_name or []),
        "module_algo_map": {k: dict(v) for k, v in p.module_algo_map.items()},
        "name_algo_map": {k: dict(v) for k, v in p.name_algo_map.items()},
        "use_fnmatch": p.use_fnmatch,
        "exclude_name": list(p.exclude_name),
        "lora_prefix": PREFIX,
    }


def network_settings(spec: LoraSpec, quantised: bool) -> dict[str, Any]:
    """The keyword arguments of ``create_lycoris`` (besides the module), checked before any model loads."""
    lyco = spec.lycoris
    if lyco is None:
        raise ConfigError("lora_type 'lycoris' needs LyCORIS settings", "set lycoris_config to a LyCORIS JSON file")
    dora = lyco.dora_wd or spec.use_dora
    if dora and lyco.algo not in _WEIGHT_DECOMPOSABLE:
        raise ConfigError(
            f"LyCORIS algo {lyco.algo!r} has no weight decomposition (dora_wd / use_dora)",
            f"use one of {', '.join(_WEIGHT_DECOMPOSABLE)}, or turn dora_wd and use_dora off",
        )
    bypass = lyco.bypass_mode
    if quantised and bypass is False:
        raise ConfigError(
            "bypass_mode false on a quantised base: LyCORIS would merge into quantised weights, which it cannot",
            "remove bypass_mode from the lycoris_config (it turns on by itself on quantised bases), or set "
            "base_model_precision no_change",
        )
    if quantised and lyco.algo == "full":
        raise ConfigError(
            "LyCORIS algo 'full' trains a full copy of each weight and cannot run beside a quantised base",
            "set base_model_precision no_change, or use lokr/loha/locon",
        )
    if bypass is None:
        bypass = quantised
    if lyco.algo == "full" and bypass:
        raise ConfigError(
            "LyCORIS algo 'full' cannot run in bypass_mode", "remove bypass_mode from the lycoris_config"
        )
    if dora and bypass:
        raise ConfigError(
            "LyCORIS ignores dora_wd / use_dora in bypass_mode"
            + (" (which quantised bases need)" if quantised else "")
            + ": the magnitude would never train, so the result would be a plain "
            + lyco.algo,
            "use base_model_precision no_change for LyCORIS DoRA, or train PEFT DoRA (lora_type standard, "
            "use_dora true), which trains on quantised bases",
        )
    settings: dict[str, Any] = {
        "multiplier": float(lyco.multiplier),
        "linear_dim": int(lyco.linear_dim or spec.lora_rank),
        "linear_alpha": float(lyco.linear_alpha if lyco.linear_alpha is not None else spec.alpha),
        "bypass_mode": bool(bypass),
    }
    for key in _PASSED:
        value = getattr(lyco, key)
        if value is not None:
            settings[key] = value
    settings["dora_wd"] = bool(dora)
    return settings


class LycorisAdapter:
    """The trained LyCORIS network on ``transformer``: parameters, state dicts, settings for the files."""

    def __init__(
        self, transformer: torch.nn.Module, spec: LoraSpec, family_targets: list[str], quantised: bool, family: str
    ) -> None:
        from lycoris import LycorisNetwork, create_lycoris

        self.spec = spec
        self.family = family
        self.transformer = transformer
        self.settings = network_settings(spec, quantised)
        self.preset = preset_for(spec.lycoris, family_targets)  # type: ignore[arg-type]
        transformer.requires_grad_(False)
        settings = dict(self.settings)
        multiplier = settings.pop("multiplier")
        dim = settings.pop("linear_dim")
        alpha = settings.pop("linear_alpha")
        with _quiet_lycoris():
            LycorisNetwork.apply_preset(self.preset)
            try:
                self.network = create_lycoris(
                    transformer, multiplier, linear_dim=dim, linear_alpha=alpha, warn_on_unmatched=False, **settings
                )
            except (KeyError, ValueError, TypeError, AssertionError) as e:
                raise ConfigError(f"lycoris cannot build this adapter: {e}", "check the lycoris_config settings") from e
        if not self.network.loras:
            raise ConfigError(
                "the LyCORIS preset matched no module of the transformer "
                f"(target_module {self.preset['target_module']}, target_name {self.preset['target_name']})",
                "use the model's module class names (e.g. Kandinsky5Attention) or module names in apply_preset",
            )
        with _quiet_lycoris():
            self.network.apply_to()
        device = next(transformer.parameters()).device
        self.network.to(device=device)
        for p in self.network.parameters():
            p.data = p.data.to(torch.float32)
        self.network.requires_grad_(True)
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.module_names = {lora.lora_name: name for name, lora in self._adapted_modules(transformer).items()}

    def _adapted_modules(self, transformer: torch.nn.Module) -> dict[str, Any]:
        """diffusers module name -> the lycoris module adapting it."""
        by_name = {PREFIX + "_" + n.replace(".", "_"): n for n, _ in transformer.named_modules() if n}
        out = {}
        for lora in self.network.loras:
            if lora.lora_name not in by_name:
                raise ConfigError(f"lycoris module {lora.lora_name} does not name a module of the transformer")
            out[by_name[lora.lora_name]] = lora
        return out

    @property
    def kind(self) -> str:
        return self.spec.adapter_kind

    @property
    def rank(self) -> int:
        return int(self.settings["linear_dim"])

    @property
    def alpha(self) -> float:
        return float(self.settings["linear_alpha"])

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.module_names.values())

    def lycoris_config(self) -> dict[str, Any]:
        """The settings as a lycoris_config JSON object (what the files' metadata records)."""
        out = {k: v for k, v in self.settings.items()}
        out["apply_preset"] = {k: v for k, v in self.preset.items() if k != "lora_prefix"}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the network's own parameters and buffers (checkpoints: exact resume).

        Not ``network.state_dict()``: LyCORIS overrides that with its file form (LoKr's ``lokr_w1``
        times ``scalar``, ``full``'s difference to the base weight), which :meth:`file_state_dict` writes.
        """
        return {k: v.detach().clone() for k, v in self._raw_tensors().items()}

    def _raw_tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.network.named_parameters()), **dict(self.network.named_buffers())}

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """LyCORIS's file form of the weights (``lycoris_<module>.<param>``), what the files hold."""
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Put a :meth:`state_dict` back; every key must exist and fit."""
        current = self._raw_tensors()
        _check_fit(current, sd, source)
        with torch.no_grad():
            for key, tensor in current.items():
                tensor.copy_(sd[key].to(device=tensor.device, dtype=tensor.dtype))

    def load_file_state_dict(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        """Put a :meth:`file_state_dict` (a LyCORIS file's tensors) into the network, through LyCORIS's load hooks."""
        _check_fit(self.network.state_dict(), sd, source)
        raw = self._raw_tensors()
        dtypes = {k: v.dtype for k, v in raw.items()}
        result = self.network.load_state_dict(dict(sd), strict=False)
        if result.missing_keys or result.unexpected_keys:  # LyCORIS's hooks map its file form onto its parameters
            raise ConfigError(
                f"lycoris could not load the weights in {source}: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}",
                "use a file trained with the same lycoris_config on the same model",
            )
        for key, tensor in self._raw_tensors().items():  # loading may replace tensors; training stays fp32
            if tensor.dtype != dtypes[key]:
                tensor.data = tensor.data.to(dtypes[key])

    def load_file(self, path: str | Path) -> None:
        """Start from a LyCORIS file (``init_lora``): our LyCORIS file, or our ComfyUI file of the same adapter."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            tensors = load_file(str(path))
        except FileNotFoundError as e:
            raise ConfigError(f"init_lora file {path} does not exist") from e
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"init_lora file {path} is not a readable safetensors file: {e}") from e
        if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors):
            raise ConfigError(
                f"init_lora file {path} holds a LoRA (lora_A/lora_B), but the adapter being trained is LyCORIS "
                f"{self.kind}",
                "set lora_type 'standard' to continue that LoRA, or give a LyCORIS file of this adapter",
            )
        if any(k.startswith("diffusion_model.") for k in tensors):
            from .comfy_lycoris import comfyui_to_lycoris

            tensors = comfyui_to_lycoris(
                self.family, tensors, self.module_names, dict(self.transformer.config), self._base_weights()
            )
        self.load_file_state_dict(tensors, source=f"init_lora file {path}")
        log.info("initialised the LyCORIS adapter from %s", path)

    def save(self, folder: Path, name: str, metadata: Mapping[str, str]) -> LoraFiles:
        """LyCORIS's own file (``pytorch_lora_weights.safetensors``) and the ComfyUI file."""
        from .export import save_lycoris

        return save_lycoris(
            folder,
            name,
            self.family,
            self.file_state_dict(),
            self.module_names,
            self.lycoris_config(),
            dict(self.transformer.config),
            self._base_weights(),
            metadata,
        )

    def _base_weights(self) -> dict[str, torch.Tensor] | None:
        """The base weights an output-axis DoRA (``dora_wd``) needs for ComfyUI's ``dora_scale``; else None."""
        if not self.settings.get("dora_wd"):
            return None
        from .dora import base_weights_of

        return base_weights_of(self.transformer, list(self.module_names.values()))

    @contextlib.contextmanager
    def at_strength(self, multiplier: float) -> Iterator[None]:
        """Scale the adapter's effect by ``multiplier`` times its own inside the block (validation)."""
        base = float(self.settings["multiplier"])
        self.network.set_multiplier(base * multiplier)
        try:
            yield
        finally:
            self.network.set_multiplier(base)

    def metadata(self) -> dict[str, str]:
        return {
            "adapter": self.kind,
            "lycoris_config": json.dumps(self.lycoris_config(), sort_keys=True),
        }
