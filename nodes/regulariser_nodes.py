"""Regularisers: training regularisers for Train LoRA and Fine-tune Model, as one settings node.

Today it holds scheduled sampling (rollout, ``trainer_core/train/scheduled_sampling.py``): with a
probability per step, the model first denoises its training input for ``k`` Euler steps itself,
and learns on that self-made input, so it learns to correct its own drift; ReflexFlow's loss terms
come with it unless turned off. The inputs are
SimpleTuner's ``scheduled_sampling_*`` keys. The output is a TrainSpec fragment, one section per
regulariser (``{"scheduled_sampling": {...}}``), each checked here with the engine's rules so a bad
value is reported on this node.

To add a regulariser (CREPA next): add its inputs to :func:`regulariser_inputs`, a function that
turns the node's values into its section, and list that function in :data:`SECTION_BUILDERS`.
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
    """The ``scheduled_sampling`` section from the node's values (SimpleTuner's keys)."""
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


SECTION_BUILDERS: list[Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]] = [scheduled_sampling_section]
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
    ss = fragment["scheduled_sampling"]
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
    ]


class TunerRegularisers(io.ComfyNode):
    """Regularisers: scheduled sampling (rollout) settings for Train LoRA and Fine-tune Model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerRegularisers",
            display_name="Regularisers",
            category=CATEGORY_SETTINGS,
            description="Training regularisers. Scheduled sampling (rollout): sometimes the model first denoises "
            "its training input a few steps itself and learns on that, so it learns to correct its own drift "
            "(exposure bias). Costs extra forward passes, without gradient.",
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
    ) -> io.NodeOutput:
        values = {
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
