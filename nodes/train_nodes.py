"""Train LoRA: merge the settings into one TrainSpec and train it in a child process.

The node itself is thin: ``run_spec`` builds and places the spec, ``train_run`` reuses a finished
run or runs the trainer (progress, previews, Cancel, errors), and this module turns the outcome
into ComfyUI outputs. The LoRA comes out as ComfyUI's own ``LORA_MODEL`` (the file's state dict,
which the stock "Load LoRA Model" node and our Apply Trained LoRA accept) and as a file in
``models/loras/comfyui-tuner/`` that the stock LoRA loaders list.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer_core.errors import ConfigError
from ..trainer_core.spec import TrainSpec
from ..trainer_core.train.plots import draw_loss_plot
from ..trainer_core.train.resolve import resolve_spec
from . import comfy_bridge as bridge
from .images import blank, sample_frames, to_tensor
from .run_spec import apply_widgets, family_defaults, merge_fragments, place_run, validate
from .sockets import (
    CATEGORY_TRAIN,
    LoraModel,
    LossMap,
    TunerAdapter,
    TunerDataset,
    TunerMemory,
    TunerModel,
    TunerOptimizer,
    TunerPublishSocket,
    TunerRegularisersSocket,
    TunerSpec,
    TunerTrackingSocket,
    TunerTread,
    TunerValidation,
)
from .train_run import UI_KEY, RunOutcome, outcome_summary, run_training

MODES = ["resume", "restart", "continue with changes"]
# A full fine-tune's learning rate when neither the widget nor a config sets one: Lumina 2's quick-start
# value for full training (the families' defaults are LoRA learning rates, ten times larger).
FULL_LEARNING_RATE = 1e-5


def merged_spec(
    *,
    model: dict | None,
    dataset: dict | None,
    validation: dict | None,
    optimizer: dict | None,
    spec: dict | None,
    widgets: dict,
    node: str = "Train LoRA",
    memory: dict | None = None,
    tread: dict | None = None,
    adapter: dict | None = None,
    regularisers: dict | None = None,
    model_type: str = "lora",
    tracking: dict | None = None,
    publish: dict | None = None,
) -> TrainSpec:
    """The validated, unplaced TrainSpec for these inputs; fails fast, before any child starts.

    Shared by Train LoRA, Fine-tune Model and Cache Embeds, so they see the same datasets, seed,
    validation prompts and memory options, and therefore address the same cache entries. The
    engine's own checks run here (``resolve_spec`` on ComfyUI's device): an unknown flavour, a frame
    count the model refuses, impossible memory options, TREAD on a model without it, a LyCORIS
    config on a full fine-tune... fail on this node.

    ``model_type`` "full" (Fine-tune Model) trains every weight of the transformer; with no
    learning rate from the widget or the fragments it uses :data:`FULL_LEARNING_RATE`, not the
    family's LoRA default.
    """
    if model is None and not (spec or {}).get("model"):
        raise ConfigError(
            f"{node} needs a model",
            "connect a model loader (Load Lumina2, Load Kandinsky5 Flavour) or an imported config to 'model'",
        )
    if dataset is None and not (spec or {}).get("datasets"):
        raise ConfigError(f"{node} needs a dataset", "connect Build Dataset (or an imported config) to 'dataset'")
    merged = merge_fragments(
        spec,
        model=model,
        datasets=(dataset or {}).get("datasets"),
        sections=[optimizer, validation, memory, tread, adapter, regularisers, tracking, publish],
    )
    if model_type == "full":
        merged.setdefault("model", {})["model_type"] = "full"
        if not merged.get("optimizer", {}).get("learning_rate"):
            merged.setdefault("optimizer", {})["learning_rate"] = FULL_LEARNING_RATE
    train_spec = validate(apply_widgets(merged, **widgets))
    # unknown flavour, bad frame counts, memory or TREAD options...: reported now, not after a model load.
    # Its warnings are not repeated here: the child reports them again as events, shown under the node.
    resolve_spec(train_spec, bridge.torch_device_name())
    return train_spec


def default_name(train_spec: TrainSpec) -> str:
    """The run's name when the name widget is empty: ``<family>_lora``, or ``<family>_finetune``."""
    kind = "finetune" if train_spec.model.model_type == "full" else "lora"
    return f"{train_spec.model.model_family}_{kind}"


def assemble_spec(
    *,
    model: dict | None,
    dataset: dict | None,
    validation: dict | None,
    optimizer: dict | None,
    spec: dict | None,
    widgets: dict,
    name: str,
    memory: dict | None = None,
    tread: dict | None = None,
    adapter: dict | None = None,
    regularisers: dict | None = None,
    model_type: str = "lora",
    tracking: dict | None = None,
    publish: dict | None = None,
) -> TrainSpec:
    """The placed TrainSpec for these inputs; fails fast on bad settings, before any child starts."""
    train_spec = merged_spec(
        model=model,
        dataset=dataset,
        validation=validation,
        optimizer=optimizer,
        spec=spec,
        widgets=widgets,
        memory=memory,
        tread=tread,
        adapter=adapter,
        regularisers=regularisers,
        model_type=model_type,
        tracking=tracking,
        publish=publish,
    )
    name = name.strip() or default_name(train_spec)
    placed, _ = place_run(
        train_spec,
        root=bridge.output_root(),
        loras_dir=bridge.loras_dir(),
        models_dir=bridge.diffusion_models_dir(),
        name=name,
    )
    return placed


def run_inputs(*, learning_rate: io.Float.Input, name_tooltip: str, between: list | None = None) -> list:
    """The inputs Train LoRA and Fine-tune Model share, in the order saved workflows store their widgets.

    ``between`` goes after ``steps`` (Train LoRA's rank and alpha), then ``learning_rate``.
    """
    return [
        TunerModel.Input("model", optional=True, tooltip="The model to train (Load Lumina2, Load Kandinsky5 Flavour)."),
        TunerDataset.Input(
            "dataset",
            optional=True,
            tooltip="The training images or videos (Build Dataset, or Cache Embeds after it).",
        ),
        io.Int.Input(
            "steps",
            default=1000,
            min=0,
            max=1_000_000,
            tooltip="Training steps. Raise it and queue again to continue a finished run. 0 keeps the "
            "connected config's value.",
        ),
        *(between or []),
        learning_rate,
        io.Int.Input(
            "seed",
            default=42,
            min=-1,
            max=2**31 - 1,
            control_after_generate=False,  # the frontend would randomise an INT named seed: a new run per queue
            tooltip="Seed of the run (noise, caption dropout, data order). -1 keeps the config's seed. "
            "Changing it starts a new run.",
        ),
        io.Combo.Input(
            "mode",
            options=MODES,
            default="resume",
            tooltip="resume: reuse a finished run or continue from its latest checkpoint. restart: delete "
            "this run's checkpoints and train from scratch (set it back to resume afterwards). continue "
            "with changes: continue the checkpoint although settings changed (e.g. more steps of a cosine "
            "schedule); resume stops and lists them.",
        ),
        io.String.Input("name", default="", tooltip=name_tooltip),
        io.Int.Input(
            "checkpoint_every",
            default=250,
            min=0,
            max=1_000_000,
            tooltip="Save a resumable checkpoint every this many steps (one is always saved at the end "
            "and on Cancel). 0 keeps the config's value.",
        ),
        TunerValidation.Input("validation", optional=True, tooltip="Sample images while training."),
        TunerOptimizer.Input("optimizer", optional=True, tooltip="Optimizer, schedule, batch size, EMA."),
        TunerSpec.Input(
            "spec",
            optional=True,
            tooltip="A whole imported setup (Import SimpleTuner Config); the other inputs override its parts.",
        ),
        TunerMemory.Input(
            "memory",
            optional=True,
            tooltip="Quantised base weights and offloading (Configure Offload/Quant), to fit the model in "
            "less GPU memory. Connect the same node to Cache Embeds.",
        ),
        TunerTread.Input(
            "tread",
            optional=True,
            tooltip="TREAD token routing (TREAD Route, chained): tokens skip middle blocks for faster "
            "steps. Kandinsky 5 only; replaces the imported config's tread_config.",
        ),
    ]


def regularisers_input() -> io.Input:
    """The optional Regularisers socket, last on Train LoRA and Fine-tune Model (saved links keep their slots)."""
    return TunerRegularisersSocket.Input(
        "regularisers",
        optional=True,
        tooltip="Training regularisers (Regularisers): scheduled sampling (rollout), which sometimes trains on "
        "inputs the model generated itself, and CREPA (steadier video). Replaces the imported config's values "
        "for the settings it sets.",
    )


def tracking_input() -> io.Input:
    """The optional Tracking socket, after regularisers on Train LoRA and Fine-tune Model (saved links keep slots)."""
    return TunerTrackingSocket.Input(
        "tracking",
        optional=True,
        tooltip="Also log the run to TensorBoard or Weights & Biases (Tracking): loss, learning rate, validation "
        "images. Replaces the imported config's report_to settings. Does not change the run folder.",
    )


def publish_input() -> io.Input:
    """The optional Publish to Hub socket, last on Train LoRA and Fine-tune Model (saved links keep their slots)."""
    return TunerPublishSocket.Input(
        "publish",
        optional=True,
        tooltip="Upload the result to the Hugging Face Hub (Publish to Hub): the files, a model card and the "
        "samples, in the background. Does not change the run folder; a failed upload is only a warning.",
    )


def run_outputs() -> list:
    """The outputs after the trained file (and its path) that Train LoRA and Fine-tune Model share."""
    return [
        io.Image.Output(
            "loss_plot", tooltip="The training loss over the steps (with CREPA on, also its term, on its own scale)."
        ),
        io.Image.Output(
            "validation_images",
            tooltip="The latest validation samples (black if none); for video models every frame of each "
            "clip, ready for CreateVideo / SaveVideo.",
        ),
        LossMap.Output("loss", tooltip="Loss values per step, for Loss Graph."),
    ]


def train_and_show(node: type[io.ComfyNode], train_spec: TrainSpec, mode: str) -> tuple[RunOutcome, tuple, dict]:
    """Train (or reuse) ``train_spec`` for ``node``: the outcome, the :func:`run_outputs` values, the ui output."""
    if mode == "continue with changes":
        train_spec.checkpointing.resume_with_changes = True
    node_id = node.hidden.unique_id if node.hidden is not None else None
    outcome = run_training(train_spec, node_id=node_id, mode=mode)
    plot = to_tensor([draw_loss_plot(outcome.history, crepa=outcome.crepa_history)])
    samples = sample_frames(outcome.validation_files) if outcome.validation_files else blank()
    loss_map = {"loss": [h[1] for h in outcome.history], "steps": [int(h[0]) for h in outcome.history]}
    # not ComfyUI's "images": the frontend would draw them under the node and grow it (issue 14,
    # item 16). The extension shows this in the node's bounded live area, also when ComfyUI
    # answers a re-queue from its cache (it re-sends the ui output, but runs nothing).
    return outcome, (plot, samples, loss_map), {UI_KEY: [outcome_summary(outcome)]}


class TunerTrainLoRA(io.ComfyNode):
    """Train LoRA: trains in a child process; re-queue continues rather than starting over."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerTrainLoRA",
            display_name="Train LoRA",
            category=CATEGORY_TRAIN,
            description="Train a LoRA. Re-queueing with the same inputs returns the finished LoRA without training; "
            "more steps continue from the latest checkpoint; mode 'restart' starts over. Cancel stops after "
            "writing a checkpoint.",
            is_output_node=True,
            inputs=[
                *run_inputs(
                    between=[
                        io.Int.Input(
                            "rank",
                            default=16,
                            min=0,
                            max=1024,
                            tooltip="LoRA rank: capacity (and file size). 8-32 suits most styles and subjects. 0 "
                            "keeps the connected config's value. For LoKr, LoHa and LoCon (Adapter Settings) it is "
                            "LyCORIS's linear_dim, unless a LyCORIS file sets its own.",
                        ),
                        io.Float.Input(
                            "alpha",
                            default=0.0,
                            min=0.0,
                            max=1024.0,
                            step=1.0,
                            tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 keeps the config's value, or "
                            "equals the rank. For the LyCORIS types it is linear_alpha, unless a LyCORIS file sets "
                            "its own.",
                        ),
                    ],
                    learning_rate=io.Float.Input(
                        "learning_rate",
                        default=0.0,
                        min=0.0,
                        max=10.0,
                        step=0.00001,
                        round=0.000001,
                        tooltip="Step size. 0 uses the config's value or the model's default "
                        f"({family_defaults('learning_rate')}).",
                    ),
                    name_tooltip="Name of the LoRA file (plus a run id) in models/loras/comfyui-tuner/ and of the "
                    "run folder in output/comfyui-tuner/. Empty: <model family>_lora, e.g. kandinsky5-image_lora.",
                ),
                TunerAdapter.Input(
                    "adapter",
                    optional=True,
                    tooltip="What kind of adapter to train (Adapter Settings): LoRA, DoRA, LoKr, LoHa, LoCon or a "
                    "LyCORIS settings file. Unconnected: a LoRA, or what the imported config asks for. Rank and "
                    "alpha here apply to every type.",
                ),
                regularisers_input(),
                tracking_input(),
                publish_input(),
            ],
            outputs=[
                LoraModel.Output("lora", tooltip="The trained LoRA (connect to Apply Trained LoRA)."),
                io.String.Output("lora_path", tooltip="The LoRA file in models/loras/comfyui-tuner/."),
                *run_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        steps: int,
        rank: int,
        alpha: float,
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
        adapter: dict | None = None,
        regularisers: dict | None = None,
        tracking: dict | None = None,
        publish: dict | None = None,
    ) -> io.NodeOutput:
        widgets = {
            "steps": steps,
            "rank": rank,
            "alpha": alpha,
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
            adapter=adapter,
            regularisers=regularisers,
            tracking=tracking,
            publish=publish,
        )
        outcome, shown, ui = train_and_show(cls, train_spec, mode)
        return io.NodeOutput(bridge.load_lora_file(outcome.comfyui_file), str(outcome.comfyui_file), *shown, ui=ui)


NODES = [TunerTrainLoRA]
