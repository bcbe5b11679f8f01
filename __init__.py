"""ComfyUI entry point of comfyui-tuner.

ComfyUI imports this file when it loads custom nodes. It must stay cheap: nothing heavy (torch,
diffusers) is imported here. The nodes arrive with the ComfyUI-experience work; until then the
pack registers no nodes, and the trainer core is usable from the command line
(``python -m trainer_core``).
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
