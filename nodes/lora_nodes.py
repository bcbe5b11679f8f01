"""Using a trained LoRA in the same graph: apply it to a ComfyUI model, and plot its loss.

Apply Trained LoRA patches the model exactly as the stock LoRA loaders do
(``comfy.sd.load_lora_for_models``), so a LoRA from Train LoRA behaves the same whether it comes
through this node or through "LoraLoaderModelOnly" reading the file from ``loras/comfyui-tuner``.
Loss Graph accepts ComfyUI's ``LOSS_MAP`` (ours adds the step numbers; the stock trainer's
works too) and draws it with the trainer's own plot, which copes with flat or single-point curves.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io, ui

from ..trainer_core.train.plots import draw_loss_plot
from . import comfy_bridge as bridge
from .images import to_tensor
from .sockets import CATEGORY_LORA, LoraModel, LossMap


class TunerApplyTrainedLoRA(io.ComfyNode):
    """Apply Trained LoRA: MODEL + LoRA + strength -> MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerApplyTrainedLoRA",
            display_name="Apply Trained LoRA",
            category=CATEGORY_LORA,
            description="Apply a LoRA from Train LoRA to a ComfyUI model, to sample with it in the same graph.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The diffusion model to apply the LoRA to (e.g. from Load Diffusion Model)."
                ),
                LoraModel.Input("lora", tooltip="The trained LoRA (Train LoRA's 'lora' output)."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the model; 0 returns the model unchanged, negative "
                    "values push away from what it learned.",
                ),
            ],
            outputs=[io.Model.Output("model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model: Any, lora: dict, strength: float) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        return io.NodeOutput(bridge.apply_lora(model, lora, strength))


class TunerLossGraph(io.ComfyNode):
    """Loss Graph: a training loss history as an image, shown on the node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerLossGraph",
            display_name="Loss Graph",
            category=CATEGORY_LORA,
            description="Plot the loss of a training run (raw values and a smoothed curve).",
            is_output_node=True,
            inputs=[LossMap.Input("loss", tooltip="Loss values from Train LoRA (or ComfyUI's own trainer).")],
            outputs=[io.Image.Output("plot", tooltip="The loss plot as an image.")],
        )

    @classmethod
    def execute(cls, loss: dict) -> io.NodeOutput:
        values = [float(v) for v in loss.get("loss") or []]
        steps = loss.get("steps") or list(range(1, len(values) + 1))
        image = to_tensor([draw_loss_plot([[float(s), v] for s, v in zip(steps, values)])])
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [TunerApplyTrainedLoRA, TunerLossGraph]
