"""ComfyUI glue of comfyui-tuner: thin V3 nodes that build TrainSpec fragments and run the trainer.

This is a subpackage of the pack, imported relatively from the top-level ``__init__.py`` (ComfyUI has
its own top-level ``nodes`` module, so this must never be importable as ``nodes``). No training
logic lives here: nodes only turn widgets into TrainSpec fragments, merge them, start the trainer in
a child process (``trainer_core.worker``) and turn its events into ComfyUI's progress bar, previews
and websocket messages. ``comfy_bridge`` holds the few calls into ComfyUI itself.
"""
