"""Fine-tune Model: train every weight of the model (``model_type: full``) and hand the result to ComfyUI.

The same run machinery as Train LoRA (``train_nodes``, ``run_spec``, ``train_run``): one TrainSpec,
trained in a child process with the progress bar, live loss chart, validation previews, Cancel with
a checkpoint, and re-queueing that reuses or continues the run. What differs is the result: no
adapter, but the whole transformer, written by the engine as one ComfyUI diffusion-model file
(``trainer_core/train/comfy_model.py``) and placed in ``models/diffusion_models/comfyui-tuner/``,
where the stock "Load Diffusion Model" lists it. The node's ``MODEL`` output is that file loaded
through ComfyUI's own loader, so it samples exactly as the file does in a later graph.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_bridge as bridge
from .sockets import CATEGORY_TRAIN
from .train_nodes import (
    FULL_LEARNING_RATE,
    assemble_spec,
    publish_input,
    regularisers_input,
    run_inputs,
    run_outputs,
    tracking_input,
    train_and_show,
)


class TunerFinetuneModel(io.ComfyNode):
    """Fine-tune Model: a full fine-tune in a child process; outputs the model loaded from its file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerFinetuneModel",
            display_name="Fine-tune Model",
            category=CATEGORY_TRAIN,
            description="Fine-tune every weight of the model (a full fine-tune, not a LoRA) and load the result "
            "as a ComfyUI model. Re-queueing with the same inputs returns the finished model without training; "
            "more steps continue from the latest checkpoint; mode 'restart' starts over. Cancel stops after "
            "writing a checkpoint.",
            is_output_node=True,
            inputs=[
                *run_inputs(
                    learning_rate=io.Float.Input(
                        "learning_rate",
                        default=FULL_LEARNING_RATE,
                        min=0.0,
                        max=1.0,
                        step=0.000001,
                        round=0.0000001,
                        tooltip="Step size. A full fine-tune wants a small one: 1e-5 to 1e-6 (a LoRA's 1e-4 "
                        f"would wreck the model). 0 uses the config's value, or {FULL_LEARNING_RATE:g}.",
                    ),
                    name_tooltip="Name of the model file (plus a run id) in models/diffusion_models/comfyui-tuner/ "
                    "and of the run folder in output/comfyui-tuner/. Empty: <model family>_finetune, e.g. "
                    "lumina2_finetune.",
                ),
                regularisers_input(),
                tracking_input(),
                publish_input(),
            ],
            outputs=[
                io.Model.Output(
                    "model",
                    tooltip="The fine-tuned model, loaded from its file by ComfyUI's own loader (connect to a "
                    "sampler, e.g. through ModelSamplingAuraFlow for Lumina 2).",
                ),
                io.String.Output(
                    "model_path",
                    tooltip="The model file in models/diffusion_models/comfyui-tuner/ (Load Diffusion Model lists it).",
                ),
                *run_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        steps: int,
        learning_rate: float,
        seed: int,
        mode: str,
        name: str,
        checkpoint_every: int,
        model: dict | None = None,
        dataset: dict | None = None,
        validation: dict | None = None,
        optimizer: dict | None = None,
        spec: dict | None = None,
        memory: dict | None = None,
        tread: dict | None = None,
        regularisers: dict | None = None,
        tracking: dict | None = None,
        publish: dict | None = None,
    ) -> io.NodeOutput:
        widgets = {
            "steps": steps,
            "learning_rate": learning_rate,
            "seed": seed,
            "checkpoint_every": checkpoint_every,
        }
        train_spec = assemble_spec(
            model=model,
            dataset=dataset,
            validation=validation,
            optimizer=optimizer,
            spec=spec,
            widgets=widgets,
            name=name,
            memory=memory,
            tread=tread,
            regularisers=regularisers,
            publish=publish,
            model_type="full",
            tracking=tracking,
        )
        outcome, shown, ui = train_and_show(cls, train_spec, mode)
        path = outcome.comfyui_file
        return io.NodeOutput(bridge.load_diffusion_model(path), str(path), *shown, ui=ui)


NODES = [TunerFinetuneModel]
