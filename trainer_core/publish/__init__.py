"""Publishing a run to the Hugging Face Hub (SimpleTuner's ``push_to_hub`` and friends).

- :mod:`.model_card`: the repository's ``README.md``, YAML metadata first (base model, tags,
  library, trigger, training settings, sample widgets), then the text.
- :mod:`.hub`: what goes where (:func:`~.hub.final_plan`, :func:`~.hub.checkpoint_plan`: local
  file -> path in the repository), the background uploader that sends exactly those plans, and
  :class:`~.hub.HubPublisher`, an event sink that reacts to the run's ``checkpoint`` and ``done``
  events, so the engine knows nothing about the Hub.

Nothing here imports ``huggingface_hub`` until an upload starts.
"""

from .hub import HubPublisher, UploadItem, checkpoint_plan, final_plan, publishing

__all__ = ["HubPublisher", "UploadItem", "checkpoint_plan", "final_plan", "publishing"]
