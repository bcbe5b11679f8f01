"""Regularisers: training regularisers for Train LoRA and Fine-tune Model, as one settings node.

- Scheduled sampling (rollout, ``trainer_core/train/scheduled_sampling.py``): with a probability
  per step, the model first denoises its training input for ``k`` Euler steps itself, and learns on
  that self-made input, so it learns to correct its own drift; ReflexFlow's loss terms come with it
  unless turned off. SimpleTuner's ``scheduled_sampling_*`` keys.
- CREPA (``trainer_core/routing/crepa.py``): aligns a block's hidden states with DINOv2 features of
  each frame and its neighbours (Kandinsky 5 video), or with a deeper block's (``backbone``, also
  Kandinsky 5 image and Lumina 2). SimpleTuner's ``crepa_*`` keys; the rarer ones (neighbour normalisation,
  similarity cut-off, ...) come from an imported config.

The output is a TrainSpec fragment, one section per regulariser (``{"scheduled_sampling": {...},
"crepa": {...}}``), each checked here with the engine's rules so a bad value is reported on this
node. To add a regulariser: append its inputs to :func:`regulariser_inputs`, write a function that
turns the node's values into its section, and list it in :data:`SECTION_BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from comfy_api.latest import io, ui

from .run_spec import checked
from .sockets import CATEGORY_SETTINGS, TunerRegularisersSocket

RAMP_SHAPES = ["linear", "cosine"]
STRATEGIES = ["uniform", "biased_early", "biased_late"]


def scheduled_sampling_section(values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``scheduled_sampling`` section from the node's values (SimpleTuner's keys); off: the offset only."""
    if int(values["max_step_offset"]) <= 0:  # the other values cannot matter: the run folder stays the plain one
        return "scheduled_sampling", {"scheduled_sampling_max_step_offset": 0}
    return "scheduled_sampling", {
        "scheduled_sampling_max_step_offset": int(values["max_step_offset"]),
        "scheduled_sampling_probability": float(values["probability"]),
        "scheduled_sampling_ramp_steps": int(values["ramp_steps"]),
        "scheduled_sampling_prob_start": float(values["prob_start"]),
        "scheduled_sampling_prob_end": float(values["prob_end"]),
        "scheduled_sampling_start_step": int(values["start_step"]),
        "scheduled_sampling_ramp_shape": str(values["ramp_shape"]),
        "scheduled_sampling_strategy": str(values["strategy"]),
        "scheduled_sampling_sampler": "euler",
        "scheduled_sampling_reflexflow": bool(values["reflexflow"]),
    }


CREPA_TEACHERS = ["dinov2 (encoder)", "backbone (deeper block)"]
CREPA_SCHEDULERS = ["constant", "linear", "cosine", "polynomial"]


CREPA_DEFAULTS: dict[str, Any] = {
    "crepa": False,
    "crepa_teacher": CREPA_TEACHERS[0],
    "crepa_block_index": 8,
    "crepa_teacher_block": -1,
    "crepa_lambda": 0.5,
    "crepa_adjacent_distance": 1,
    "crepa_adjacent_tau": 1.0,
    "crepa_encoder": "dinov2_vitg14",
    "crepa_encoder_image_size": 518,
    "crepa_scheduler": "constant",
    "crepa_lambda_end": 0.0,
    "crepa_cutoff_step": 0,
    "crepa_teacher_cache": True,
}
"""The CREPA inputs' defaults: also what a workflow saved before they existed runs with."""


def crepa_section(values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``crepa`` section from the node's values (SimpleTuner's keys); off: only ``crepa_enabled``.

    Off, nothing else is set, so an imported config's other CREPA keys stay and the run folder is the
    one it would be without this node.
    """
    if not values["crepa"]:
        return "crepa", {"crepa_enabled": False}
    backbone = str(values["crepa_teacher"]).startswith("backbone")
    teacher_block = int(values["crepa_teacher_block"])
    return "crepa", {
        "crepa_enabled": True,
        "crepa_feature_source": "backbone" if backbone else "encoder",
        "crepa_block_index": int(values["crepa_block_index"]),
        "crepa_teacher_block_index": teacher_block if teacher_block >= 0 else None,
        "crepa_lambda": float(values["crepa_lambda"]),
        "crepa_adjacent_distance": int(values["crepa_adjacent_distance"]),
        "crepa_adjacent_tau": float(values["crepa_adjacent_tau"]),
        "crepa_encoder": str(values["crepa_encoder"]).strip(),
        "crepa_encoder_image_size": int(values["crepa_encoder_image_size"]),
        "crepa_scheduler": str(values["crepa_scheduler"]),
        "crepa_lambda_end": float(values["crepa_lambda_end"]),
        "crepa_cutoff_step": int(values["crepa_cutoff_step"]),
        "crepa_teacher_cache": bool(values["crepa_teacher_cache"]),
    }


SECTION_BUILDERS: list[Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]] = [
    scheduled_sampling_section,
    crepa_section,
]
"""One function per regulariser: the node's values -> (TrainSpec section, its values)."""


def regulariser_fragment(values: dict[str, Any]) -> dict[str, Any]:
    """The TrainSpec fragment for the node's values, every section checked with the engine's rules."""
    fragment: dict[str, Any] = {}
    for build in SECTION_BUILDERS:
        section, settings = build(values)
        fragment[section] = checked(section, settings)
    return fragment


def describe(fragment: dict[str, Any]) -> str:
    """One line per regulariser for the node's text: what it does and what it costs."""
    return "\n".join([describe_rollout(fragment["scheduled_sampling"]), describe_crepa(fragment["crepa"])])


def describe_crepa(c: dict[str, Any]) -> str:
    if not c["crepa_enabled"]:
        return "CREPA: off"
    if c["crepa_feature_source"] == "backbone":
        teacher = c["crepa_teacher_block_index"]
        teacher_text = f"block {c['crepa_block_index'] if teacher is None else teacher}'s output (no encoder)"
    else:
        cache = "cached on disk" if c["crepa_teacher_cache"] else "computed every step"
        teacher_text = f"{c['crepa_encoder']} at {c['crepa_encoder_image_size']} px, {cache}"
    return (
        f"CREPA: block {c['crepa_block_index']} aligned with {teacher_text}; weight {c['crepa_lambda']:g} "
        f"({c['crepa_scheduler']}), neighbours at {c['crepa_adjacent_distance']} (tau {c['crepa_adjacent_tau']:g})"
    )


def describe_rollout(ss: dict[str, Any]) -> str:
    top = ss["scheduled_sampling_max_step_offset"]
    if top <= 0:
        return "scheduled sampling: off (max_step_offset 0)"
    if ss["scheduled_sampling_ramp_steps"] > 0:
        p_text = (
            f"p ramps {ss['scheduled_sampling_prob_start']:g} -> {ss['scheduled_sampling_prob_end']:g} over "
            f"{ss['scheduled_sampling_ramp_steps']} steps from step {ss['scheduled_sampling_start_step']}"
        )
        p_final = ss["scheduled_sampling_prob_end"]
    else:
        p_final = ss["scheduled_sampling_probability"]
        p_text = f"p {p_final:g}"
    reflexflow = ss["scheduled_sampling_reflexflow"] is not False
    extra = p_final * ((top + 1) / 2 + reflexflow) if ss["scheduled_sampling_strategy"] == "uniform" else None
    cost = f"; about {extra:.2f} extra forward passes per micro-batch" if extra is not None else ""
    rf = ", with ReflexFlow" if reflexflow else ""
    return f"scheduled sampling: rollout of 1..{top} Euler steps, {p_text}{rf}{cost}"


def regulariser_inputs() -> list:
    """The node's inputs, in the order saved workflows store their widgets (append new ones at the end)."""
    return [
        io.Int.Input(
            "max_step_offset",
            default=5,
            min=0,
            max=999,
            tooltip="Scheduled sampling: most rollout steps k (drawn in 1..this). Each step is 1/1000 of the noise "
            "range and costs one extra forward pass, without gradient. 0 turns it off; 5-10 is SimpleTuner's advice.",
        ),
        io.Float.Input(
            "probability",
            default=0.25,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Scheduled sampling: chance that a micro-batch is rolled out (when ramp_steps is 0). 1 rolls out "
            "every step (slowest).",
        ),
        io.Int.Input(
            "ramp_steps",
            default=0,
            min=0,
            max=1_000_000,
            tooltip="Scheduled sampling: ramp the probability from prob_start to prob_end over this many steps "
            "(a warm-up: learn plain denoising first). 0: no ramp, 'probability' applies.",
        ),
        io.Float.Input(
            "prob_start",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Scheduled sampling ramp: the probability until start_step and at the ramp's start.",
        ),
        io.Float.Input(
            "prob_end",
            default=0.5,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Scheduled sampling ramp: the probability at the ramp's end and after it.",
        ),
        io.Int.Input(
            "start_step",
            default=0,
            min=0,
            max=1_000_000,
            tooltip="Scheduled sampling ramp: the step at which the ramp starts.",
        ),
        io.Combo.Input(
            "ramp_shape",
            options=RAMP_SHAPES,
            default="linear",
            tooltip="Scheduled sampling ramp: linear, or cosine (slow at both ends).",
        ),
        io.Combo.Input(
            "strategy",
            options=STRATEGIES,
            default="uniform",
            tooltip="Scheduled sampling: how k is drawn. uniform over 1..max_step_offset, biased_early towards "
            "short rollouts, biased_late towards long ones.",
        ),
        io.Boolean.Input(
            "reflexflow",
            default=True,
            tooltip="Scheduled sampling: ReflexFlow's loss terms (an anti-drift term on every step, and a loss "
            "reweighting after a rollout, which costs one more pass). On by default, as in SimpleTuner.",
        ),
        *crepa_inputs(),
    ]


def crepa_inputs() -> list:
    """CREPA's inputs (SimpleTuner's crepa_* keys, the quick-start's values as defaults)."""
    return [
        io.Boolean.Input(
            "crepa",
            default=CREPA_DEFAULTS["crepa"],
            tooltip="CREPA: align a block's hidden states with DINOv2 features of each frame and its neighbours, "
            "which cuts flicker and keeps subjects stable across frames (Kandinsky 5 video). With the backbone "
            "teacher also Kandinsky 5 image and Lumina 2. Adds a small trained projector (kept out of the LoRA file).",
        ),
        io.Combo.Input(
            "crepa_teacher",
            options=CREPA_TEACHERS,
            default=CREPA_DEFAULTS["crepa_teacher"],
            tooltip="CREPA teacher: DINOv2 on the decoded frames (video), or a deeper block of the model itself "
            "(no encoder, no decoding; the only choice for Kandinsky 5 image and Lumina 2). crepa_feature_source.",
        ),
        io.Int.Input(
            "crepa_block_index",
            default=CREPA_DEFAULTS["crepa_block_index"],
            min=0,
            max=200,
            tooltip="CREPA: the visual block (0-based) whose output is aligned. The quick-start starts at 8. "
            "Lumina 2: its main layers, the refiners not counted.",
        ),
        io.Int.Input(
            "crepa_teacher_block",
            default=CREPA_DEFAULTS["crepa_teacher_block"],
            min=-1,
            max=200,
            tooltip="CREPA backbone teacher: the deeper block whose output is the target. -1: crepa_block_index "
            "(SimpleTuner's default). crepa_teacher_block_index.",
        ),
        io.Float.Input(
            "crepa_lambda",
            default=CREPA_DEFAULTS["crepa_lambda"],
            min=0.0,
            max=10.0,
            step=0.05,
            tooltip="CREPA: weight of its term in the loss (crepa_lambda; the quick-start uses 0.5).",
        ),
        io.Int.Input(
            "crepa_adjacent_distance",
            default=CREPA_DEFAULTS["crepa_adjacent_distance"],
            min=0,
            max=16,
            tooltip="CREPA: neighbour frames at this distance are aligned too (0: the frame only).",
        ),
        io.Float.Input(
            "crepa_adjacent_tau",
            default=CREPA_DEFAULTS["crepa_adjacent_tau"],
            min=0.01,
            max=100.0,
            step=0.1,
            tooltip="CREPA: temporal decay; a neighbour at distance d weighs exp(-d/tau).",
        ),
        io.String.Input(
            "crepa_encoder",
            default=CREPA_DEFAULTS["crepa_encoder"],
            tooltip="CREPA encoder: dinov2_vits14 / vitb14 / vitl14 / vitg14 (the matching facebook/dinov2-* repo "
            "from the Hugging Face cache), a repo id, or a local folder. Never downloaded from torch.hub.",
        ),
        io.Int.Input(
            "crepa_encoder_image_size",
            default=CREPA_DEFAULTS["crepa_encoder_image_size"],
            min=14,
            max=2048,
            step=14,
            tooltip="CREPA: frames are resized to this square for DINOv2 (518 for vitg14, 224 for vits14).",
        ),
        io.Combo.Input(
            "crepa_scheduler",
            options=CREPA_SCHEDULERS,
            default=CREPA_DEFAULTS["crepa_scheduler"],
            tooltip="CREPA: how its weight changes over the run, from crepa_lambda to crepa_lambda_end.",
        ),
        io.Float.Input(
            "crepa_lambda_end",
            default=CREPA_DEFAULTS["crepa_lambda_end"],
            min=0.0,
            max=10.0,
            step=0.05,
            tooltip="CREPA: the weight at the end of the run (schedulers other than constant).",
        ),
        io.Int.Input(
            "crepa_cutoff_step",
            default=CREPA_DEFAULTS["crepa_cutoff_step"],
            min=0,
            max=1_000_000,
            tooltip="CREPA: turn it off from this step on (0: never).",
        ),
        io.Boolean.Input(
            "crepa_teacher_cache",
            default=CREPA_DEFAULTS["crepa_teacher_cache"],
            tooltip="CREPA: cache the DINOv2 features on disk beside the latents, so later epochs decode "
            "nothing (about 8 MB per latent frame with vitg14 at 518). Off: decode and encode every step.",
        ),
    ]


class TunerRegularisers(io.ComfyNode):
    """Regularisers: scheduled sampling (rollout) and CREPA settings for Train LoRA and Fine-tune Model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerRegularisers",
            display_name="Regularisers",
            category=CATEGORY_SETTINGS,
            description="Training regularisers. Scheduled sampling (rollout): sometimes the model first denoises "
            "its training input a few steps itself and learns on that, so it learns to correct its own drift "
            "(exposure bias). Costs extra forward passes, without gradient. CREPA: aligns a block's hidden "
            "states with DINOv2 features of each frame and its neighbours, for steadier video.",
            inputs=regulariser_inputs(),
            outputs=[
                TunerRegularisersSocket.Output(
                    "regularisers", tooltip="Connect to Train LoRA's or Fine-tune Model's regularisers input."
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        max_step_offset: int,
        probability: float,
        ramp_steps: int,
        prob_start: float,
        prob_end: float,
        start_step: int,
        ramp_shape: str,
        strategy: str,
        reflexflow: bool,
        **crepa: Any,
    ) -> io.NodeOutput:
        values = {
            **CREPA_DEFAULTS,
            **crepa,
            "max_step_offset": max_step_offset,
            "probability": probability,
            "ramp_steps": ramp_steps,
            "prob_start": prob_start,
            "prob_end": prob_end,
            "start_step": start_step,
            "ramp_shape": ramp_shape,
            "strategy": strategy,
            "reflexflow": reflexflow,
        }
        fragment = regulariser_fragment(values)
        return io.NodeOutput(fragment, ui=ui.PreviewText(describe(fragment)))


NODES = [TunerRegularisers]
