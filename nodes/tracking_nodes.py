"""Tracking: where Train LoRA and Fine-tune Model also log the run (TensorBoard, Weights & Biases).

The node only writes SimpleTuner's tracker keys into a ``{"tracking": {...}}`` fragment; the
trainer's child process attaches the trackers (``trainer_core.tracking``). Tracking never changes
what is learnt, so it is left out of the run folder's name: adding a tracker to a finished run
and queueing again reuses the same folder.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer_core.spec import build_spec
from ..trainer_core.tracking import DEFAULT_PROJECT, check_tracking
from .sockets import CATEGORY_SETTINGS, TunerTrackingSocket

REPORT_TO = ["tensorboard", "wandb", "all", "none"]


def tracking_fragment(report_to: str, project: str, run_name: str, logging_dir: str) -> dict:
    """The node's values as a checked ``{"tracking": {...}}`` fragment (empty text: the default)."""
    values = {
        "report_to": report_to,
        "tracker_project_name": project.strip() or None,
        "tracker_run_name": run_name.strip() or None,
        "logging_dir": logging_dir.strip() or "logs",
    }
    fragment = {"tracking": values}
    check_tracking(build_spec(fragment, source="tracking settings"))  # a missing package: here, with the pip command
    return fragment


def describe(fragment: dict) -> str:
    t = fragment["tracking"]
    if t["report_to"] == "none":
        return "no tracker: the run is shown on the node only"
    where = f"project {t['tracker_project_name'] or DEFAULT_PROJECT}, run {t['tracker_run_name'] or '<run folder>'}"
    return f"logs to {t['report_to']} ({where}); TensorBoard and offline wandb files in <run folder>/{t['logging_dir']}"


class TunerTracking(io.ComfyNode):
    """Tracking: SimpleTuner's report_to, tracker_project_name, tracker_run_name and logging_dir."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerTracking",
            display_name="Tracking",
            category=CATEGORY_SETTINGS,
            description="Also log the run to TensorBoard or Weights & Biases: loss, learning rate, gradient norm, "
            "validation images and the settings. Does not change the training, so adding it continues the same run.",
            inputs=[
                io.Combo.Input(
                    "report_to",
                    options=REPORT_TO,
                    default="tensorboard",
                    tooltip="Where to log: tensorboard (files in the run folder; needs the tensorboard package), "
                    "wandb (Weights & Biases; needs wandb and `wandb login`, or WANDB_MODE=offline for files to "
                    "`wandb sync` later), all (both, as far as installed) or none.",
                ),
                io.String.Input(
                    "project",
                    default="",
                    tooltip="tracker_project_name: the wandb project, and TensorBoard's sub-folder. Empty: "
                    f"{DEFAULT_PROJECT}.",
                ),
                io.String.Input(
                    "run_name",
                    default="",
                    tooltip="tracker_run_name: the run's name in wandb. Empty: the run folder's name "
                    "(the name widget plus the run id).",
                ),
                io.String.Input(
                    "logging_dir",
                    default="logs",
                    tooltip="logging_dir: where TensorBoard's files (and offline wandb runs) go; a relative "
                    "folder is inside the run folder (output/comfyui-tuner/<run>/logs).",
                ),
            ],
            outputs=[
                TunerTrackingSocket.Output(
                    "tracking", tooltip="Connect to Train LoRA's or Fine-tune Model's tracking input."
                )
            ],
        )

    @classmethod
    def execute(cls, report_to: str, project: str, run_name: str, logging_dir: str) -> io.NodeOutput:
        fragment = tracking_fragment(report_to, project, run_name, logging_dir)
        return io.NodeOutput(fragment, ui=ui.PreviewText(describe(fragment)))


NODES = [TunerTracking]
