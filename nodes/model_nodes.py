"""Model loader nodes. They load nothing: they say which weights the trainer should load.

The trainer runs in a child process that loads the model itself, so these nodes only produce the
``model`` section of the TrainSpec. Weights come from one of three places, most specific first:
a typed Hugging Face repo id or local folder, a diffusers-layout folder under ComfyUI's
``models/diffusers``, or the flavour's published repo (downloaded to the Hugging Face cache).
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer_core.errors import ModelLoadError
from . import comfy_bridge as bridge
from .run_spec import checked
from .sockets import CATEGORY_MODELS, TunerModel

FLAVOUR_DEFAULT_WEIGHTS = "(flavour's Hugging Face repo)"


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


NODES = [TunerLoadLumina2]
