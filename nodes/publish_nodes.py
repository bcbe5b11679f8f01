"""Publish to Hub: the Hugging Face Hub settings for Train LoRA and Fine-tune Model.

The output is a TrainSpec fragment of the export section (SimpleTuner's ``push_to_hub``,
``hub_model_id``, ``push_checkpoints_to_hub``, ``model_card_private``, ``model_card_safe_for_work``,
``model_card_note``). The uploading itself happens in the training child
(``trainer_core/publish``), in the background: a failed upload is a warning under the node, never
a failed run. Publishing settings do not name a new run folder (the export section is not part of
the run's identity), so adding this node to a finished run's graph re-uses the run, and does not
upload it: publishing happens when a run trains.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io, ui
from pydantic import ValidationError

from ..trainer_core.errors import ConfigError
from ..trainer_core.spec import ExportSpec, format_validation_error
from .sockets import CATEGORY_SETTINGS, TunerPublishSocket


def publish_fragment(
    repo_id: str, private: bool, push_checkpoints: bool, safe_for_work: bool, note: str
) -> dict[str, Any]:
    """The node's values as the export section's publishing keys, checked now (a bad repo id fails here)."""
    values = {
        "push_to_hub": True,
        "hub_model_id": repo_id.strip() or None,
        "model_card_private": private,
        "push_checkpoints_to_hub": push_checkpoints,
        "model_card_safe_for_work": safe_for_work,
        "model_card_note": note.strip() or None,
    }
    try:
        checked = ExportSpec.model_validate(values)
    except ValidationError as e:
        raise ConfigError(
            f"invalid Hub settings:\n{format_validation_error(e)}", "set repo_id to 'user/name'"
        ) from None
    values["hub_model_id"] = checked.hub_model_id  # a pasted URL becomes the repo id
    return {"export": values}


class TunerPublish(io.ComfyNode):
    """Publish to Hub: where and how Train LoRA / Fine-tune Model upload their results."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerPublish",
            display_name="Publish to Hub",
            category=CATEGORY_SETTINGS,
            description="Upload the trained LoRA (both formats) or fine-tuned model, a model card with the "
            "training settings and validation samples to a Hugging Face Hub repository, in the background "
            "while training. Needs a Hugging Face token (HF_TOKEN, or `hf auth login`). A failed upload is a "
            "warning; the run still finishes and its files stay on disk.",
            inputs=[
                io.String.Input(
                    "repo_id",
                    default="",
                    tooltip="The Hub repository, 'user/name' (created if missing). SimpleTuner's hub_model_id.",
                ),
                io.Boolean.Input(
                    "private",
                    default=True,
                    tooltip="Create the repository private (SimpleTuner's model_card_private, on by default). "
                    "An existing repository keeps its visibility.",
                ),
                io.Boolean.Input(
                    "push_checkpoints",
                    default=False,
                    tooltip="Also upload each checkpoint's weights to checkpoints/step-N/ in the repository "
                    "(SimpleTuner's push_checkpoints_to_hub).",
                ),
                io.Boolean.Input(
                    "safe_for_work",
                    default=False,
                    tooltip="Tag the model card safe-for-work instead of not-for-all-audiences "
                    "(SimpleTuner's model_card_safe_for_work).",
                ),
                io.String.Input(
                    "note",
                    default="",
                    multiline=True,
                    tooltip="A paragraph near the top of the model card (SimpleTuner's model_card_note).",
                ),
            ],
            outputs=[
                TunerPublishSocket.Output(
                    "publish", tooltip="Connect to Train LoRA's or Fine-tune Model's publish input."
                )
            ],
        )

    @classmethod
    def execute(
        cls, repo_id: str, private: bool, push_checkpoints: bool, safe_for_work: bool, note: str
    ) -> io.NodeOutput:
        fragment = publish_fragment(repo_id, private, push_checkpoints, safe_for_work, note)
        e = fragment["export"]
        text = f"uploads to {e['hub_model_id']} ({'private' if private else 'public'})" + (
            ", with checkpoints" if push_checkpoints else ""
        )
        return io.NodeOutput(fragment, ui=ui.PreviewText(text))


NODES = [TunerPublish]
