"""Model loader nodes. They load nothing: they say which weights the trainer should load.

The trainer runs in a child process that loads the model itself, so these nodes only produce the
``model`` section of the TrainSpec (plus, for Kandinsky 5, the LoRA target preset). Weights come
from one of three places, most specific first: a typed Hugging Face repo id or local folder, a
diffusers-layout folder under ComfyUI's ``models/diffusers``, or the flavour's published repo
(downloaded to the Hugging Face cache).

Flavours, defaults and LoRA presets are read from the trainer's model families, the one place they
are defined: the Kandinsky 5 loader lists the flavours of every registered ``kandinsky5-*`` family,
so image (t2i, i2i) and video (t2v, i2v) flavours share one dropdown, and a new family appears there
once the trainer registers it.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer_core.errors import ConfigError, ModelLoadError
from . import comfy_bridge as bridge
from .run_spec import checked
from .sockets import CATEGORY_MODELS, TunerModel

FLAVOUR_DEFAULT_WEIGHTS = "(flavour's Hugging Face repo)"
FAMILY_DEFAULT_PRESET = "default"
KANDINSKY5_PREFIX = "kandinsky5"


def _lumina2_flavours() -> dict[str, str]:
    """flavour -> description, from the family (the one place flavours are defined)."""
    from ..trainer_core.families.lumina2 import Lumina2Family

    return {name: f.description or f.repo_id for name, f in Lumina2Family.flavours.items()}


def weights_source(weights: str, repo_id: str) -> str | None:
    """``pretrained_model_name_or_path`` from the two weight inputs (None: the flavour's repo)."""
    typed = repo_id.strip()
    if typed:
        return str(Path(typed).expanduser()) if Path(typed).expanduser().exists() else typed
    if weights and weights != FLAVOUR_DEFAULT_WEIGHTS:
        path = bridge.diffusers_model_path(weights)
        if path is None:
            raise ModelLoadError(
                f"{weights!r} is not a diffusers model folder under models/diffusers (no model_index.json)",
                "refresh the node list, or pick the folder that holds model_index.json",
            )
        return str(path)
    return None


class TunerLoadLumina2(io.ComfyNode):
    """Load Lumina2: which Lumina 2 weights and flavour to train."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        flavours = _lumina2_flavours()
        return io.Schema(
            node_id="TunerLoadLumina2",
            display_name="Load Lumina2",
            category=CATEGORY_MODELS,
            description="Choose the Lumina 2 model to train a LoRA for. Nothing is loaded here: the trainer loads "
            "the weights in its own process when training starts.",
            inputs=[
                io.Combo.Input(
                    "flavour",
                    options=list(flavours),
                    default="2.0",
                    tooltip="Which published model: "
                    + "; ".join(f"{name} = {desc}" for name, desc in flavours.items())
                    + ". Sets the defaults, including the system prompt.",
                ),
                io.Combo.Input(
                    "weights",
                    options=[FLAVOUR_DEFAULT_WEIGHTS, *bridge.diffusers_models()],
                    default=FLAVOUR_DEFAULT_WEIGHTS,
                    tooltip="A diffusers-layout model folder (with model_index.json) from ComfyUI's models/diffusers "
                    "folder, or the flavour's Hugging Face repo (downloaded on first use).",
                ),
                io.String.Input(
                    "repo_id",
                    default="",
                    tooltip="Optional: a Hugging Face repo id (e.g. Alpha-VLLM/Lumina-Image-2.0) or a local "
                    "diffusers folder. Overrides 'weights' when set.",
                ),
                io.String.Input(
                    "system_prompt",
                    default="",
                    multiline=True,
                    tooltip="Text put before every caption. Empty uses the flavour's default system prompt; "
                    "whichever is used is stored in the LoRA's metadata. Use the same one when sampling.",
                ),
            ],
            outputs=[TunerModel.Output("model", tooltip="The model part of the training settings.")],
        )

    @classmethod
    def execute(cls, flavour: str, weights: str, repo_id: str, system_prompt: str) -> io.NodeOutput:
        section = {
            "model_family": "lumina2",
            "model_flavour": flavour,
            "pretrained_model_name_or_path": weights_source(weights, repo_id),
            "system_prompt": system_prompt if system_prompt.strip() else None,
        }
        return io.NodeOutput({"model": checked("model", section)})


def kandinsky5_families() -> list[type]:
    """The registered Kandinsky 5 families (image, video), in registry order."""
    from ..trainer_core.families import family_names, get_family_class

    return [get_family_class(name) for name in family_names() if name.startswith(KANDINSKY5_PREFIX)]


def kandinsky5_flavours() -> dict[str, tuple[type, str]]:
    """dropdown entry -> (family, flavour) over every Kandinsky 5 family.

    Entries are the flavour names; a name two families share is qualified as ``family:flavour``.
    """
    families = kandinsky5_families()
    seen: dict[str, int] = {}
    for family in families:
        for name in family.flavours:
            seen[name] = seen.get(name, 0) + 1
    return {
        (name if seen[name] == 1 else f"{family.name}:{name}"): (family, name)
        for family in families
        for name in family.flavours
    }


def _k5_presets() -> list[str]:
    names: list[str] = []
    for family in kandinsky5_families():
        names += [p for p in family.lora_presets if p not in names]
    return names


class TunerLoadKandinsky5Flavour(io.ComfyNode):
    """Load Kandinsky5 Flavour: which Kandinsky 5 weights and flavour to train, and which layers get a LoRA."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        flavours = kandinsky5_flavours()
        default = next(k for k, (family, name) in flavours.items() if name == family.default_flavour)
        default_preset = kandinsky5_families()[0].default_lora_preset
        return io.Schema(
            node_id="TunerLoadKandinsky5Flavour",
            display_name="Load Kandinsky5 Flavour",
            category=CATEGORY_MODELS,
            description="Choose the Kandinsky 5 model to train a LoRA for. Nothing is loaded here: the trainer "
            "loads the weights in its own process when caching or training starts.",
            inputs=[
                io.Combo.Input(
                    "flavour",
                    options=list(flavours),
                    default=default,
                    tooltip="Which published model: "
                    + "; ".join(
                        f"{key} = {family.flavours[name].description}" for key, (family, name) in flavours.items()
                    )
                    + ". Sets the defaults (shift, guidance, resolution). Image-editing (i2i) flavours train on "
                    "pairs: Build Dataset's reference_folder holds the source images. Video flavours (t2v, i2v) "
                    "need Video Options on Build Dataset.",
                ),
                io.Combo.Input(
                    "weights",
                    options=[FLAVOUR_DEFAULT_WEIGHTS, *bridge.diffusers_models()],
                    default=FLAVOUR_DEFAULT_WEIGHTS,
                    tooltip="A diffusers-layout model folder (with model_index.json) from ComfyUI's models/diffusers "
                    "folder, or the flavour's Hugging Face repo (downloaded on first use).",
                ),
                io.String.Input(
                    "repo_id",
                    default="",
                    tooltip="Optional: a Hugging Face repo id (e.g. kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers) "
                    "or a local diffusers folder. Overrides 'weights' when set.",
                ),
                io.Combo.Input(
                    "lora_targets",
                    options=[FAMILY_DEFAULT_PRESET, *_k5_presets()],
                    default=FAMILY_DEFAULT_PRESET,
                    tooltip=f"Which layers get a LoRA. default: the model's default ({default_preset}). attention: "
                    "query, key and value of self- and cross-attention; attention+ffn: also the attention outputs and "
                    "the feed-forward layers (more capacity, larger file). Modulation layers are never trained.",
                ),
            ],
            outputs=[TunerModel.Output("model", tooltip="The model part of the training settings.")],
        )

    @classmethod
    def execute(cls, flavour: str, weights: str, repo_id: str, lora_targets: str) -> io.NodeOutput:
        flavours = kandinsky5_flavours()
        if flavour not in flavours:
            raise ConfigError(f"{flavour!r} is not a Kandinsky 5 flavour", f"use one of: {', '.join(flavours)}")
        family, name = flavours[flavour]
        section = {
            "model_family": family.name,
            "model_flavour": name,
            "pretrained_model_name_or_path": weights_source(weights, repo_id),
        }
        fragment = {"model": checked("model", section)}
        if lora_targets != FAMILY_DEFAULT_PRESET:
            if lora_targets not in family.lora_presets:
                raise ConfigError(
                    f"LoRA targets {lora_targets!r} are not defined for {family.name}",
                    f"use one of: {FAMILY_DEFAULT_PRESET}, {', '.join(family.lora_presets)}",
                )
            fragment["lora"] = checked("lora", {"lora_target_preset": lora_targets})
        return io.NodeOutput(fragment)


NODES = [TunerLoadLumina2, TunerLoadKandinsky5Flavour]
