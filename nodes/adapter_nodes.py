"""Adapter Settings: which kind of adapter Train LoRA trains (LoRA, DoRA, LoKr, LoHa, LoCon, a LyCORIS file).

The node gives the adapter part of the ``lora`` section. It always states the adapter type in full
(``lora_type``, ``use_dora``, ``lycoris_config``, ``lycoris``), so connected to Train LoRA it
replaces whatever adapter an imported SimpleTuner config asked for; the rank and alpha stay on
Train LoRA (for the LyCORIS types they are the ``linear_dim`` / ``linear_alpha``). A LyCORIS
settings file is read and checked here with the importer's own reader, so a typo in it fails on
this node, before anything trains.
"""

from __future__ import annotations

import hashlib
from typing import Any

from comfy_api.latest import io, ui

from ..trainer_core.errors import ConfigError
from .config_nodes import find_file
from .run_spec import checked
from .sockets import CATEGORY_SETTINGS, TunerAdapter

LORA, DORA, LYCORIS_FILE = "LoRA", "DoRA", "LyCORIS config file"
LYCORIS_TYPES = {"LoKr": "lokr", "LoHa": "loha", "LoCon": "locon"}
ADAPTER_TYPES = [LORA, DORA, *LYCORIS_TYPES, LYCORIS_FILE]
TARGETS_DEFAULT = "default"


def target_presets() -> list[str]:
    """Every named LoRA target set of the registered families, in first-seen order."""
    from ..trainer_core.families import family_names, get_family_class

    names: list[str] = []
    for family in family_names():
        names += [n for n in get_family_class(family).lora_presets if n not in names]
    return names


def adapter_fragment(
    adapter_type: str, factor: int, decompose: bool, targets: str, lycoris_config: str, dropout: float
) -> tuple[dict[str, Any], list[str]]:
    """``({"lora": {...}}, notes)`` for these widgets; a bad choice or file raises ConfigError."""
    lora: dict[str, Any] = {"lora_type": "standard", "use_dora": False, "lycoris_config": None, "lycoris": None}
    notes: list[str] = []
    if adapter_type in (LORA, DORA):
        lora["use_dora"] = adapter_type == DORA or decompose
        lora["lora_dropout"] = dropout
    elif adapter_type in LYCORIS_TYPES:
        algo = LYCORIS_TYPES[adapter_type]
        if algo == "lokr" and factor == 0:
            raise ConfigError("factor 0 is not a Kronecker factor", "use -1 (automatic) or a factor of 2 or more")
        lycoris: dict[str, Any] = {"algo": algo, "dora_wd": decompose, "dropout": dropout}
        if algo == "lokr":
            lycoris["factor"] = factor
        lora.update(lora_type="lycoris", lycoris=lycoris)
    elif adapter_type == LYCORIS_FILE:
        from ..trainer_core.simpletuner_lycoris import load_settings

        path = find_file(lycoris_config, "lycoris_config file")
        settings, notes = load_settings(path, simpletuner=False)
        lora.update(lora_type="lycoris", lycoris_config=str(path), lycoris=settings)
        notes.append("the file's settings are used as written; factor, decompose and dropout are ignored")
    else:
        raise ConfigError(f"unknown adapter type {adapter_type!r}", f"use one of: {', '.join(ADAPTER_TYPES)}")
    if targets != TARGETS_DEFAULT:
        lora["lora_target_preset"] = targets
    return {"lora": checked("lora", lora)}, notes


def describe(fragment: dict[str, Any], notes: list[str]) -> str:
    """What the node shows: the adapter in one line, then its notes."""
    lora = fragment["lora"]
    lycoris = lora.get("lycoris")
    if lycoris is None:
        line = "DoRA (LoRA with a learned magnitude per output)" if lora["use_dora"] else "LoRA"
    else:
        shown = {k: v for k, v in lycoris.items() if k not in ("algo", "apply_preset")}
        extras = [f"{k} {v}" for k, v in shown.items() if v not in (None, False, 0, 0.0)]
        line = f"LyCORIS {lycoris['algo']}" + (f" ({', '.join(extras)})" if extras else "")
        preset = lycoris.get("apply_preset") or {}
        chosen = [*(preset.get("target_module") or []), *(preset.get("target_name") or [])]
        if chosen:
            line += f"; layers: {', '.join(chosen)}"
    if lora.get("lora_target_preset"):
        line += f"; targets: {lora['lora_target_preset']}"
    return "\n".join([line, *notes])


class TunerAdapterSettings(io.ComfyNode):
    """Adapter Settings: LoRA, DoRA, LoKr, LoHa, LoCon or a LyCORIS settings file, for Train LoRA."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerAdapterSettings",
            display_name="Adapter Settings",
            category=CATEGORY_SETTINGS,
            description="Choose what Train LoRA trains: a LoRA, a DoRA, or a LyCORIS adapter (LoKr, LoHa, LoCon, "
            "or your own LyCORIS settings file). Rank and alpha stay on Train LoRA. Every type comes out as a "
            "file that ComfyUI's stock LoRA loaders apply.",
            inputs=[
                io.Combo.Input(
                    "adapter_type",
                    options=ADAPTER_TYPES,
                    default=LORA,
                    tooltip="LoRA: two small matrices per layer (the usual). DoRA: a LoRA plus a learned magnitude "
                    "per output, often closer to full fine-tuning at the same rank. LoKr: a Kronecker product, many "
                    "fewer numbers for the same reach (SimpleTuner's Kandinsky 5 examples use it). LoHa: a Hadamard "
                    "product of two low-rank pairs (more expressive per number than LoRA). LoCon: LyCORIS's LoRA. "
                    "LyCORIS config file: a LyCORIS JSON file (SimpleTuner's lycoris_config).",
                ),
                io.Int.Input(
                    "factor",
                    default=-1,
                    min=-1,
                    max=1024,
                    tooltip="LoKr only: the Kronecker factor, the size of the smaller block of each layer's update. "
                    "-1 picks the most balanced split; 2-16 are common (smaller = fewer numbers).",
                ),
                io.Boolean.Input(
                    "decompose",
                    default=False,
                    tooltip="DoRA's weight decomposition: learn each output's magnitude apart from its direction. "
                    "For LoKr, LoHa and LoCon it is LyCORIS's dora_wd; for LoRA it makes it a DoRA.",
                ),
                io.Combo.Input(
                    "targets",
                    options=[TARGETS_DEFAULT, *target_presets()],
                    default=TARGETS_DEFAULT,
                    tooltip="Which layers get the adapter. default: what the model loader chose, else the model's "
                    "default set (also for the LyCORIS types). attention: the attention projections; "
                    "attention+ffn: also the feed-forward layers (more capacity, larger file).",
                ),
                io.String.Input(
                    "lycoris_config",
                    default="",
                    tooltip="With 'LyCORIS config file': the JSON file (absolute, or relative to ComfyUI's input "
                    "folder), e.g. a SimpleTuner lycoris_config.json. Without linear_dim / linear_alpha in it, Train "
                    "LoRA's rank and alpha are used.",
                ),
                io.Float.Input(
                    "dropout",
                    default=0.0,
                    min=0.0,
                    max=0.9,
                    step=0.01,
                    tooltip="Dropout inside the adapter while training (0 = none); 0.05-0.1 can help small datasets.",
                ),
            ],
            outputs=[TunerAdapter.Output("adapter", tooltip="The adapter settings for Train LoRA's adapter input.")],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_type: str = "", lycoris_config: str = "", **kwargs: object) -> str:
        """Editing the LyCORIS file makes ComfyUI read it again."""
        if adapter_type != LYCORIS_FILE:
            return ""
        try:
            return hashlib.sha256(find_file(lycoris_config, "lycoris_config file").read_bytes()).hexdigest()[:16]
        except (ConfigError, OSError):
            return "missing"

    @classmethod
    def execute(
        cls, adapter_type: str, factor: int, decompose: bool, targets: str, lycoris_config: str, dropout: float
    ) -> io.NodeOutput:
        fragment, notes = adapter_fragment(adapter_type, factor, decompose, targets, lycoris_config, dropout)
        return io.NodeOutput(fragment, ui=ui.PreviewText(describe(fragment, notes)))


NODES = [TunerAdapterSettings]
